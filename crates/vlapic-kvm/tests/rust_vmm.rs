//! The rust-vmm adapters: a vm-superio 16550 whose interrupt line is an IOAPIC pin
//! reaches a local APIC's IRR; the IOAPIC page serves vm-device MMIO.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vlapic::fabric::{FabricConfig, SharedFabric, Wake};
use vlapic_kvm::rust_vmm::{IoapicMmio, IoapicPin, Platform};
use vm_device::bus::MmioAddress;
use vm_device::DeviceMmio;
use vm_superio::serial::NoEvents;
use vm_superio::Serial;

/// A platform whose time stands still and which counts kicks per vCPU.
struct Counting {
    fabric: Arc<SharedFabric>,
    kicks: AtomicUsize,
}

impl Platform for Counting {
    fn fabric(&self) -> Arc<SharedFabric> {
        self.fabric.clone()
    }
    fn now_ns(&self) -> u64 {
        0
    }
    fn kick(&self, wake: &Wake) {
        self.kicks.fetch_add(wake.len(), Ordering::Relaxed);
    }
}

/// COM1 on IOAPIC pin 4 (edge, vector 0x24, APIC 1): enabling the transmitter-empty
/// interrupt (IER bit 1) makes the 16550 raise its line (vm-superio), which the
/// IOAPIC routes to APIC 1's IRR and the platform kicks vCPU 1 (82093AA §3.2.4;
/// SDM Vol. 3A §11.8.3).
#[test]
fn serial_interrupt_reaches_the_lapic_irr() {
    let fabric = Arc::new(SharedFabric::new(FabricConfig::with_vcpus(2)));
    for v in 0..2 {
        fabric.lapic_mmio_write(v, 0xF0, &0x1FFu32.to_le_bytes(), 0);
    }
    let pf = Arc::new(Counting {
        fabric: fabric.clone(),
        kicks: AtomicUsize::new(0),
    });
    // Program the redirection entry through the IOAPIC page, as a guest does.
    let io = IoapicMmio::new(pf.clone());
    let base = MmioAddress(0xFEC0_0000);
    let reg = |index: u32, value: u32| {
        io.mmio_write(base, 0x00, &index.to_le_bytes());
        io.mmio_write(base, 0x10, &value.to_le_bytes());
    };
    reg(0x10 + 2 * 4, 0x24);
    reg(0x11 + 2 * 4, 1 << 24);
    io.mmio_write(base, 0x00, &(0x10u32 + 2 * 4).to_le_bytes());
    let mut back = [0u8; 4];
    io.mmio_read(base, 0x10, &mut back);
    assert_eq!(u32::from_le_bytes(back) & 0xFF, 0x24);

    let mut com1 = Serial::new(IoapicPin::new(pf.clone(), 4), std::io::sink());
    assert_eq!(fabric.read_apic(1, |a| a.irr().contains(0x24)), Some(false));
    com1.write(1, 0x02).expect("IER write"); // THR-empty interrupt enable
    assert_eq!(fabric.read_apic(1, |a| a.irr().contains(0x24)), Some(true));
    assert_eq!(fabric.read_apic(0, |a| a.irr().contains(0x24)), Some(false));
    assert!(pf.kicks.load(Ordering::Relaxed) >= 1, "vCPU 1 was kicked");
    let _: Option<NoEvents> = None;
}
