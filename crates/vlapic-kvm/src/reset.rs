//! INIT and SIPI for a vCPU whose APIC lives in userspace: the INIT reset of the
//! register state (SDM Vol. 3A §9.1.1) and the real-mode start at `vector << 12`.

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_vcpu_events};
use kvm_ioctls::VcpuFd;

use crate::Error;

/// Drops whatever KVM still queued for the old context: an injected vector, a
/// pending NMI or exception, an interrupt shadow.
fn clear_events(fd: &VcpuFd) -> Result<(), Error> {
    let events = kvm_vcpu_events {
        flags: kvm_bindings::KVM_VCPUEVENT_VALID_NMI_PENDING
            | kvm_bindings::KVM_VCPUEVENT_VALID_SHADOW,
        ..Default::default()
    };
    fd.set_vcpu_events(&events)
        .map_err(|e| Error::kvm("KVM_SET_VCPU_EVENTS", e))
}

/// INIT: the processor state after INIT (SDM Vol. 3A Table 9-1): real mode, CS
/// selector 0xF000 with base 0xFFFF0000, IP 0xFFF0, EFLAGS 2, general registers 0;
/// `template` is the vCPU's special registers as KVM created it (its reset state).
/// Queued events are dropped. x87/SSE state and MSRs are left alone, as INIT does.
pub(crate) fn init(fd: &VcpuFd, template: &kvm_sregs) -> Result<(), Error> {
    fd.set_sregs(template)
        .map_err(|e| Error::kvm("KVM_SET_SREGS (INIT)", e))?;
    let regs = kvm_regs {
        rflags: 2,
        rip: 0xFFF0,
        ..kvm_regs::default()
    };
    fd.set_regs(&regs)
        .map_err(|e| Error::kvm("KVM_SET_REGS (INIT)", e))?;
    clear_events(fd)
}

/// SIPI with `vector` to a vCPU in wait-for-SIPI: real mode at CS selector
/// `vector << 8`, base `vector << 12`, IP 0 (SDM Vol. 3A §11.6.1, §9.4.4).
pub(crate) fn sipi(fd: &VcpuFd, template: &kvm_sregs, vector: u8) -> Result<(), Error> {
    let mut s = *template;
    s.cs.selector = u16::from(vector) << 8;
    s.cs.base = u64::from(vector) << 12;
    fd.set_sregs(&s)
        .map_err(|e| Error::kvm("KVM_SET_SREGS (SIPI)", e))?;
    let regs = kvm_regs {
        rflags: 2,
        rip: 0,
        ..kvm_regs::default()
    };
    fd.set_regs(&regs)
        .map_err(|e| Error::kvm("KVM_SET_REGS (SIPI)", e))?;
    clear_events(fd)?;
    // The start-up state of the FPU as at power-up (what QEMU and real firmware leave
    // an AP with); the test guests rely on FCW/MXCSR defaults.
    crate::setup::init_fpu(fd)
}
