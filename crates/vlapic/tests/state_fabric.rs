//! Whole-VM state: a fabric (APICs + IOAPIC) exported mid-handler and imported into a
//! brand-new fabric behaves identically — the seed change's migration claim, across
//! objects: a level-triggered IOAPIC interrupt in service still clears remote IRR on
//! EOI after import, an asserted line re-delivers, and an import delivers nothing of
//! its own (export → import → export is the identity).

use vlapic::fabric::{FabricConfig, SharedFabric};
use vlapic::ioapic::RTE_REMOTE_IRR;
use vlapic::state::{native, FabricError, IoApicError};

const PIN: u8 = 9;

fn vm() -> SharedFabric {
    let mut cfg = FabricConfig::with_vcpus(4);
    for c in cfg.apics.iter_mut() {
        c.verify = true;
    }
    let f = SharedFabric::new(cfg);
    for v in 0..4 {
        let _ = f.lapic_mmio_write(v, 0xF0, &0x1FFu32.to_le_bytes(), 0);
    }
    f
}

fn ioapic_write(f: &SharedFabric, index: u8, value: u32) {
    let _ = f.ioapic_mmio_write(0x00, &u32::from(index).to_le_bytes(), 0);
    let _ = f.ioapic_mmio_write(0x10, &value.to_le_bytes(), 0);
}

fn ack(f: &SharedFabric, vcpu: usize) -> Option<u8> {
    f.with_apic(vcpu, 0, |a| (a.acknowledge(), Default::default()))
        .and_then(|(v, _)| v)
}

fn rte(f: &SharedFabric) -> u64 {
    f.with_ioapic(|io| io.entry(PIN).unwrap_or(0))
}

#[test]
fn level_interrupt_in_service_survives_migration() {
    let src = vm();
    // Pin 9: level-triggered, vector 0x59, physical destination APIC 1.
    ioapic_write(&src, 0x10 + 2 * PIN, 0x8000 | 0x59);
    ioapic_write(&src, 0x11 + 2 * PIN, 1 << 24);
    let _ = src.set_irq_line(u32::from(PIN), true, 0);
    // vCPU 1 takes it, then two higher self-IPIs nest on top (3 in service).
    assert_eq!(ack(&src, 1), Some(0x59));
    for v in [0x71u32, 0xA2] {
        let _ = src.lapic_mmio_write(1, 0x300, &(0x4_4000 | v).to_le_bytes(), 0);
        assert_eq!(ack(&src, 1), Some(v as u8));
    }
    assert_ne!(rte(&src) & RTE_REMOTE_IRR, 0);

    // Export through the native byte format, import into a brand-new VM.
    let bytes = native::encode_fabric(&src.export());
    let state = native::decode_fabric(&bytes).expect("decodes");
    let dst = vm();
    let wake = dst.import(&state, 0).expect("imports");
    assert!(
        wake.is_empty(),
        "nothing deliverable: PPR is 0xA0 on vCPU 1"
    );
    assert_ne!(rte(&dst) & RTE_REMOTE_IRR, 0, "remote IRR travelled");

    // Unwind: the two edge EOIs report nothing; the level EOI clears remote IRR and,
    // the line still being high, re-delivers to vCPU 1.
    for expect in [0xA2u8, 0x71] {
        let isr_top = dst
            .with_apic(1, 0, |a| (a.isr().highest(), Default::default()))
            .unwrap()
            .0;
        assert_eq!(isr_top, Some(expect));
        let _ = dst.lapic_mmio_write(1, 0xB0, &0u32.to_le_bytes(), 0);
        assert_ne!(rte(&dst) & RTE_REMOTE_IRR, 0);
    }
    let wake = dst.lapic_mmio_write(1, 0xB0, &0u32.to_le_bytes(), 0);
    assert!(
        wake.contains(1),
        "the asserted level line re-delivers to vCPU 1"
    );
    assert_eq!(ack(&dst, 1), Some(0x59));
    let _ = dst.set_irq_line(u32::from(PIN), false, 0);
    let _ = dst.lapic_mmio_write(1, 0xB0, &0u32.to_le_bytes(), 0);
    assert_eq!(rte(&dst) & RTE_REMOTE_IRR, 0);
    let violations = dst
        .with_apic(1, 0, |a| (a.verifier().violations(), Default::default()))
        .unwrap()
        .0;
    assert_eq!(violations, 0);
}

/// A level pin asserted while its destination APIC is software-disabled: no APIC
/// accepts it, so remote IRR stays clear and the pin waits for its next trigger
/// (82093AA datasheet §3.2.4: remote IRR is set when a local APIC accepts the level
/// interrupt; KVM's `ioapic_service` likewise sets it only when delivery succeeded).
/// The import installs that state exactly and delivers nothing: export → import →
/// export is the identity, and the first trigger afterwards (a rewrite of the entry)
/// fires the pin on the destination as it would have on the source. Found by the
/// `fabric_traffic` fuzz target (the import used to fire such pins at once).
#[test]
fn unaccepted_level_pin_waits_for_its_trigger_across_migration() {
    let src = vm();
    // vCPU 1 software-disabled (SVR bit 8 clear): it accepts no fixed interrupt.
    let _ = src.lapic_mmio_write(1, 0xF0, &0xFFu32.to_le_bytes(), 0);
    ioapic_write(&src, 0x10 + 2 * PIN, 0x8000 | 0x59);
    ioapic_write(&src, 0x11 + 2 * PIN, 1 << 24);
    let wake = src.set_irq_line(u32::from(PIN), true, 0);
    assert!(wake.is_empty(), "nobody accepted the level interrupt");
    assert_eq!(rte(&src) & RTE_REMOTE_IRR, 0);
    // Enabling the APIC again is not a trigger for the IOAPIC: the pin still waits.
    let _ = src.lapic_mmio_write(1, 0xF0, &0x1FFu32.to_le_bytes(), 0);
    assert_eq!(ack(&src, 1), None);

    let state = src.export();
    let dst = vm();
    let wake = dst.import(&state, 0).expect("imports");
    assert!(wake.is_empty(), "the import itself delivers nothing");
    assert_eq!(dst.export(), state, "export after import is the identity");

    // The same trigger on both sides: the entry rewritten.
    for f in [&src, &dst] {
        ioapic_write(f, 0x10 + 2 * PIN, 0x8000 | 0x59);
        assert_ne!(rte(f) & RTE_REMOTE_IRR, 0, "the rewrite fired the pin");
        assert_eq!(ack(f, 1), Some(0x59));
    }
    assert_eq!(src.export(), dst.export());
}

#[test]
fn failed_import_changes_nothing() {
    let src = vm();
    ioapic_write(&src, 0x10, 0x41);
    let mut state = src.export();
    let dst = vm();
    let _ = dst.lapic_mmio_write(2, 0x80, &0x30u32.to_le_bytes(), 0);
    let before = dst.export();
    // An APIC with an illegal vector in ISR (last APIC, so earlier ones would be applied
    // by a careless importer).
    state.apics[3].isr[0] = 1 << 5;
    assert!(matches!(
        dst.import(&state, 0),
        Err(FabricError::Apic { index: 3, .. })
    ));
    assert_eq!(dst.export(), before);
    // A wrong IOAPIC pin count.
    let mut state = src.export();
    state.ioapic.redirection.push(0x1_0000);
    state.ioapic.pin_levels.push(false);
    assert!(matches!(
        dst.import(&state, 0),
        Err(FabricError::IoApic(IoApicError::PinCount {
            found: 25,
            expected: 24
        }))
    ));
    assert_eq!(dst.export(), before);
}

// kvm-unit-tests test_aliased_xapic_physical_ipi: guests may alias xAPIC IDs; such a VM
// must still migrate, and both aliases keep receiving physical IPIs.
#[test]
fn aliased_xapic_ids_migrate() {
    let src = vm();
    let _ = src.lapic_mmio_write(3, 0x20, &(2u32 << 24).to_le_bytes(), 0);
    let dst = vm();
    dst.import(&src.export(), 0).expect("aliases are legal");
    let wake = dst.lapic_mmio_write(0, 0x310, &(2u32 << 24).to_le_bytes(), 0);
    assert!(wake.is_empty());
    let wake = dst.lapic_mmio_write(0, 0x300, &0x4061u32.to_le_bytes(), 0);
    assert!(wake.contains(2) && wake.contains(3));
}

// Extended destination bits 55:49 are writable in our IOAPIC, so they are state.
#[test]
fn extended_destination_bits_round_trip() {
    let src = vm();
    ioapic_write(&src, 0x11, 0xFE00_0000 | (1 << 17));
    let state = src.export();
    assert!(
        state.ioapic.validate().is_empty(),
        "{:?}",
        state.ioapic.validate()
    );
    let dst = vm();
    dst.import(&state, 0).unwrap();
    assert_eq!(dst.export().ioapic, state.ioapic);
}
