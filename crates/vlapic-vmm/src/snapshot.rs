//! A vCPU's KVM state for live migration (regs, sregs, XSAVE, XCRs, MSRs, events,
//! debug registers), saved from one VM and loaded into a vCPU of another.

use kvm_bindings::{
    kvm_debugregs, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};

/// IA32_TSC: rewritten at restore so the guest TSC runs on without a jump.
pub const MSR_IA32_TSC: u32 = 0x10;

/// MSRs not moved through KVM: the APIC's (the VMM owns them) and KVM's
/// paravirtual ones (kvmclock, PV EOI, ...: not offered in our CPUID).
fn not_saved(msr: u32) -> bool {
    vlapic::is_apic_msr(msr)
        || (0x4b56_4d00..=0x4b56_4dff).contains(&msr)
        || msr == 0x11
        || msr == 0x12
}

/// The MSRs KVM can save for this host (from KVM_GET_MSR_INDEX_LIST), minus the APIC's.
pub fn msr_list(kvm: &Kvm) -> Result<Vec<u32>, String> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| format!("KVM_GET_MSR_INDEX_LIST: {e}"))?;
    Ok(list
        .as_slice()
        .iter()
        .copied()
        .filter(|m| !not_saved(*m))
        .collect())
}

/// Everything KVM holds for one vCPU.
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    events: kvm_vcpu_events,
    debugregs: kvm_debugregs,
    msrs: Vec<kvm_msr_entry>,
}

fn e(what: &str) -> impl Fn(kvm_ioctls::Error) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// Reads as many of `indices` as KVM will give, dropping the ones it refuses.
fn get_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, String> {
    let mut want: Vec<u32> = indices.to_vec();
    loop {
        let entries: Vec<kvm_msr_entry> = want
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|err| format!("MSR list: {err:?}"))?;
        let n = fd.get_msrs(&mut msrs).map_err(e("KVM_GET_MSRS"))?;
        if n >= want.len() {
            return Ok(msrs.as_slice().to_vec());
        }
        // Entry `n` was refused: drop it and retry.
        want.remove(n);
    }
}

impl VcpuState {
    /// Saves the state of `fd` (call from the thread that runs it, while it is out of KVM_RUN).
    pub fn save(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, String> {
        Ok(Self {
            regs: fd.get_regs().map_err(e("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(e("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?,
            events: fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?,
            debugregs: fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?,
            msrs: get_msrs(fd, msr_indices)?,
        })
    }

    /// Loads this state into the fresh vCPU `fd`, with the guest TSC set to `tsc`.
    pub fn restore(&self, fd: &VcpuFd, tsc: u64) -> Result<(), String> {
        fd.set_sregs(&self.sregs).map_err(e("KVM_SET_SREGS"))?;
        fd.set_xcrs(&self.xcrs).map_err(e("KVM_SET_XCRS"))?;
        // SAFETY: `self.xsave` is a complete kvm_xsave read by KVM_GET_XSAVE on this
        // host (same CPUID, same XSAVE size); KVM only reads it.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
        let mut entries = self.msrs.clone();
        for m in entries.iter_mut() {
            if m.index == MSR_IA32_TSC {
                m.data = tsc;
            }
        }
        // KVM stops at the first MSR it refuses; one that still holds its reset
        // value (0) loses nothing when skipped, any other is an error.
        while !entries.is_empty() {
            let msrs = Msrs::from_entries(&entries).map_err(|err| format!("MSR list: {err:?}"))?;
            let n = fd.set_msrs(&msrs).map_err(e("KVM_SET_MSRS"))?;
            let Some(bad) = entries.get(n).copied() else {
                break;
            };
            if bad.data != 0 {
                return Err(format!(
                    "KVM_SET_MSRS refused MSR {:#x} = {:#x}",
                    bad.index, bad.data
                ));
            }
            entries.drain(..=n);
        }
        fd.set_regs(&self.regs).map_err(e("KVM_SET_REGS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(e("KVM_SET_DEBUGREGS"))?;
        fd.set_vcpu_events(&self.events)
            .map_err(e("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// RIP (for reports).
    pub fn rip(&self) -> u64 {
        self.regs.rip
    }
}
