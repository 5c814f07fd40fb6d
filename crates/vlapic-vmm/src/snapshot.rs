//! A vCPU's KVM state for live migration (regs, sregs, XSAVE, XCRs, MSRs, events,
//! debug registers), saved from one VM and loaded into a vCPU of another.

use kvm_bindings::{
    kvm_debugregs, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::wire::{Reader, Writer};

/// Most MSRs accepted in a save file.
const MAX_MSRS: usize = 4096;

fn put<T: IntoBytes + Immutable>(w: &mut Writer, v: &T) {
    w.bytes(v.as_bytes());
}

fn get<T: FromBytes>(r: &mut Reader<'_>, name: &str) -> Result<T, String> {
    let want = std::mem::size_of::<T>();
    let b = r.bytes(1 << 20)?;
    if b.len() != want {
        return Err(r.err(format!(
            "{name} is {} bytes, this build's is {want}",
            b.len()
        )));
    }
    T::read_from_bytes(b).map_err(|_| r.err(format!("{name}: bad size")))
}

/// IA32_TSC: rewritten at restore so the guest TSC runs on without a jump.
pub const MSR_IA32_TSC: u32 = 0x10;

/// MSR_KVM_WALL_CLOCK_NEW and MSR_KVM_SYSTEM_TIME_NEW: kvmclock, which CPUID offers
/// (KVM_FEATURE_CLOCKSOURCE2) and KVM implements without its in-kernel APIC.
pub const KVMCLOCK_MSRS: [u32; 2] = [0x4b56_4d00, 0x4b56_4d01];

/// MSRs not moved through KVM: the APIC's (the VMM owns them) and KVM's other
/// paravirtual ones (PV EOI, async PF, steal time, ...: not offered in our CPUID),
/// and the old kvmclock pair 0x11/0x12 (CPUID offers the new one).
fn not_saved(msr: u32) -> bool {
    vlapic::is_apic_msr(msr)
        || ((0x4b56_4d00..=0x4b56_4dff).contains(&msr) && !KVMCLOCK_MSRS.contains(&msr))
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

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        // kvm_xsave is not Clone (its flexible array member); its bytes are all of it.
        let mut xsave = kvm_xsave::default();
        xsave.region = self.xsave.region;
        Self {
            regs: self.regs,
            sregs: self.sregs,
            xsave,
            xcrs: self.xcrs,
            events: self.events,
            debugregs: self.debugregs,
            msrs: self.msrs.clone(),
        }
    }
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

    /// The saved value of MSR `index`, if it was saved.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|m| m.index == index).map(|m| m.data)
    }

    /// Loads this state into the fresh vCPU `fd`; IA32_TSC is written last, with the
    /// value `tsc()` returns at that moment, so the guest TSC does not step back by the
    /// time the other ioctls took (a step back makes guest-measured intervals that span
    /// a migration short, and timers look early).
    pub fn restore(&self, fd: &VcpuFd, tsc: impl Fn() -> u64) -> Result<(), String> {
        fd.set_sregs(&self.sregs).map_err(e("KVM_SET_SREGS"))?;
        fd.set_xcrs(&self.xcrs).map_err(e("KVM_SET_XCRS"))?;
        // SAFETY: `self.xsave` is a complete kvm_xsave read by KVM_GET_XSAVE on this
        // host (same CPUID, same XSAVE size); KVM only reads it.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
        let mut entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .copied()
            .filter(|m| m.index != MSR_IA32_TSC)
            .collect();
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
        if self.msrs.iter().any(|m| m.index == MSR_IA32_TSC) {
            let entry = kvm_msr_entry {
                index: MSR_IA32_TSC,
                data: tsc(),
                ..Default::default()
            };
            let msrs = Msrs::from_entries(&[entry]).map_err(|err| format!("MSR list: {err:?}"))?;
            fd.set_msrs(&msrs).map_err(e("KVM_SET_MSRS (IA32_TSC)"))?;
        }
        Ok(())
    }

    /// Appends the save-file form: each KVM structure as its raw bytes (u32 length
    /// first, checked against this build's size at decode), then the MSRs.
    pub fn encode(&self, w: &mut Writer) {
        put(w, &self.regs);
        put(w, &self.sregs);
        put(w, &self.xsave);
        put(w, &self.xcrs);
        put(w, &self.events);
        put(w, &self.debugregs);
        w.u32(self.msrs.len() as u32);
        for m in &self.msrs {
            w.u32(m.index);
            w.u64(m.data);
        }
    }

    /// Reads what [`VcpuState::encode`] wrote.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, String> {
        let regs = get(r, "kvm_regs")?;
        let sregs = get(r, "kvm_sregs")?;
        let xsave = get(r, "kvm_xsave")?;
        let xcrs: kvm_xcrs = get(r, "kvm_xcrs")?;
        if xcrs.nr_xcrs as usize > xcrs.xcrs.len() {
            return Err(r.err(format!("kvm_xcrs: {} XCRs", xcrs.nr_xcrs)));
        }
        let events = get(r, "kvm_vcpu_events")?;
        let debugregs = get(r, "kvm_debugregs")?;
        let n = r.count(MAX_MSRS, "MSRs")?;
        let mut msrs = Vec::with_capacity(n);
        for _ in 0..n {
            msrs.push(kvm_msr_entry {
                index: r.u32()?,
                data: r.u64()?,
                ..Default::default()
            });
        }
        Ok(Self {
            regs,
            sregs,
            xsave,
            xcrs,
            events,
            debugregs,
            msrs,
        })
    }

    /// An all-zero state with a few MSRs (for format tests).
    #[cfg(test)]
    pub(crate) fn blank() -> Self {
        Self {
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            events: kvm_vcpu_events::default(),
            debugregs: kvm_debugregs::default(),
            msrs: vec![
                kvm_msr_entry {
                    index: MSR_IA32_TSC,
                    data: 1234,
                    ..Default::default()
                },
                kvm_msr_entry {
                    index: 0xC000_0080,
                    data: 0x500,
                    ..Default::default()
                },
            ],
        }
    }

    /// The guest TSC (IA32_TSC) when saved, if KVM gave it.
    pub fn tsc(&self) -> Option<u64> {
        self.msrs
            .iter()
            .find(|m| m.index == MSR_IA32_TSC)
            .map(|m| m.data)
    }

    /// RIP (for reports).
    pub fn rip(&self) -> u64 {
        self.regs.rip
    }
}
