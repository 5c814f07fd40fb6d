//! VM time: nanoseconds derived from the guest TSC, so that the LAPIC timer,
//! TSC-deadline and the host timers that kick vCPUs all share one clock.

/// Reads the host TSC.
fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86-64 CPU KVM runs on has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// IA32_TSC.
const IA32_TSC: u32 = 0x10;

/// The guest TSC as seen from the host, and its frequency (clones share the offset).
#[derive(Clone, Debug)]
pub struct VmClock {
    /// Host TSC minus guest TSC (KVM's TSC offset, measured once).
    offset: Arc<AtomicU64>,
    /// Guest TSC frequency in Hz (KVM_GET_TSC_KHZ × 1000).
    tsc_hz: u64,
    /// 10⁹ / tsc_hz as a 64.64 fixed-point number (integer part, fraction): ns without
    /// a 128-bit division on every exit, never above the exact value (so a deadline
    /// never fires early) and at most 1 ns below it.
    mult: (u64, u64),
}

impl VmClock {
    /// The clock of the VM `fd` belongs to: the guest TSC frequency from
    /// `KVM_GET_TSC_KHZ` and its offset from one read of IA32_TSC paired with the
    /// host TSC. Every vCPU of a VM shares the TSC offset KVM gave the first one
    /// (KVM synchronises TSCs written within a second), so one reading serves all.
    pub fn from_vcpu(fd: &kvm_ioctls::VcpuFd) -> Result<Self, crate::Error> {
        let khz = fd
            .get_tsc_khz()
            .map_err(|e| crate::Error::kvm("KVM_GET_TSC_KHZ", e))?;
        let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: IA32_TSC,
            ..Default::default()
        }])
        .map_err(|e| crate::Error::Host(format!("MSR list: {e:?}")))?;
        let host = Self::host_tsc();
        fd.get_msrs(&mut msrs)
            .map_err(|e| crate::Error::kvm("KVM_GET_MSRS(IA32_TSC)", e))?;
        let guest = msrs.as_slice().first().map_or(0, |m| m.data);
        Ok(Self::new(host, guest, u64::from(khz) * 1000))
    }

    /// A clock for a guest whose TSC read `guest_tsc` when the host TSC read
    /// `host_tsc`, ticking at `tsc_hz`.
    pub fn new(host_tsc: u64, guest_tsc: u64, tsc_hz: u64) -> Self {
        let tsc_hz = tsc_hz.max(1);
        let int = 1_000_000_000 / tsc_hz;
        let frac = (u128::from(1_000_000_000 % tsc_hz) << 64) / u128::from(tsc_hz);
        let mult = (int, u64::try_from(frac).unwrap_or(u64::MAX));
        Self {
            offset: Arc::new(AtomicU64::new(host_tsc.wrapping_sub(guest_tsc))),
            tsc_hz,
            mult,
        }
    }

    /// The host TSC now (to pair with a guest TSC read for [`VmClock::new`]).
    pub fn host_tsc() -> u64 {
        rdtsc()
    }

    /// Guest TSC frequency in Hz.
    pub fn tsc_hz(&self) -> u64 {
        self.tsc_hz
    }

    /// The guest TSC now.
    pub fn guest_tsc(&self) -> u64 {
        rdtsc().wrapping_sub(self.offset.load(Ordering::Acquire))
    }

    /// VM time now: `guest_tsc × 10^9 / tsc_hz` nanoseconds.
    pub fn now_ns(&self) -> u64 {
        self.ns_of_tsc(self.guest_tsc())
    }

    /// VM time at guest TSC `tsc`: `tsc × 10⁹ / tsc_hz` rounded down, or 1 ns less.
    pub fn ns_of_tsc(&self, tsc: u64) -> u64 {
        let (int, frac) = self.mult;
        let ns = u128::from(tsc) * u128::from(int) + ((u128::from(tsc) * u128::from(frac)) >> 64);
        u64::try_from(ns).unwrap_or(u64::MAX)
    }

    /// The guest TSC at VM time `ns` (the inverse of [`VmClock::ns_of_tsc`]).
    pub fn tsc_of_ns(&self, ns: u64) -> u64 {
        let t = u128::from(ns) * u128::from(self.tsc_hz) / 1_000_000_000;
        u64::try_from(t).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixed-point conversion never runs ahead of the exact one (a TSC deadline
    /// must not fire before the guest's TSC reaches it) and trails it by at most 1 ns.
    #[test]
    fn fixed_point_time_is_exact_or_just_behind() {
        for hz in [
            1_000_000_000u64,
            2_100_000_000,
            2_399_999_000,
            3_000_001_000,
            25_000_000,
        ] {
            let c = VmClock::new(0, 0, hz);
            for tsc in [0u64, 1, 999, 123_456_789, 1 << 40, 1 << 50, u64::MAX / 4096] {
                let exact =
                    u64::try_from(u128::from(tsc) * 1_000_000_000 / u128::from(hz)).unwrap();
                let ns = c.ns_of_tsc(tsc);
                assert!(
                    ns <= exact && exact - ns <= 1,
                    "hz {hz} tsc {tsc}: {ns} vs {exact}"
                );
            }
        }
    }
}
