//! Run statistics kept while the guest runs: exits by reason per vCPU and counts of
//! odd guest accesses (unknown ports, wild MMIO, #GP MSRs).

use std::sync::atomic::{AtomicU64, Ordering};

/// Exit reasons counted per vCPU (index into [`ExitCounts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum ExitReason {
    /// Port read.
    IoIn,
    /// Port write.
    IoOut,
    /// MMIO read (LAPIC, IOAPIC or unbacked).
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// RDMSR to userspace (x2APIC, APIC base, TSC deadline, invalid).
    Rdmsr,
    /// WRMSR to userspace.
    Wrmsr,
    /// HLT.
    Hlt,
    /// Interrupt window open.
    IrqWindow,
    /// Guest lowered CR8.
    SetTpr,
    /// KVM_RUN interrupted by a kick (EINTR) or KVM_EXIT_INTR.
    Kick,
    /// Anything else: fatal, except the emulation failures on `int3` / `int n` that
    /// the VMM delivered (also counted as software interrupts in the summary).
    Other,
}

/// Number of [`ExitReason`]s.
pub const EXIT_REASONS: usize = 11;

/// Names of the exit reasons, in index order.
pub const EXIT_NAMES: [&str; EXIT_REASONS] = [
    "io_in",
    "io_out",
    "mmio_read",
    "mmio_write",
    "rdmsr",
    "wrmsr",
    "hlt",
    "irq_window",
    "set_tpr",
    "kick",
    "other",
];

/// Exit counts by reason.
pub type ExitCounts = [u64; EXIT_REASONS];

/// Live exit counters, one row per vCPU (read by the console to attribute
/// exits to scenarios while the guest runs).
pub struct ExitStats {
    rows: Vec<[std::sync::atomic::AtomicU64; EXIT_REASONS]>,
}

impl ExitStats {
    /// Counters for `n` vCPUs.
    pub fn new(n: usize) -> Self {
        Self {
            rows: (0..n).map(|_| Default::default()).collect(),
        }
    }

    /// Counts one exit of `vcpu`.
    pub fn count(&self, vcpu: usize, r: ExitReason) {
        if let Some(c) = self.rows.get(vcpu).and_then(|row| row.get(r as usize)) {
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Sets one vCPU's counts (a restored run continues the saved ones).
    pub fn seed(&self, vcpu: usize, c: &ExitCounts) {
        if let Some(row) = self.rows.get(vcpu) {
            for (a, v) in row.iter().zip(c.iter()) {
                a.store(*v, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// One vCPU's counts.
    pub fn vcpu(&self, vcpu: usize) -> ExitCounts {
        let mut t = [0u64; EXIT_REASONS];
        if let Some(row) = self.rows.get(vcpu) {
            for (a, c) in t.iter_mut().zip(row.iter()) {
                *a = c.load(std::sync::atomic::Ordering::Relaxed);
            }
        }
        t
    }

    /// Counts summed over vCPUs.
    pub fn total(&self) -> ExitCounts {
        let mut t = [0u64; EXIT_REASONS];
        for i in 0..self.rows.len() {
            for (a, b) in t.iter_mut().zip(self.vcpu(i).iter()) {
                *a = a.saturating_add(*b);
            }
        }
        t
    }
}

/// `a - b` per reason.
pub fn exit_delta(a: &ExitCounts, b: &ExitCounts) -> ExitCounts {
    let mut d = [0u64; EXIT_REASONS];
    for ((d, a), b) in d.iter_mut().zip(a.iter()).zip(b.iter()) {
        *d = a.saturating_sub(*b);
    }
    d
}

/// "name n, name n" for the non-zero counts.
pub fn exit_list(c: &ExitCounts) -> String {
    EXIT_NAMES
        .iter()
        .zip(c.iter())
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A count of odd guest accesses and the first address (port, MSR) seen.
#[derive(Debug, Default)]
pub struct Odd {
    count: AtomicU64,
    first: AtomicU64,
}

impl Odd {
    /// Counts one access to `addr`.
    pub fn hit(&self, addr: u64) {
        if self.count.fetch_add(1, Ordering::Relaxed) == 0 {
            self.first.store(addr, Ordering::Relaxed);
        }
    }

    /// Sets the count and first address (a restored run continues the saved ones).
    pub fn set(&self, count: u64, first: u64) {
        self.count.store(count, Ordering::Relaxed);
        self.first.store(first, Ordering::Relaxed);
    }

    /// (count, first address).
    pub fn get(&self) -> (u64, u64) {
        (
            self.count.load(Ordering::Relaxed),
            self.first.load(Ordering::Relaxed),
        )
    }
}
