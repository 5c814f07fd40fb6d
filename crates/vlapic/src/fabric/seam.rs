//! The VMM's per-exit calls on [`Fabric`]: the entry plan, read-only and CR8 access,
//! and MMIO dispatch by guest-physical address (the APIC page wins over the IOAPIC's).

use super::ops;
use super::{Fabric, Wake};
use crate::entry::EntryPlan;
use crate::lapic::{GpFault, LocalApic};

/// Offset bits of a 4 KiB page.
pub(super) const PAGE_OFFSET: u64 = 0xFFF;

/// The 4 KiB page an APIC decodes: the address field of IA32_APIC_BASE (bits 12 up to
/// MAXPHYADDR), in every mode. Outside xAPIC mode the page reads all ones and ignores
/// writes ([`LocalApic::mmio_read`]), so it is claimed but inert.
pub(super) fn apic_page(apic: &LocalApic) -> u64 {
    apic.apic_base() & !PAGE_OFFSET & !apic.config().apic_base_reserved()
}

/// Whether `gpa` lies in the 4 KiB page at `base` (bits 11:0 of `base` ignored).
pub(super) fn in_page(gpa: u64, base: u64) -> bool {
    gpa & !PAGE_OFFSET == base & !PAGE_OFFSET
}

impl Fabric {
    /// [`LocalApic::plan_entry`] on `vcpu`'s APIC: the decision before entering the
    /// guest. `None` if the vCPU does not exist. Planning routes nothing (advancing
    /// the timer and acknowledging are local to the APIC).
    pub fn plan_entry(&mut self, vcpu: usize, now: u64, can_inject: bool) -> Option<EntryPlan> {
        self.core.with(vcpu, |a| a.plan_entry(now, can_inject))
    }

    /// Runs `f` on `vcpu`'s APIC, read-only: no time passes and nothing is routed.
    /// `None` if the vCPU does not exist. (Same as [`Fabric::apic`], for symmetry
    /// with [`SharedFabric::read_apic`](super::SharedFabric::read_apic).)
    pub fn read_apic<R>(&self, vcpu: usize, f: impl FnOnce(&LocalApic) -> R) -> Option<R> {
        self.core.apics.get(vcpu).map(f)
    }

    /// Folds the guest's CR8 into `vcpu`'s TPR ([`LocalApic::set_cr8`]): `Err` is the
    /// #GP for bits 63:4 set. `None` if the vCPU does not exist.
    pub fn set_cr8(&mut self, vcpu: usize, cr8: u64) -> Option<Result<(), GpFault>> {
        self.core.with(vcpu, |a| a.set_cr8(cr8))
    }

    /// A guest read at guest-physical `gpa` by `vcpu`: its APIC page (at its
    /// IA32_APIC_BASE, whatever the mode) or else the IOAPIC page
    /// ([`FabricConfig::ioapic_base`](super::FabricConfig::ioapic_base)), at offset
    /// `gpa & 0xFFF`. Returns false, leaving `data` untouched, when the address is
    /// neither (a nonexistent vCPU has no APIC page; the IOAPIC page is still served).
    pub fn mmio_read(&mut self, vcpu: usize, gpa: u64, data: &mut [u8], now: u64) -> bool {
        ops::mmio_read(self, vcpu, gpa, data, now)
    }

    /// A guest write at guest-physical `gpa` by `vcpu`, dispatched as
    /// [`Fabric::mmio_read`] does. Returns the vCPUs to kick, or `None` when the
    /// address is neither `vcpu`'s APIC page nor the IOAPIC page.
    pub fn mmio_write(&mut self, vcpu: usize, gpa: u64, data: &[u8], now: u64) -> Option<Wake> {
        ops::mmio_write(self, vcpu, gpa, data, now)
    }
}
