//! One vCPU thread: vlapic-kvm's adapter runs the vCPU and its APIC; this loop serves
//! the platform devices, counts exits, pauses for migration and reports the end.

use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vlapic::Events;
use vlapic_kvm::vcpu::VcpuCounters;
use vlapic_kvm::{ApicVcpu, Exit, Handled, RunState};

use crate::gate::PausedVcpu;
use crate::outcome::Outcome;
use crate::shared::Shared;
use crate::snapshot::VcpuState;
use crate::stats::ExitReason;

/// Most exits one instruction may need to complete before a pause (a `rep movs`
/// over the APIC page makes one per element).
const MAX_FINISH_EXITS: usize = 1 << 16;

/// One vCPU and where it starts.
pub struct Vcpu {
    /// vCPU index (= APIC ID).
    pub index: usize,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// The run state to start in: running (BSP), wait-for-SIPI (APs at boot), or
    /// whatever a restored vCPU was in.
    pub start: RunState,
    /// Events already taken from the APIC, to act on first (a restored vCPU's).
    pub carried: Events,
    /// Counters to continue from (interrupts, NMIs, SIPIs, ExtINTs; a restored vCPU's).
    pub counters: [u64; 4],
}

/// Where a vCPU was when its thread ended (the report is built from it).
#[derive(Clone, Debug, Default)]
pub struct VcpuEnd {
    /// vCPU index.
    pub index: usize,
    /// Run state: running, halted, halted (IF=0), wait-for-SIPI.
    pub state: String,
    /// RIP after the loop ended.
    pub rip: u64,
    /// Interrupts, NMIs and SIPIs the adapter delivered.
    pub counters: VcpuCounters,
}

/// The exit-statistics bucket of an adapter exit.
fn reason(e: &Exit<'_>) -> ExitReason {
    match e {
        Exit::Handled(Handled::MmioRead) | Exit::MmioRead(..) => ExitReason::MmioRead,
        Exit::Handled(Handled::MmioWrite) | Exit::MmioWrite(..) => ExitReason::MmioWrite,
        Exit::Handled(Handled::Rdmsr) => ExitReason::Rdmsr,
        Exit::Handled(Handled::Wrmsr) => ExitReason::Wrmsr,
        Exit::Handled(Handled::Hlt) => ExitReason::Hlt,
        Exit::Handled(Handled::IrqWindow) => ExitReason::IrqWindow,
        Exit::Handled(Handled::SetTpr) => ExitReason::SetTpr,
        Exit::Handled(Handled::Kick) => ExitReason::Kick,
        Exit::IoIn(..) => ExitReason::IoIn,
        Exit::IoOut(..) => ExitReason::IoOut,
        _ => ExitReason::Other,
    }
}

/// Serves one exit the adapter passed on (or counted). `None`: carry on.
fn serve(sh: &Shared, me: usize, exit: Exit<'_>) -> Option<Outcome> {
    let counted = !matches!(exit, Exit::Idle | Exit::Stopped | Exit::AllStopped);
    if counted {
        sh.exits.count(me, reason(&exit));
    }
    match exit {
        Exit::Handled(Handled::MsrFault(msr)) => {
            sh.msr_gp.hit(u64::from(msr));
            None
        }
        Exit::Handled(_) | Exit::Idle | Exit::Stopped => None,
        Exit::AllStopped => Some(Outcome::AllStopped),
        Exit::IoIn(port, data) => {
            if !sh.clocks.port_in(port, data) {
                sh.io.port_in(port, data);
            }
            None
        }
        Exit::IoOut(port, data) => {
            if sh.clocks.port_out(port, data) {
                return None;
            }
            let o = sh.io.port_out(port, data);
            if let Some((pin, level)) = o.irq {
                sh.rt.set_irq_line(pin, level);
            }
            o.end()
        }
        Exit::MmioRead(addr, data) => {
            if !sh.clocks.mmio_read(addr, data) {
                sh.wild_mmio.hit(addr);
                data.fill(0xFF);
            }
            None
        }
        Exit::MmioWrite(addr, data) => {
            if !sh.clocks.mmio_write(addr, data) {
                sh.wild_mmio.hit(addr);
            }
            None
        }
        Exit::Shutdown => Some(Outcome::GuestCrash(
            "triple fault (KVM_EXIT_SHUTDOWN)".into(),
        )),
        Exit::FailEntry(reason, cpu) => Some(Outcome::GuestCrash(format!(
            "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on cpu {cpu}"
        ))),
        Exit::InternalError(..) => Some(Outcome::GuestCrash("KVM internal error".into())),
        Exit::SystemEvent(t) => Some(Outcome::GuestCrash(format!("KVM system event {t}"))),
        Exit::Other(what) => Some(Outcome::GuestCrash(format!("unexpected VM exit {what}"))),
        _ => Some(Outcome::GuestCrash("unexpected VM exit".into())),
    }
}

/// Runs a vCPU until the run ends; returns its report. The adapter (and with it
/// the `kvm_run` mapping every kicker may touch) is dropped only after the run
/// stopped, so no kick lands in a dead mapping.
pub fn run_vcpu(v: Vcpu, sh: Arc<Shared>) -> VcpuEnd {
    let me = v.index;
    let mut rep = VcpuEnd {
        index: me,
        ..VcpuEnd::default()
    };
    if let Some(vm) = sh.kernel_irqchip.clone() {
        let mut fd = v.fd;
        kernel_loop(&mut fd, me, &sh, &vm);
        rep.state = "running".into();
        rep.rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
        return rep;
    }
    let mut vcpu = match ApicVcpu::new(sh.rt.clone(), me, v.fd) {
        Ok(a) => a,
        Err(e) => {
            sh.finish(Outcome::VmmError(format!("vcpu{me}: {e}")));
            return rep;
        }
    };
    if let Some(ram) = &sh.soft_int_ram {
        vcpu.enable_soft_interrupts(ram);
    }
    vcpu.set_state(v.start);
    vcpu.carry(v.carried);
    vcpu.set_counters(VcpuCounters {
        interrupts: v.counters[0],
        nmis: v.counters[1],
        sipis: v.counters[2],
        extints: v.counters[3],
        ..VcpuCounters::default()
    });
    vcpu_loop(&mut vcpu, &sh);
    rep.counters = vcpu.counters();
    rep.state = match vcpu.state() {
        RunState::Running => "running".into(),
        RunState::Halted(true) => "halted".into(),
        RunState::Halted(false) => "halted (IF=0)".into(),
        RunState::WaitForSipi => "wait-for-SIPI".into(),
    };
    rep.rip = vcpu.fd().get_regs().map(|r| r.rip).unwrap_or(0);
    rep
}

fn vcpu_loop(vcpu: &mut ApicVcpu, sh: &Shared) {
    let me = vcpu.index();
    // `--trace`: the fabric this vCPU drains, re-read only after a migration (the
    // only time it is replaced, with this vCPU parked in `migrate_here`).
    #[cfg(feature = "trace")]
    let mut chip = sh.trace.as_ref().map(|_| sh.chip());
    while !sh.stopped() {
        if sh
            .migration
            .requested
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            match migrate_here(vcpu, sh) {
                Ok(true) => {
                    #[cfg(feature = "trace")]
                    if chip.is_some() {
                        chip = Some(sh.chip());
                    }
                    continue;
                }
                Ok(false) => break,
                Err(e) => {
                    sh.finish(Outcome::VmmError(format!("vcpu{me}: migration: {e}")));
                    break;
                }
            }
        }
        drive_lint0(sh);
        let end = match vcpu.run() {
            Ok(Exit::InternalError(..)) => {
                sh.exits.count(me, ExitReason::Other);
                match vcpu.deliver_soft_interrupt() {
                    Ok(vlapic_kvm::softint::SoftIntOutcome::NotSoftInt) => fill_in(vcpu),
                    r => soft_int(sh, r),
                }
            }
            Ok(exit) => serve(sh, me, exit),
            Err(e) => Some(Outcome::VmmError(format!("vcpu{me}: {e}"))),
        };
        #[cfg(feature = "trace")]
        if let (Some(t), Some(chip)) = (&sh.trace, &chip) {
            t.drain(me, chip);
        }
        if let Some(mut o) = end {
            if let Outcome::GuestCrash(m) = &mut o {
                let internal = vcpu.internal_error();
                *m = crash_context(vcpu.fd(), me, m, internal);
            }
            sh.finish(o);
            break;
        }
    }
}

/// What the software-interrupt workaround did with a `KVM_EXIT_INTERNAL_ERROR`:
/// `None` (delivered, counted: run on) or the crash to report.
fn soft_int(
    sh: &Shared,
    r: Result<vlapic_kvm::softint::SoftIntOutcome, vlapic_kvm::Error>,
) -> Option<Outcome> {
    use vlapic_kvm::softint::SoftIntOutcome as S;
    match r {
        Ok(S::Delivered(v) | S::Faulted(v, _)) => {
            sh.soft_ints.hit(u64::from(v));
            None
        }
        Ok(S::NotSoftInt) => Some(Outcome::GuestCrash("KVM internal error".into())),
        Ok(S::Shutdown(v)) => {
            sh.soft_ints.hit(u64::from(v));
            Some(Outcome::GuestCrash(format!(
                "triple fault delivering `int {v:#x}` (the VMM delivered it; #DF faulted)"
            )))
        }
        Ok(S::Unsupported(v, why)) => Some(Outcome::GuestCrash(format!(
            "KVM internal error: `int {v:#x}` not delivered by the VMM ({why})"
        ))),
        Ok(other) => Some(Outcome::GuestCrash(format!(
            "KVM internal error ({other:?})"
        ))),
        Err(e) => Some(Outcome::VmmError(format!(
            "delivering a software interrupt: {e}"
        ))),
    }
}

/// Drives the BSP's LINT0 to the 8259 pair's INT output if it changed (a port
/// access, an IRQ line or an INTA on any vCPU), waking whoever must act.
fn drive_lint0(sh: &Shared) {
    for level in sh.io.pic.take_lint0() {
        let rt = &sh.rt;
        let w = rt.fabric().set_lint(0, 0, level, rt.now_ns());
        rt.wake(&w);
    }
}

/// An emulation failure that is not `int3`/`int n`: completed by the VMM when it is an
/// instruction [`crate::fill_in`] knows (`None`: run on), else the crash to report.
fn fill_in(vcpu: &mut ApicVcpu) -> Option<Outcome> {
    let data = vcpu.internal_error().map(|(_, d)| d).unwrap_or_default();
    match crate::fill_in::complete(vcpu.fd(), &data) {
        Ok(Some(_)) => None,
        Ok(None) => Some(Outcome::GuestCrash("KVM internal error".into())),
        Err(e) => Some(Outcome::VmmError(format!("completing an instruction: {e}"))),
    }
}

/// "vcpuN at rip X: what (internal error data) [control registers]".
/// `internal` is the exit's KVM_EXIT_INTERNAL_ERROR suberror and data, if it was one.
fn crash_context(fd: &VcpuFd, me: usize, what: &str, internal: Option<(u32, Vec<u64>)>) -> String {
    let detail = internal
        .map(|(sub, data)| {
            let d: Vec<String> = data.iter().map(|x| format!("{x:#x}")).collect();
            format!(" (suberror {sub}, data [{}])", d.join(", "))
        })
        .unwrap_or_default();
    let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
    let cr = fd
        .get_sregs()
        .map(|s| format!(" [cr0={:#x} cr4={:#x} efer={:#x}]", s.cr0, s.cr4, s.efer))
        .unwrap_or_default();
    format!("vcpu{me} at rip {rip:#x}: {what}{detail}{cr}")
}

/// Pauses this vCPU for a migration: completes the instruction in flight (however
/// many exits it takes), saves its state, waits for its vCPU in the new VM, swaps it
/// in and loads the state. `Ok(false)` if the run ended meanwhile.
fn migrate_here(vcpu: &mut ApicVcpu, sh: &Shared) -> Result<bool, String> {
    let me = vcpu.index();
    let mut done = false;
    for _ in 0..MAX_FINISH_EXITS {
        match vcpu.finish_instruction().map_err(|e| e.to_string())? {
            None => {
                done = true;
                break;
            }
            Some(exit) => {
                if let Some(o) = serve(sh, me, exit) {
                    sh.finish(o);
                    return Ok(false);
                }
            }
        }
    }
    if !done {
        return Err(format!(
            "the last instruction needed over {MAX_FINISH_EXITS} exits"
        ));
    }
    let c = vcpu.counters();
    let saved = PausedVcpu {
        kvm: VcpuState::save(vcpu.fd(), &sh.msr_list)?,
        run: vcpu.state(),
        events: vcpu.take_carried(),
        counters: [c.interrupts, c.nmis, c.sipis, c.extints],
        kernel_apic: None,
    };
    let Some((fd, st, events)) = sh.migration.pause(me, saved, &sh.rt) else {
        return Ok(false);
    };
    if let Some(fd) = fd {
        drop(vcpu.replace_fd(fd));
        st.kvm.restore(vcpu.fd(), || sh.clock().guest_tsc())?;
    }
    vcpu.set_state(st.run);
    vcpu.carry(st.events);
    vcpu.carry(events);
    Ok(true)
}

/// `--irqchip kernel`, pausing for a migration to another process: completes the
/// exit in flight (KVM finishes a pending port or MMIO access before it honours
/// `immediate_exit`, checklist item 12), saves the vCPU and its in-kernel APIC, and
/// parks. `Ok(false)` if the run ended meanwhile.
fn kernel_pause(fd: &mut VcpuFd, me: usize, sh: &Shared, vm: &VmFd) -> Result<bool, String> {
    let mut done = false;
    for _ in 0..MAX_FINISH_EXITS {
        fd.set_kvm_immediate_exit(1);
        let end = match fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                done = true;
                None
            }
            Err(e) => return Err(format!("KVM_RUN: {e}")),
            Ok(VcpuExit::IoIn(port, data)) => {
                if !sh.clocks.port_in(port, data) {
                    sh.io.port_in(port, data);
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if sh.clocks.port_out(port, data) {
                    None
                } else {
                    let o = sh.io.port_out(port, data);
                    if let Some((pin, level)) = o.irq {
                        let _ = vm.set_irq_line(pin, level);
                    }
                    o.end()
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !sh.clocks.mmio_read(addr, data) {
                    data.fill(0xFF);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                sh.clocks.mmio_write(addr, data);
                None
            }
            Ok(_) => None,
        };
        if let Some(o) = end {
            sh.finish(o);
            return Ok(false);
        }
        if done {
            break;
        }
    }
    fd.set_kvm_immediate_exit(0);
    if !done {
        return Err(format!(
            "the last instruction needed over {MAX_FINISH_EXITS} exits"
        ));
    }
    let apic = save_kernel_apic(fd)?;
    let saved = PausedVcpu {
        kvm: VcpuState::save(fd, &sh.msr_list)?,
        run: apic.run,
        events: Events::default(),
        counters: [0; 4],
        kernel_apic: Some(apic),
    };
    match sh.migration.pause(me, saved, &sh.rt) {
        None => Ok(false),
        Some((None, _, _)) => Ok(true),
        Some((Some(_), _, _)) => Err("the in-kernel irqchip cannot move into a new VM here".into()),
    }
}

/// Saves a paused vCPU's in-kernel APIC with no timer interrupt left counted inside
/// KVM only (`kernel_timer`): a flush run, the save, and, if the save shows an expired
/// one-shot timer, a second flush and save. A one-shot timer expires once and the
/// guest runs no instruction meanwhile, so when the first save shows it expired it
/// expired before the second flush, which put its interrupt in IRR (if KVM had not
/// already); when it shows it counting, it had not expired, so KVM counted nothing.
/// A TSC-deadline expiry KVM has not injected stays visible (KVM clears
/// IA32_TSC_DEADLINE only when it injects), and a periodic tick counted after the
/// flush is lost as if coalesced with the next one (as ticks are while IRR holds one).
fn save_kernel_apic(fd: &mut VcpuFd) -> Result<crate::kernel_chip::KernelApic, String> {
    let sig = vlapic_kvm::kick::kick_signal()?;
    crate::kernel_timer::flush_pending_timers(fd, sig)?;
    let apic = crate::kernel_chip::save_apic(fd)?;
    if !crate::kernel_timer::oneshot_expired(&apic.page) {
        return Ok(apic);
    }
    crate::kernel_timer::flush_pending_timers(fd, sig)?;
    crate::kernel_chip::save_apic(fd)
}

/// The loop for `--irqchip kernel`: KVM's LAPIC handles APIC accesses, HLT,
/// INIT/SIPI and injection; we only serve port I/O and report the end.
fn kernel_loop(fd: &mut VcpuFd, me: usize, sh: &Shared, vm: &VmFd) {
    let Some(kick) = sh.rt.kicker(me) else {
        sh.finish(Outcome::VmmError(format!("vcpu{me}: no kick slot")));
        return;
    };
    let ie: *mut u8 = &mut fd.get_kvm_run().immediate_exit;
    // SAFETY: `ie` points into this vCPU's kvm_run mapping, which lives as long as
    // `fd`; we unregister below, before `fd` can be dropped by our caller.
    unsafe { kick.register(ie) };
    while !sh.stopped() {
        if sh
            .migration
            .requested
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            match kernel_pause(fd, me, sh, vm) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    sh.finish(Outcome::VmmError(format!("vcpu{me}: migration: {e}")));
                    break;
                }
            }
        }
        let mut why = ExitReason::Other;
        let res = fd.run();
        kick.clear_immediate_exit();
        let end = match res {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    why = ExitReason::IoIn;
                    if !sh.clocks.port_in(port, data) {
                        sh.io.port_in(port, data);
                    }
                    None
                }
                VcpuExit::IoOut(port, data) => {
                    why = ExitReason::IoOut;
                    if sh.clocks.port_out(port, data) {
                        None
                    } else {
                        let o = sh.io.port_out(port, data);
                        let irq = o.irq.and_then(|(pin, level)| {
                            vm.set_irq_line(pin, level)
                                .err()
                                .map(|e| Outcome::VmmError(format!("KVM_IRQ_LINE({pin}): {e}")))
                        });
                        irq.or(o.end())
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    why = ExitReason::MmioRead;
                    if !sh.clocks.mmio_read(addr, data) {
                        sh.wild_mmio.hit(addr);
                        data.fill(0xFF);
                    }
                    None
                }
                VcpuExit::MmioWrite(addr, data) => {
                    why = ExitReason::MmioWrite;
                    if !sh.clocks.mmio_write(addr, data) {
                        sh.wild_mmio.hit(addr);
                    }
                    None
                }
                VcpuExit::Hlt => {
                    why = ExitReason::Hlt;
                    None
                }
                VcpuExit::IrqWindowOpen => {
                    why = ExitReason::IrqWindow;
                    None
                }
                VcpuExit::Intr => {
                    why = ExitReason::Kick;
                    None
                }
                VcpuExit::Shutdown => Some(Outcome::GuestCrash(format!(
                    "vcpu{me}: triple fault (KVM_EXIT_SHUTDOWN)"
                ))),
                VcpuExit::InternalError => {
                    let r = match &sh.soft_int_ram {
                        Some(ram) => vlapic_kvm::softint::deliver_at_rip(fd, ram),
                        None => Ok(vlapic_kvm::softint::SoftIntOutcome::NotSoftInt),
                    };
                    soft_int(sh, r).map(|o| match o {
                        // Where it stopped and why, as on the userspace irqchip.
                        Outcome::GuestCrash(m) => {
                            let internal = vlapic_kvm::vcpu::internal_error_of(fd);
                            Outcome::GuestCrash(crash_context(fd, me, &m, internal))
                        }
                        other => other,
                    })
                }
                other => Some(Outcome::GuestCrash(format!(
                    "vcpu{me}: unexpected VM exit {other:?}"
                ))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                why = ExitReason::Kick;
                None
            }
            Err(e) => Some(Outcome::VmmError(format!("KVM_RUN: {e}"))),
        };
        sh.exits.count(me, why);
        if let Some(o) = end {
            sh.finish(o);
            break;
        }
    }
    kick.unregister();
}
