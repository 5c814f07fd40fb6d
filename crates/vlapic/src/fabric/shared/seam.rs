//! The VMM's per-exit calls on [`SharedFabric`]: the entry plan, read-only and CR8
//! access, and MMIO dispatch by guest-physical address, each under one APIC lock.

use super::super::ops;
use super::{lock, SharedFabric};
use crate::entry::EntryPlan;
use crate::fabric::Wake;
use crate::lapic::{GpFault, LocalApic};

impl SharedFabric {
    /// [`LocalApic::plan_entry`] on `vcpu`'s APIC, under its lock: the decision before
    /// entering the guest. `None` if the vCPU does not exist. Planning routes nothing
    /// (advancing the timer and acknowledging are local to the APIC).
    ///
    /// ```
    /// use vlapic::fabric::{FabricConfig, SharedFabric};
    ///
    /// let fabric = SharedFabric::new(FabricConfig::with_vcpus(1));
    /// fabric.mmio_write(0, 0xFEE0_00F0, &0x1FFu32.to_le_bytes(), 0); // SVR: enable
    /// fabric.msi(0xFEE0_0000, 0x41, 0).unwrap();                      // a device MSI
    /// let plan = fabric.plan_entry(0, 0, true).unwrap();
    /// assert_eq!(plan.inject, Some(0x41));
    /// assert_eq!(fabric.plan_entry(1, 0, true), None); // no such vCPU
    /// ```
    pub fn plan_entry(&self, vcpu: usize, now: u64, can_inject: bool) -> Option<EntryPlan> {
        // Planning cannot change the routing view (ID, LDR, DFR, enable, mode): no
        // view to compare and publish, just the lock (it runs before every entry).
        let mut slot = lock(self.apics.get(vcpu)?);
        Some(slot.apic.plan_entry(now, can_inject))
    }

    /// Runs `f` on `vcpu`'s APIC under its lock, read-only: no time passes, nothing
    /// is routed, no [`Effects`](crate::Effects) to return. `None` if the vCPU does not exist. `f`
    /// must not call into the fabric.
    pub fn read_apic<R>(&self, vcpu: usize, f: impl FnOnce(&LocalApic) -> R) -> Option<R> {
        let slot = lock(self.apics.get(vcpu)?);
        Some(f(&slot.apic))
    }

    /// Folds the guest's CR8 into `vcpu`'s TPR ([`LocalApic::set_cr8`]): `Err` is the
    /// #GP for bits 63:4 set. `None` if the vCPU does not exist.
    pub fn set_cr8(&self, vcpu: usize, cr8: u64) -> Option<Result<(), GpFault>> {
        // TPR is not part of the routing view (arbitration reads PPR live).
        let mut slot = lock(self.apics.get(vcpu)?);
        Some(slot.apic.set_cr8(cr8))
    }

    /// A guest read at guest-physical `gpa` by `vcpu`: its APIC page (at its
    /// IA32_APIC_BASE, whatever the mode; outside xAPIC mode it reads all ones) or
    /// else the IOAPIC page
    /// ([`FabricConfig::ioapic_base`](crate::fabric::FabricConfig::ioapic_base)), at
    /// offset `gpa & 0xFFF`. Returns false, leaving `data` untouched, when the address
    /// is neither (a nonexistent vCPU has no APIC page; the IOAPIC page is still
    /// served).
    ///
    /// The APIC's base is looked up under the same lock as the access, so a
    /// concurrent relocation cannot split them. An IOAPIC access first takes the
    /// APIC lock to rule out a coinciding APIC page, releases it, then takes the
    /// IOAPIC lock: never two locks at once.
    pub fn mmio_read(&self, vcpu: usize, gpa: u64, data: &mut [u8], now: u64) -> bool {
        ops::mmio_read(&mut &*self, vcpu, gpa, data, now)
    }

    /// A guest write at guest-physical `gpa` by `vcpu`, dispatched (and locked) as
    /// [`SharedFabric::mmio_read`] does. Returns the vCPUs to kick, or `None` when
    /// the address is neither `vcpu`'s APIC page nor the IOAPIC page.
    pub fn mmio_write(&self, vcpu: usize, gpa: u64, data: &[u8], now: u64) -> Option<Wake> {
        ops::mmio_write(&mut &*self, vcpu, gpa, data, now)
    }
}
