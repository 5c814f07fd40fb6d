//! What one [`crate::ApicVcpu::run`] call ends with ([`Exit`], [`Handled`]), and
//! how a `KVM_RUN` return is decoded: the APIC's exits handled, the rest passed on.

use kvm_ioctls::VcpuExit;
use vlapic::fabric::SharedFabric;
use vlapic::is_apic_msr;
use vlapic::regs::MSR_APIC_BASE;

use crate::ApicRuntime;

/// An exit the adapter handled completely (for the embedder's statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Handled {
    /// A read of this vCPU's xAPIC page or of the IOAPIC page.
    MmioRead,
    /// A write to this vCPU's xAPIC page or to the IOAPIC page.
    MmioWrite,
    /// RDMSR of an APIC MSR (x2APIC, IA32_APIC_BASE, IA32_TSC_DEADLINE).
    Rdmsr,
    /// WRMSR of an APIC MSR.
    Wrmsr,
    /// An MSR access answered with #GP (a non-APIC MSR KVM did not handle, or an APIC
    /// MSR the architecture refuses); the MSR index.
    MsrFault(u32),
    /// HLT: the vCPU is now halted (parked at the next call unless it has work).
    Hlt,
    /// The interrupt window opened.
    IrqWindow,
    /// The guest lowered CR8 and KVM said so.
    SetTpr,
    /// One single-stepped instruction while a vector was held back by TPR.
    Step,
    /// `KVM_RUN` was interrupted (a kick, a timer, a poll).
    Kick,
}

/// What one [`crate::ApicVcpu::run`] call ended with.
#[derive(Debug)]
#[non_exhaustive]
pub enum Exit<'a> {
    /// An exit the adapter handled; call `run` again.
    Handled(Handled),
    /// The vCPU was parked in userspace (halted or waiting for SIPI) and woke, or
    /// there was nothing to do; call `run` again (after checking your own flags).
    Idle,
    /// [`ApicRuntime::stop`] was called.
    Stopped,
    /// Every vCPU is halted with interrupts off or waiting for SIPI and nothing is
    /// pending for any: the VM can never run again.
    AllStopped,
    /// Port input for the embedder's devices: fill the buffer.
    IoIn(u16, &'a mut [u8]),
    /// Port output for the embedder's devices.
    IoOut(u16, &'a [u8]),
    /// MMIO read outside the APIC and IOAPIC pages: fill the buffer.
    MmioRead(u64, &'a mut [u8]),
    /// MMIO write outside the APIC and IOAPIC pages.
    MmioWrite(u64, &'a [u8]),
    /// Triple fault.
    Shutdown,
    /// KVM could not run the vCPU (`KVM_EXIT_INTERNAL_ERROR`): suberror and data.
    InternalError(u32, Vec<u64>),
    /// `KVM_EXIT_FAIL_ENTRY`: hardware entry failure reason and CPU.
    FailEntry(u64, u32),
    /// `KVM_EXIT_SYSTEM_EVENT` of this type.
    SystemEvent(u32),
    /// Any other exit, described.
    Other(String),
}

/// The result of decoding one `KVM_RUN` return.
pub(crate) enum Decoded<'a> {
    Done(Handled, bool),
    Pass(Exit<'a>),
}

/// Handles the APIC's exits; passes the rest on.
pub(crate) fn decode<'a>(
    rt: &ApicRuntime,
    fabric: &SharedFabric,
    me: usize,
    exit: VcpuExit<'a>,
) -> Decoded<'a> {
    let now = rt.now_ns();
    match exit {
        VcpuExit::MmioRead(addr, data) => {
            if fabric.mmio_read(me, addr, data, now) {
                Decoded::Done(Handled::MmioRead, false)
            } else {
                Decoded::Pass(Exit::MmioRead(addr, data))
            }
        }
        VcpuExit::MmioWrite(addr, data) => match fabric.mmio_write(me, addr, data, now) {
            Some(w) => {
                rt.wake_others(me, &w);
                Decoded::Done(Handled::MmioWrite, false)
            }
            None => Decoded::Pass(Exit::MmioWrite(addr, data)),
        },
        VcpuExit::X86Rdmsr(m) => {
            match is_apic_msr(m.index).then(|| fabric.lapic_msr_read(me, m.index, now)) {
                Some(Ok(v)) => {
                    *m.data = v;
                    Decoded::Done(Handled::Rdmsr, false)
                }
                _ => {
                    *m.error = 1;
                    Decoded::Done(Handled::MsrFault(m.index), false)
                }
            }
        }
        VcpuExit::X86Wrmsr(m) if m.index == MSR_APIC_BASE && rt.apic_base_refused(m.data) => {
            *m.error = 1;
            Decoded::Done(Handled::MsrFault(m.index), false)
        }
        VcpuExit::X86Wrmsr(m) => {
            match is_apic_msr(m.index).then(|| fabric.lapic_msr_write(me, m.index, m.data, now)) {
                Some(Ok(w)) => {
                    rt.wake_others(me, &w);
                    Decoded::Done(Handled::Wrmsr, m.index == MSR_APIC_BASE)
                }
                _ => {
                    *m.error = 1;
                    Decoded::Done(Handled::MsrFault(m.index), false)
                }
            }
        }
        VcpuExit::IoIn(port, data) => Decoded::Pass(Exit::IoIn(port, data)),
        VcpuExit::IoOut(port, data) => Decoded::Pass(Exit::IoOut(port, data)),
        VcpuExit::Hlt => Decoded::Done(Handled::Hlt, false),
        VcpuExit::IrqWindowOpen => Decoded::Done(Handled::IrqWindow, false),
        VcpuExit::SetTpr => Decoded::Done(Handled::SetTpr, false),
        VcpuExit::Debug(_) => Decoded::Done(Handled::Step, false),
        VcpuExit::Intr => Decoded::Done(Handled::Kick, false),
        VcpuExit::Shutdown => Decoded::Pass(Exit::Shutdown),
        VcpuExit::FailEntry(reason, cpu) => Decoded::Pass(Exit::FailEntry(reason, cpu)),
        VcpuExit::InternalError => Decoded::Pass(Exit::InternalError(0, Vec::new())),
        VcpuExit::SystemEvent(t, _) => Decoded::Pass(Exit::SystemEvent(t)),
        other => Decoded::Pass(Exit::Other(format!("{other:?}"))),
    }
}
