//! Adapters for rust-vmm device crates (feature `rust-vmm`): vm-superio's `Trigger`
//! for an IOAPIC pin and vm-device's MMIO trait for the IOAPIC page.
//!
//! Both sit on [`Platform`], a small trait for the two things a device thread needs
//! from the VMM: VM time and kicking the vCPUs a fabric operation woke.
//! [`ApicRuntime`] implements it.
//!
//! ```
//! use std::sync::Arc;
//! use vlapic::fabric::{FabricConfig, SharedFabric, Wake};
//! use vlapic_kvm::rust_vmm::{IoapicPin, Platform};
//! use vm_superio::Trigger;
//!
//! /// A platform for a test: time stands still, kicks are counted.
//! struct Still(Arc<SharedFabric>);
//! impl Platform for Still {
//!     fn fabric(&self) -> Arc<SharedFabric> { self.0.clone() }
//!     fn now_ns(&self) -> u64 { 0 }
//!     fn kick(&self, _wake: &Wake) {}
//! }
//! let fabric = Arc::new(SharedFabric::new(FabricConfig::with_vcpus(1)));
//! fabric.lapic_mmio_write(0, 0xF0, &0x1FFu32.to_le_bytes(), 0); // SVR: enable
//! fabric.with_ioapic(|io| io.set_entry(4, 0x34)); // pin 4 -> vector 0x34, edge, APIC 0
//! let com1 = IoapicPin::new(Arc::new(Still(fabric.clone())), 4);
//! com1.trigger().unwrap();
//! assert_eq!(fabric.read_apic(0, |a| a.pending_vector()), Some(Some(0x34)));
//! ```

use std::sync::Arc;

use vlapic::fabric::{SharedFabric, Wake};
use vm_device::bus::{MmioAddress, MmioAddressOffset};

use crate::ApicRuntime;

/// What device adapters need from the VMM: the current fabric, VM time, kicks.
pub trait Platform: Send + Sync {
    /// The VM's fabric now (it may be replaced by a migration).
    fn fabric(&self) -> Arc<SharedFabric>;
    /// VM time now, in nanoseconds.
    fn now_ns(&self) -> u64;
    /// Kicks the vCPUs in `wake`.
    fn kick(&self, wake: &Wake);
}

impl Platform for ApicRuntime {
    fn fabric(&self) -> Arc<SharedFabric> {
        ApicRuntime::fabric(self)
    }

    fn now_ns(&self) -> u64 {
        ApicRuntime::now_ns(self)
    }

    fn kick(&self, wake: &Wake) {
        self.wake(wake);
    }
}

/// An IOAPIC input pin as a vm-superio interrupt line. `trigger()` pulses the pin
/// (assert, then de-assert), the way KVM's irqfd drives an IOAPIC pin: an
/// edge-triggered entry sees one rising edge; a level-triggered one latches remote
/// IRR and delivers once until the guest's EOI.
pub struct IoapicPin<P: Platform> {
    platform: Arc<P>,
    pin: u32,
}

impl<P: Platform> IoapicPin<P> {
    /// The line into IOAPIC pin `pin`.
    pub fn new(platform: Arc<P>, pin: u32) -> Self {
        Self { platform, pin }
    }

    /// Drives the pin to `level` (for devices that hold a level).
    pub fn set_level(&self, level: bool) {
        let f = self.platform.fabric();
        let w = f.set_irq_line(self.pin, level, self.platform.now_ns());
        self.platform.kick(&w);
    }
}

impl<P: Platform> vm_superio::Trigger for IoapicPin<P> {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.set_level(true);
        self.set_level(false);
        Ok(())
    }
}

/// The IOAPIC page as a vm-device MMIO device (`DeviceMmio`, shared by reference):
/// register it on a vm-device bus at the IOAPIC's base. Offsets are within the page.
pub struct IoapicMmio<P: Platform> {
    platform: Arc<P>,
}

impl<P: Platform> IoapicMmio<P> {
    /// The IOAPIC page of `platform`'s fabric.
    pub fn new(platform: Arc<P>) -> Self {
        Self { platform }
    }
}

impl<P: Platform> vm_device::DeviceMmio for IoapicMmio<P> {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let f = self.platform.fabric();
        f.ioapic_mmio_read(offset & 0xFFF, data, self.platform.now_ns());
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        let f = self.platform.fabric();
        let w = f.ioapic_mmio_write(offset & 0xFFF, data, self.platform.now_ns());
        self.platform.kick(&w);
    }
}
