//! Issue 9, point 2: MMIO dispatch by guest-physical address on both fabrics — the
//! APIC page at IA32_APIC_BASE (SDM Vol. 3A §11.4.4, relocation included), the IOAPIC page.

use vlapic::fabric::{Fabric, FabricConfig, SharedFabric};
use vlapic::ioapic::IoApic;

const APIC_PAGE: u64 = 0xFEE0_0000;
const IOAPIC_PAGE: u64 = 0xFEC0_0000;
const MSR_APIC_BASE: u32 = 0x1B;
const EN: u64 = 1 << 11;
const EXTD: u64 = 1 << 10;
const BSP: u64 = 1 << 8;

fn vm(n: usize) -> SharedFabric {
    let f = SharedFabric::new(FabricConfig::with_vcpus(n));
    for v in 0..n {
        assert!(f
            .mmio_write(v, APIC_PAGE + 0xF0, &0x1FFu32.to_le_bytes(), 0)
            .is_some());
    }
    f
}

fn read32(f: &SharedFabric, vcpu: usize, gpa: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    f.mmio_read(vcpu, gpa, &mut b, 0)
        .then(|| u32::from_le_bytes(b))
}

fn version(f: &SharedFabric, vcpu: usize) -> u32 {
    f.read_apic(vcpu, |a| a.version()).unwrap()
}

// SDM §11.4.1: the APIC registers are at the APIC base, 0xFEE0_0000 after reset.
#[test]
fn apic_page_at_the_default_base() {
    let f = vm(2);
    assert_eq!(read32(&f, 1, APIC_PAGE + 0x30), Some(version(&f, 1)));
    assert_eq!(read32(&f, 1, APIC_PAGE + 0x20), Some(1 << 24)); // ID of vCPU 1
    assert_eq!(read32(&f, 1, APIC_PAGE + 0xF0), Some(0x1FF));
    let w = f.mmio_write(1, APIC_PAGE + 0x80, &0x30u32.to_le_bytes(), 0);
    assert_eq!(w.map(|w| w.is_empty()), Some(true));
    assert_eq!(f.read_apic(1, |a| a.tpr()), Some(0x30));
    assert_eq!(f.read_apic(0, |a| a.tpr()), Some(0), "vCPU 0's own page");
}

// SDM §11.4.5: the base field of IA32_APIC_BASE relocates the page, per vCPU.
#[test]
fn relocated_apic_page() {
    let f = vm(2);
    let base = 0xFED0_0000;
    f.lapic_msr_write(0, MSR_APIC_BASE, base | EN | BSP, 0)
        .unwrap();
    assert_eq!(read32(&f, 0, base + 0x30), Some(version(&f, 0)));
    let mut b = [0xAB; 4];
    assert!(
        !f.mmio_read(0, APIC_PAGE + 0x30, &mut b, 0),
        "old page let go"
    );
    assert_eq!(b, [0xAB; 4]);
    assert!(f.mmio_write(0, APIC_PAGE + 0x80, &[0; 4], 0).is_none());
    // vCPU 1 still decodes the default page, and not vCPU 0's.
    assert_eq!(read32(&f, 1, APIC_PAGE + 0x30), Some(version(&f, 1)));
    assert_eq!(read32(&f, 1, base + 0x30), None);
    // Writes follow the new page.
    f.mmio_write(0, base + 0x80, &0x40u32.to_le_bytes(), 0)
        .unwrap();
    assert_eq!(f.read_apic(0, |a| a.tpr()), Some(0x40));
}

// 82093AA datasheet §3.1: IOREGSEL at base + 0, IOWIN at base + 0x10; version 0x20
// with the maximum redirection entry (23) in bits 23:16.
#[test]
fn ioapic_page() {
    let f = vm(1);
    assert!(f
        .mmio_write(0, IOAPIC_PAGE, &1u32.to_le_bytes(), 0)
        .is_some());
    assert_eq!(read32(&f, 0, IOAPIC_PAGE + 0x10), Some(0x0017_0020));
    // Configurable base: the default page is then nobody's.
    let g = SharedFabric::new(FabricConfig::with_vcpus(1).with_ioapic_base(0xFEC0_1000));
    assert_eq!(FabricConfig::default().ioapic_base, IoApic::DEFAULT_BASE);
    assert!(g
        .mmio_write(0, 0xFEC0_1000, &1u32.to_le_bytes(), 0)
        .is_some());
    assert_eq!(read32(&g, 0, 0xFEC0_1010), Some(0x0017_0020));
    assert_eq!(read32(&g, 0, IOAPIC_PAGE + 0x10), None);
}

// The APIC page wins where it coincides with the IOAPIC's (for that vCPU only).
#[test]
fn apic_page_wins_over_the_ioapic_page() {
    let f = vm(2);
    f.lapic_msr_write(0, MSR_APIC_BASE, IOAPIC_PAGE | EN | BSP, 0)
        .unwrap();
    f.mmio_write(0, IOAPIC_PAGE + 0x80, &0x20u32.to_le_bytes(), 0)
        .unwrap();
    assert_eq!(f.read_apic(0, |a| a.tpr()), Some(0x20));
    assert_eq!(read32(&f, 0, IOAPIC_PAGE + 0x30), Some(version(&f, 0)));
    // vCPU 1 reaches the IOAPIC there.
    f.mmio_write(1, IOAPIC_PAGE, &1u32.to_le_bytes(), 0)
        .unwrap();
    assert_eq!(read32(&f, 1, IOAPIC_PAGE + 0x10), Some(0x0017_0020));
    assert_eq!(f.with_ioapic(|io| io.select()), 1);
}

// Neither page: nothing happens, the caller's buffer is left alone.
#[test]
fn unclaimed_address_is_untouched() {
    let f = vm(1);
    for gpa in [0, 0xFEE0_1000, 0xFEDF_FFFC, 0xFEC0_1000, u64::MAX] {
        let mut b = [0xAB; 4];
        assert!(!f.mmio_read(0, gpa, &mut b, 0), "{gpa:#x}");
        assert_eq!(b, [0xAB; 4]);
        assert!(f.mmio_write(0, gpa, &[1, 2, 3, 4], 0).is_none());
    }
    assert_eq!(f.read_apic(0, |a| a.stats().ignored_access), Some(0));
}

// README deviation 3 / SDM §11.12.2: in x2APIC mode the xAPIC page is claimed but
// reads all ones and ignores writes; the same when the APIC is disabled.
#[test]
fn x2apic_and_disabled_pages_read_all_ones() {
    let f = vm(2);
    f.lapic_msr_write(0, MSR_APIC_BASE, APIC_PAGE | EN | EXTD | BSP, 0)
        .unwrap();
    assert_eq!(read32(&f, 0, APIC_PAGE + 0x30), Some(u32::MAX));
    let w = f.mmio_write(0, APIC_PAGE + 0x80, &0x50u32.to_le_bytes(), 0);
    assert_eq!(w.map(|w| w.is_empty()), Some(true));
    assert_eq!(f.read_apic(0, |a| a.tpr()), Some(0));
    f.lapic_msr_write(1, MSR_APIC_BASE, APIC_PAGE, 0).unwrap(); // EN = 0
    assert_eq!(read32(&f, 1, APIC_PAGE + 0x30), Some(u32::MAX));
}

// A vCPU index the VM does not have: no APIC page; the VM-wide IOAPIC page is served.
#[test]
fn nonexistent_vcpu() {
    let f = vm(1);
    let mut b = [0xAB; 4];
    assert!(!f.mmio_read(3, APIC_PAGE + 0x30, &mut b, 0));
    assert_eq!(b, [0xAB; 4]);
    assert!(f.mmio_write(3, APIC_PAGE + 0x80, &[0; 4], 0).is_none());
    assert!(f
        .mmio_write(3, IOAPIC_PAGE, &1u32.to_le_bytes(), 0)
        .is_some());
    assert_eq!(read32(&f, 3, IOAPIC_PAGE + 0x10), Some(0x0017_0020));
    assert_eq!(f.plan_entry(3, 0, true), None);
}

// Writes through the dispatch route their effects: an EOI at the APIC page reaches
// the IOAPIC (remote IRR cleared, SDM §11.8.5 / 82093AA §3.2.4).
#[test]
fn dispatched_eoi_reaches_the_ioapic() {
    let f = vm(1);
    f.with_ioapic(|io| io.set_entry(2, 1 << 15 | 0x44));
    f.set_irq_line(2, true, 0);
    assert_eq!(f.plan_entry(0, 0, true).unwrap().inject, Some(0x44));
    assert_ne!(f.with_ioapic(|io| io.entry(2)).unwrap() & (1 << 14), 0);
    f.set_irq_line(2, false, 0);
    f.mmio_write(0, APIC_PAGE + 0xB0, &[0; 4], 0).unwrap();
    assert_eq!(f.with_ioapic(|io| io.entry(2)).unwrap() & (1 << 14), 0);
}

// The single-threaded front end dispatches the same way.
#[test]
fn fabric_dispatch() {
    let mut f = Fabric::new(FabricConfig::with_vcpus(2));
    assert!(f
        .mmio_write(1, APIC_PAGE + 0xF0, &0x1FFu32.to_le_bytes(), 0)
        .is_some());
    let mut b = [0u8; 4];
    assert!(f.mmio_read(1, APIC_PAGE + 0xF0, &mut b, 0));
    assert_eq!(u32::from_le_bytes(b), 0x1FF);
    f.lapic_msr_write(1, MSR_APIC_BASE, 0xFED0_0000 | EN, 0)
        .unwrap();
    assert!(f.mmio_read(1, 0xFED0_00F0, &mut b, 0));
    assert_eq!(u32::from_le_bytes(b), 0x1FF);
    let mut c = [0xAB; 4];
    assert!(!f.mmio_read(1, APIC_PAGE + 0xF0, &mut c, 0));
    assert_eq!(c, [0xAB; 4]);
    assert!(f
        .mmio_write(0, IOAPIC_PAGE, &1u32.to_le_bytes(), 0)
        .is_some());
    assert!(f.mmio_read(0, IOAPIC_PAGE + 0x10, &mut b, 0));
    assert_eq!(u32::from_le_bytes(b), 0x0017_0020);
    assert!(f.mmio_write(0, 0x1000, &[0; 4], 0).is_none());
    assert!(!f.mmio_read(9, APIC_PAGE, &mut c, 0));
    assert_eq!(f.read_apic(1, |a| a.mmio_base()), Some(Some(0xFED0_0000)));
}
