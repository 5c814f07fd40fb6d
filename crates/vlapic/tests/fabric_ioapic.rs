//! IOAPIC behaviour through the fabric, after the kvm-unit-tests `x86/ioapic.c` list
//! (peers.md §6) and the 82093AA datasheet: registers, edge, level, coalescing,
//! retrigger after EOI, masking, TMR, destinations, EOI register, self-reconfigure.

use vlapic::fabric::{FabricConfig, SharedFabric, Wake};
use vlapic::ioapic::{IoApic, RTE_DELIVERY_STATUS, RTE_REMOTE_IRR};
use vlapic::Effects;

const LEVEL: u64 = 1 << 15;
const MASKED: u64 = 1 << 16;
const LOGICAL: u64 = 1 << 11;
const ACTIVE_LOW: u64 = 1 << 13;

fn vm(n: usize) -> SharedFabric {
    let f = SharedFabric::new(FabricConfig::with_vcpus(n));
    for i in 0..n {
        f.lapic_mmio_write(i, 0xF0, &0x1FFu32.to_le_bytes(), 0);
    }
    f
}

fn write_reg(f: &SharedFabric, index: u8, value: u32) -> Wake {
    f.ioapic_mmio_write(0x00, &[index], 0);
    f.ioapic_mmio_write(0x10, &value.to_le_bytes(), 0)
}

fn read_reg(f: &SharedFabric, index: u8) -> u32 {
    f.ioapic_mmio_write(0x00, &u32::from(index).to_le_bytes(), 0);
    let mut b = [0u8; 4];
    f.ioapic_mmio_read(0x10, &mut b, 0);
    u32::from_le_bytes(b)
}

/// Writes an entry high half first (as Linux does); returns both writes' wakes.
fn set_rte(f: &SharedFabric, pin: u8, rte: u64) -> Wake {
    let mut w = write_reg(f, 0x11 + 2 * pin, (rte >> 32) as u32);
    w.merge(&write_reg(f, 0x10 + 2 * pin, rte as u32));
    w
}

fn rte(f: &SharedFabric, pin: u8) -> u64 {
    u64::from(read_reg(f, 0x10 + 2 * pin)) | u64::from(read_reg(f, 0x11 + 2 * pin)) << 32
}

fn dest(apic: u8) -> u64 {
    u64::from(apic) << 56
}

/// The vCPU takes its highest deliverable vector (INTA).
fn ack(f: &SharedFabric, vcpu: usize) -> Option<u8> {
    f.with_apic(vcpu, 0, |a| (a.acknowledge(), Effects::default()))
        .unwrap()
        .0
}

/// Guest EOI through the xAPIC page; the EOI broadcast reaches the IOAPIC.
fn eoi(f: &SharedFabric, vcpu: usize) -> Wake {
    f.lapic_mmio_write(vcpu, 0xB0, &0u32.to_le_bytes(), 0)
}

fn tmr(f: &SharedFabric, vcpu: usize, v: u8) -> bool {
    f.with_apic(vcpu, 0, |a| (a.tmr().contains(v), Effects::default()))
        .unwrap()
        .0
}

// ioapic.c register tests; 82093AA §3.2.1–3.2.3: ID bits 27:24 writable, version 0x20
// with the maximum redirection entry in 23:16, arbitration ID read-only.
#[test]
fn id_version_arbitration() {
    let f = vm(1);
    assert_eq!(read_reg(&f, 0x01), 0x0017_0020);
    write_reg(&f, 0x00, 0xFFFF_FFFF);
    assert_eq!(read_reg(&f, 0x00), 0x0F00_0000);
    assert_eq!(read_reg(&f, 0x02), 0x0F00_0000);
    write_reg(&f, 0x01, 0);
    write_reg(&f, 0x02, 0);
    assert_eq!(read_reg(&f, 0x01), 0x0017_0020);
    assert_eq!(f.with_ioapic(|io| io.id()), 0xF);
    // Pin count is configurable; the version register follows.
    let g = SharedFabric::new(FabricConfig::with_vcpus(1).with_ioapic_pins(48));
    assert_eq!(read_reg(&g, 0x01), 0x002F_0020);
    // Entries beyond the last pin and unimplemented registers read 0, ignore writes.
    assert_eq!(read_reg(&f, 0x10 + 2 * 24), 0);
    write_reg(&f, 0x10 + 2 * 24, 0x41);
    assert_eq!(read_reg(&f, 0x10 + 2 * 24), 0);
    // Entries reset masked.
    assert_eq!(rte(&f, 5), MASKED);
}

// ioapic.c `test_ioapic_edge_intr`: an edge pin fires once per rising edge; TMR clear.
#[test]
fn edge_interrupt() {
    let f = vm(1);
    set_rte(&f, 2, 0x80 | dest(0));
    let w = f.set_irq_line(2, true, 0);
    assert!(w.contains(0));
    assert_eq!(ack(&f, 0), Some(0x80));
    assert!(!tmr(&f, 0, 0x80));
    eoi(&f, 0);
    assert!(
        f.set_irq_line(2, true, 0).is_empty(),
        "no edge while held high"
    );
    f.set_irq_line(2, false, 0);
    assert!(f.set_irq_line(2, true, 0).contains(0));
    assert_eq!(
        rte(&f, 2) & RTE_REMOTE_IRR,
        0,
        "remote IRR is for level only"
    );
}

// ioapic.c `test_ioapic_simultaneous`: two edges at once, the higher vector first.
#[test]
fn simultaneous_edges_higher_vector_first() {
    let f = vm(1);
    set_rte(&f, 0x0E, 0x66 | dest(0));
    set_rte(&f, 0x0F, 0x77 | dest(0));
    f.set_irq_line(0x0E, true, 0);
    f.set_irq_line(0x0F, true, 0);
    assert_eq!(ack(&f, 0), Some(0x77));
    eoi(&f, 0);
    assert_eq!(ack(&f, 0), Some(0x66));
}

// ioapic.c `test_ioapic_level_intr`, `_level_coalesce`, `_level_retrigger`, `_level_tmr`:
// remote IRR set on delivery; asserts while in service coalesce; a line still asserted
// at EOI is delivered again; a line lowered before EOI is not.
#[test]
fn level_interrupt_cycle() {
    let f = vm(1);
    set_rte(&f, 3, 0x90 | LEVEL | dest(0));
    assert!(f.set_irq_line(3, true, 0).contains(0));
    assert!(tmr(&f, 0, 0x90), "TMR set before the vector can be taken");
    assert_ne!(rte(&f, 3) & RTE_REMOTE_IRR, 0);
    assert_eq!(ack(&f, 0), Some(0x90));
    // Coalesce: re-asserting while remote IRR is set sends nothing.
    assert!(f.set_irq_line(3, true, 0).is_empty());
    // Retrigger: still asserted at EOI.
    let w = eoi(&f, 0);
    assert!(w.contains(0));
    assert_ne!(rte(&f, 3) & RTE_REMOTE_IRR, 0);
    assert_eq!(ack(&f, 0), Some(0x90));
    // Lowered before EOI: EOI clears remote IRR, nothing more.
    f.set_irq_line(3, false, 0);
    assert!(eoi(&f, 0).is_empty());
    assert_eq!(rte(&f, 3) & RTE_REMOTE_IRR, 0);
    assert_eq!(ack(&f, 0), None);
}

// ioapic.c `test_ioapic_edge_mask`: an edge arriving while masked is lost (82093AA).
#[test]
fn masked_edge_is_dropped() {
    let f = vm(1);
    set_rte(&f, 4, 0x81 | MASKED | dest(0));
    assert!(f.set_irq_line(4, true, 0).is_empty());
    f.set_irq_line(4, false, 0);
    assert!(set_rte(&f, 4, 0x81 | dest(0)).is_empty());
    assert_eq!(ack(&f, 0), None);
}

// ioapic.c `test_ioapic_level_mask`: a level interrupt asserted while masked is held
// (delivery status shows it pending) and delivered on unmask, not lost.
#[test]
fn masked_level_delivered_on_unmask() {
    let f = vm(1);
    set_rte(&f, 5, 0x91 | LEVEL | MASKED | dest(0));
    assert!(f.set_irq_line(5, true, 0).is_empty());
    assert_ne!(rte(&f, 5) & RTE_DELIVERY_STATUS, 0);
    let w = set_rte(&f, 5, 0x91 | LEVEL | dest(0));
    assert!(w.contains(0));
    assert_eq!(rte(&f, 5) & RTE_DELIVERY_STATUS, 0);
    assert_ne!(rte(&f, 5) & RTE_REMOTE_IRR, 0);
    assert_eq!(ack(&f, 0), Some(0x91));
    // Masked again while in service, then EOI with the line high: held, not sent.
    set_rte(&f, 5, 0x91 | LEVEL | MASKED | dest(0));
    assert!(eoi(&f, 0).is_empty());
    assert!(set_rte(&f, 5, 0x91 | LEVEL | dest(0)).contains(0));
}

// ioapic.c `test_ioapic_*_tmr_smp` and destination tests: logical destinations, TMR set
// only on the target, only for level.
#[test]
fn logical_destination_level_on_other_cpu() {
    let f = vm(2);
    f.lapic_mmio_write(1, 0xD0, &(0x02u32 << 24).to_le_bytes(), 0);
    set_rte(&f, 6, 0xA0 | LEVEL | LOGICAL | dest(0x02));
    assert_eq!(f.set_irq_line(6, true, 0).iter().collect::<Vec<_>>(), [1]);
    assert!(tmr(&f, 1, 0xA0) && !tmr(&f, 0, 0xA0));
    assert_eq!(ack(&f, 1), Some(0xA0));
    f.set_irq_line(6, false, 0);
    eoi(&f, 1);
    assert_eq!(rte(&f, 6) & RTE_REMOTE_IRR, 0);
}

// ioapic.c `test_ioapic_self_reconfigure`: the handler retargets its own entry before
// EOI; remote IRR stays set across the rewrite and the EOI still clears it.
#[test]
fn reprogram_inside_handler_keeps_remote_irr() {
    let f = vm(2);
    set_rte(&f, 7, 0xB0 | LEVEL | dest(0));
    f.set_irq_line(7, true, 0);
    assert_eq!(ack(&f, 0), Some(0xB0));
    // In the handler: retarget to CPU 1 (same vector).
    assert!(set_rte(&f, 7, 0xB0 | LEVEL | dest(1)).is_empty());
    assert_ne!(rte(&f, 7) & RTE_REMOTE_IRR, 0, "rewrite keeps remote IRR");
    f.set_irq_line(7, false, 0);
    eoi(&f, 0);
    assert_eq!(rte(&f, 7) & RTE_REMOTE_IRR, 0);
    // The next assertion goes to the new target.
    assert_eq!(f.set_irq_line(7, true, 0).iter().collect::<Vec<_>>(), [1]);
}

// IOAPIC version 0x20 EOI register (offset 0x40), used with directed EOI (SVR bit 12):
// the LAPIC EOI is not broadcast; the guest writes the vector to the IOAPIC.
#[test]
fn eoi_register_with_broadcast_suppression() {
    let f = vm(1);
    f.lapic_mmio_write(0, 0xF0, &0x11FFu32.to_le_bytes(), 0);
    set_rte(&f, 8, 0xC0 | LEVEL | dest(0));
    f.set_irq_line(8, true, 0);
    assert_eq!(ack(&f, 0), Some(0xC0));
    assert!(eoi(&f, 0).is_empty());
    assert_ne!(
        rte(&f, 8) & RTE_REMOTE_IRR,
        0,
        "suppressed: still in service"
    );
    let w = f.ioapic_mmio_write(0x40, &0xC0u32.to_le_bytes(), 0);
    assert!(w.contains(0), "still asserted: delivered again");
    f.set_irq_line(8, false, 0);
    assert_eq!(ack(&f, 0), Some(0xC0));
    eoi(&f, 0);
    f.ioapic_mmio_write(0x40, &0xC1u32.to_le_bytes(), 0);
    assert_ne!(
        rte(&f, 8) & RTE_REMOTE_IRR,
        0,
        "another vector does not match"
    );
    f.ioapic_mmio_write(0x40, &0xC0u32.to_le_bytes(), 0);
    assert_eq!(rte(&f, 8) & RTE_REMOTE_IRR, 0);
}

// 82093AA polarity bit 13: active low asserts on a low line.
#[test]
fn active_low_polarity() {
    let f = vm(1);
    f.set_irq_line(9, true, 0); // idle high
    set_rte(&f, 9, 0xD0 | ACTIVE_LOW | dest(0));
    assert!(f.set_irq_line(9, true, 0).is_empty());
    assert!(f.set_irq_line(9, false, 0).contains(0));
}

// A level interrupt nobody accepts does not leave remote IRR stuck (KVM sets it only on
// delivery); retargeting the asserted pin then delivers it.
#[test]
fn undelivered_level_keeps_remote_irr_clear() {
    let f = vm(1);
    set_rte(&f, 10, 0xD1 | LEVEL | dest(9));
    assert!(f.set_irq_line(10, true, 0).is_empty());
    assert_eq!(rte(&f, 10) & RTE_REMOTE_IRR, 0);
    assert!(set_rte(&f, 10, 0xD1 | LEVEL | dest(0)).contains(0));
}

// Guest-controlled IOAPIC input never panics: reserved delivery modes send nothing,
// pins past the end are ignored, odd MMIO sizes and offsets are harmless; switching an
// entry to edge clears remote IRR.
#[test]
fn hostile_ioapic_input() {
    let f = vm(1);
    for mode in [3u64, 6] {
        set_rte(&f, 11, 0xE0 | mode << 8 | dest(0));
        f.set_irq_line(11, true, 0);
        f.set_irq_line(11, false, 0);
    }
    assert_eq!(ack(&f, 0), None);
    for pin in [24u32, 255, u32::MAX] {
        assert!(f.set_irq_line(pin, true, 0).is_empty());
    }
    let mut big = [0u8; 8];
    f.ioapic_mmio_read(0x10, &mut big, 0);
    assert_eq!(big, [0; 8]);
    let mut b = [0u8; 4];
    for off in [0x3u64, 0x13, 0x40, 0xFFF, u64::MAX] {
        f.ioapic_mmio_read(off, &mut b[..2], 0);
        f.ioapic_mmio_write(off, &[0xFF, 0xFF], 0);
    }
    f.ioapic_mmio_write(0x00, &[0xFF], 0);
    f.ioapic_mmio_write(0x10, &[1, 2, 3, 4], 0);
    f.ioapic_mmio_write(0x10, &[], 0);
    // Level in service, then switched to edge: remote IRR cleared.
    set_rte(&f, 12, 0xE1 | LEVEL | dest(0));
    f.set_irq_line(12, true, 0);
    assert_ne!(rte(&f, 12) & RTE_REMOTE_IRR, 0);
    set_rte(&f, 12, 0xE1 | dest(0));
    assert_eq!(rte(&f, 12) & RTE_REMOTE_IRR, 0);
}

// State export/import through `with_ioapic`: entries, remote IRR and pin levels are plain
// architectural state; `ioapic_service` fires what an import left pending.
#[test]
fn export_import_round_trip() {
    let f = vm(1);
    set_rte(&f, 1, 0x55 | LEVEL | dest(0));
    f.set_irq_line(1, true, 0);
    let saved: IoApic = f.with_ioapic(|io| io.clone());
    assert_ne!(saved.entry(1).unwrap() & RTE_REMOTE_IRR, 0);
    assert_eq!(saved.line_level(1), Some(true));
    let g = vm(1);
    g.with_ioapic(|io| {
        io.set_id(saved.id());
        for pin in 0..saved.pins() {
            io.set_entry(pin, saved.entry(pin).unwrap() & !RTE_REMOTE_IRR);
            io.set_line_level(pin, saved.line_level(pin).unwrap());
        }
    });
    assert!(g.ioapic_service(0).contains(0));
    assert_eq!(ack(&g, 0), Some(0x55));
}

// ioapic.c `test_ioapic_level_sequential`; 82093AA delivery modes NMI and ExtINT become
// per-vCPU events (SDM §11.11 message delivery modes).
#[test]
fn sequential_level_and_event_modes() {
    let f = vm(2);
    set_rte(&f, 13, 0x98 | LEVEL | dest(1));
    for _ in 0..3 {
        assert!(f.set_irq_line(13, true, 0).contains(1));
        assert_eq!(ack(&f, 1), Some(0x98));
        f.set_irq_line(13, false, 0);
        assert!(eoi(&f, 1).is_empty());
    }
    set_rte(&f, 14, 4 << 8 | dest(1)); // NMI
    assert!(f.set_irq_line(14, true, 0).contains(1));
    assert_eq!(f.take_events(1).unwrap().nmi, 1);
    set_rte(&f, 0, 7 << 8 | dest(0)); // ExtINT (8259 through pin 0)
    assert!(f.set_irq_line(0, true, 0).contains(0));
    assert!(f.take_events(0).unwrap().extint);
}
