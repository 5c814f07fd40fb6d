//! VM time: nanoseconds derived from the guest TSC, so that the LAPIC timer,
//! TSC-deadline and the host timers that kick vCPUs all share one clock.

/// Reads the host TSC.
fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86-64 CPU KVM runs on has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The guest TSC as seen from the host, and its frequency (clones share the offset).
#[derive(Clone, Debug)]
pub struct VmClock {
    /// Host TSC minus guest TSC (KVM's TSC offset, measured once).
    offset: Arc<AtomicU64>,
    /// Guest TSC frequency in Hz (KVM_GET_TSC_KHZ × 1000).
    tsc_hz: u64,
}

impl VmClock {
    /// A clock for a guest whose TSC read `guest_tsc` when the host TSC read
    /// `host_tsc`, ticking at `tsc_hz`.
    pub fn new(host_tsc: u64, guest_tsc: u64, tsc_hz: u64) -> Self {
        Self {
            offset: Arc::new(AtomicU64::new(host_tsc.wrapping_sub(guest_tsc))),
            tsc_hz: tsc_hz.max(1),
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
        let ns = u128::from(self.guest_tsc()) * 1_000_000_000 / u128::from(self.tsc_hz);
        u64::try_from(ns).unwrap_or(u64::MAX)
    }
}
