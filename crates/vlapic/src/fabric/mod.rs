//! The VM-level interrupt fabric: N local APICs, one IOAPIC and MSI, routing every message
//! between them and reporting exactly which vCPUs need a kick ([`Wake`]).
//!
//! Two front ends share one routing core and one implementation of every operation
//! (`fabric/ops.rs`); they differ only in how they reach an APIC:
//!
//! * [`Fabric`] (no `std`, needs `alloc`): owns the APICs and the IOAPIC, `&mut self`
//!   everywhere; for single-threaded VMMs, tests and tools.
//! * [`SharedFabric`] (feature `std`): `Send + Sync`, one per VM, shared by the vCPU
//!   threads. See "Threads" below.
//!
//! # Delivery
//!
//! A message is resolved to target APICs by [`crate::routing`]; each target then gets
//! [`LocalApic::deliver`](crate::LocalApic::deliver) (fixed vectors into IRR/TMR, NMI/SMI/INIT/SIPI/ExtINT into
//! [`crate::Events`]; INIT resets the target keeping its ID and mode). A vCPU is in
//! the returned [`Wake`] when its APIC took the message and now has work
//! ([`LocalApic::needs_kick`](crate::LocalApic::needs_kick): work to take, or a vector only TPR holds back). Messages that match nothing (a nonexistent ID, say)
//! are dropped. Every access goes through the fabric, and after each one the APIC's
//! routing view (ID, LDR, DFR, mode, enable) is compared with the map's; a
//! difference marks the map stale and it is rebuilt before the next lookup. The
//! `routing_changed` effect is therefore not needed, and state changed behind the
//! ICR (INIT, imports, resets done inside [`SharedFabric::with_apic`]) is caught too.
//!
//! # Lowest priority (SDM §11.6.2.4)
//!
//! Among the targets that are software-enabled, the one with the lowest processor
//! priority (PPR, all 8 bits) wins. Ties go to the first target at or after a
//! rotating arbitration pointer, which then moves just past the winner, so repeated
//! ties rotate over the tied APICs (the P6 rotating arbitration ID). No
//! software-enabled target: the message is dropped. The priorities are read one
//! lock at a time, so the winner can be software-disabled by its own vCPU before the
//! delivery reaches it; it then refuses, and arbitration runs again among the
//! candidates that have not refused (at most once per candidate). A message is
//! therefore lost only if no destination accepts it when it arrives. The same applies to an MSI with
//! the redirection hint and to IOAPIC entries in lowest-priority mode. Focus
//! processor checking is not modelled (SVR bit 9 is reserved since the Pentium 4).
//!
//! # Threads
//!
//! [`SharedFabric`] has one mutex per APIC, a mutex for the IOAPIC and a read-mostly
//! published map. A call locks at most one APIC at a time: the sender's lock is
//! released before any target is locked; targets are locked one after the other,
//! each only for its `deliver` (lowest-priority arbitration reads each candidate's
//! PPR under its lock, one by one). Lock order: IOAPIC → one APIC → view table →
//! published map; nothing is ever taken against that order, so there is no
//! deadlock. A vCPU thread holds its own APIC lock only while it handles an exit,
//! so senders wait at most that long. The closure given to
//! [`SharedFabric::with_apic`] runs under that vCPU's lock and must not call back
//! into the fabric (that would hold two APIC locks, or deadlock on its own).
//!
//! ```
//! use vlapic::fabric::{FabricConfig, SharedFabric};
//!
//! let fabric = SharedFabric::new(FabricConfig::with_vcpus(2));
//! let svr = 0xFEE0_00F0; // MMIO exits carry guest-physical addresses
//! for vcpu in 0..2 {
//!     fabric.mmio_write(vcpu, svr, &0x1FFu32.to_le_bytes(), 0); // SVR: enable
//! }
//! // vCPU 0's thread: the guest writes ICR high (destination 1), then ICR low.
//! fabric.mmio_write(0, 0xFEE0_0310, &(1u32 << 24).to_le_bytes(), 0);
//! let wake = fabric.mmio_write(0, 0xFEE0_0300, &0x4041u32.to_le_bytes(), 0).unwrap();
//! assert_eq!(wake.iter().collect::<Vec<_>>(), [1]); // kick vCPU 1 only
//! // vCPU 1's thread, before entering the guest (interrupts open): the entry plan.
//! let plan = fabric.plan_entry(1, 0, true).unwrap();
//! assert_eq!(plan.inject, Some(0x41)); // acknowledged: inject it
//! assert!(!plan.request_window);
//! assert_eq!(fabric.read_apic(1, |apic| apic.ppr()), Some(0x40));
//! // Not an interrupt-controller page: the VMM's other devices get it.
//! assert!(!fabric.mmio_read(1, 0xFED0_0000, &mut [0u8; 4], 0));
//! ```

pub use crate::ioapic::IoApic;
pub use crate::msi::MsiError;

use crate::lapic::{ApicMode, LapicConfig};
use alloc::vec::Vec;

mod core;
mod ops;
mod seam;
#[cfg(feature = "std")]
mod shared;
mod single;
#[cfg(test)]
mod tests;

#[cfg(feature = "std")]
#[cfg_attr(docsrs, doc(cfg(feature = "std")))]
pub use shared::SharedFabric;
pub use single::Fabric;

/// Construction-time description of a VM's interrupt hardware.
///
/// Non-exhaustive: start from [`FabricConfig::with_vcpus`] or
/// [`FabricConfig::from_apics`] and change what differs with the `with_*` methods.
///
/// ```
/// use vlapic::fabric::FabricConfig;
/// use vlapic::LapicConfig;
/// let cfg = FabricConfig::with_vcpus(2).with_ioapic_id(2).with_ioapic_pins(48);
/// assert_eq!((cfg.apics.len(), cfg.ioapic_id, cfg.ioapic_pins), (2, 2, 48));
/// let odd = FabricConfig::from_apics(vec![LapicConfig::with_id(0), LapicConfig::with_id(7)]);
/// assert_eq!(odd.apics[1].apic_id, 7);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FabricConfig {
    /// One entry per vCPU, in vCPU-index order.
    pub apics: Vec<LapicConfig>,
    /// IOAPIC pin count (default 24, clamped to 1..=120).
    pub ioapic_pins: u8,
    /// IOAPIC ID (4 bits).
    pub ioapic_id: u8,
    /// Guest-physical address of the IOAPIC's 4 KiB MMIO page, for the dispatch by
    /// address of [`Fabric::mmio_read`] and friends (default
    /// [`IoApic::DEFAULT_BASE`], 0xFEC0_0000; bits 11:0 are ignored).
    pub ioapic_base: u64,
}

impl FabricConfig {
    /// `n` vCPUs with APIC IDs 0..n, vCPU 0 the BSP; xAPIC mode at power-up when every
    /// ID fits in 8 bits, else x2APIC mode; 24 IOAPIC pins with ID 0 at 0xFEC0_0000.
    pub fn with_vcpus(n: usize) -> Self {
        let x2 = n > 0xFF;
        let apics = (0..n)
            .map(|i| {
                let mut c = LapicConfig::with_id(u32::try_from(i).unwrap_or(u32::MAX));
                if x2 {
                    c.mode = ApicMode::X2Apic;
                }
                c
            })
            .collect();
        Self::from_apics(apics)
    }

    /// One vCPU per entry of `apics`, in vCPU-index order; 24 IOAPIC pins with ID 0
    /// at 0xFEC0_0000.
    pub fn from_apics(apics: Vec<LapicConfig>) -> Self {
        Self {
            apics,
            ioapic_pins: IoApic::DEFAULT_PINS,
            ioapic_id: 0,
            ioapic_base: IoApic::DEFAULT_BASE,
        }
    }

    /// The same configuration with `pins` IOAPIC pins ([`FabricConfig::ioapic_pins`]).
    #[must_use]
    pub fn with_ioapic_pins(mut self, pins: u8) -> Self {
        self.ioapic_pins = pins;
        self
    }

    /// The same configuration with IOAPIC ID `id` ([`FabricConfig::ioapic_id`]).
    #[must_use]
    pub fn with_ioapic_id(mut self, id: u8) -> Self {
        self.ioapic_id = id;
        self
    }

    /// The same configuration with the IOAPIC page at `base`
    /// ([`FabricConfig::ioapic_base`]).
    #[must_use]
    pub fn with_ioapic_base(mut self, base: u64) -> Self {
        self.ioapic_base = base;
        self
    }
}

impl Default for FabricConfig {
    /// One vCPU (the BSP, APIC ID 0), 24 IOAPIC pins.
    fn default() -> Self {
        Self::with_vcpus(1)
    }
}

/// The vCPUs that need a kick after a fabric operation, sorted, each once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wake {
    /// The vCPU to kick when there is exactly one (the unicast case: no allocation).
    one: Option<u32>,
    /// Every vCPU to kick when there are two or more; empty otherwise (once normalized).
    vcpus: Vec<u32>,
    timer_changed: bool,
}

impl Wake {
    /// No vCPU to kick.
    pub fn is_empty(&self) -> bool {
        self.one.is_none() && self.vcpus.is_empty()
    }

    /// Number of vCPUs to kick.
    pub fn len(&self) -> usize {
        usize::from(self.one.is_some()).saturating_add(self.vcpus.len())
    }

    /// The vCPU indices to kick, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.one
            .iter()
            .chain(self.vcpus.iter())
            .map(|&v| v as usize)
    }

    /// Whether `vcpu` must be kicked.
    pub fn contains(&self, vcpu: usize) -> bool {
        u32::try_from(vcpu)
            .is_ok_and(|v| self.one == Some(v) || self.vcpus.binary_search(&v).is_ok())
    }

    /// The accessing APIC reported a timer change (re-read its
    /// [`LocalApic::next_timer_deadline`](crate::LocalApic::next_timer_deadline)).
    pub fn timer_changed(&self) -> bool {
        self.timer_changed
    }

    /// Adds the vCPUs of `other` (and its timer flag).
    pub fn merge(&mut self, other: &Wake) {
        for v in other.iter() {
            self.push(v);
        }
        self.timer_changed |= other.timer_changed;
        self.normalize();
    }

    fn push(&mut self, vcpu: usize) {
        let Ok(v) = u32::try_from(vcpu) else {
            return;
        };
        if !self.vcpus.is_empty() {
            self.vcpus.push(v);
            return;
        }
        match self.one {
            None => self.one = Some(v),
            Some(o) if o == v => {}
            Some(o) => {
                self.one = None;
                self.vcpus.extend_from_slice(&[o, v]);
            }
        }
    }

    /// Sorts and deduplicates; exactly one vCPU is kept in `one`, more in `vcpus`.
    fn normalize(&mut self) {
        if self.vcpus.is_empty() {
            return;
        }
        if let Some(o) = self.one.take() {
            self.vcpus.push(o);
        }
        if self.vcpus.len() > 1 {
            self.vcpus.sort_unstable();
            self.vcpus.dedup();
        }
        if self.vcpus.len() == 1 {
            self.one = self.vcpus.pop();
        }
    }
}

// ----- the routing core --------------------------------------------------------
