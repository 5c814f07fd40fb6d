//! Issue 2, points 5–8 and 10: priority, arrival/acceptance/EOI, the verifier,
//! LVTs and local interrupts, ESR, and the ICR. Each test cites its source.

mod common;
use common::*;
use vlapic::regs::*;
use vlapic::{Delivery, DeliveryMode, DestMode, LapicConfig, Lvt, Shorthand};

// ---------------------------------------------------------------- TPR, CR8, PPR

// SDM §11.8.6.1: CR8[3:0] = TPR[7:4]; a CR8 write clears TPR[3:0].
#[test]
fn cr8_mirrors_tpr_bits_7_4() {
    let mut a = xapic();
    let _ = a.write_register(TPR, 0x5C, 0);
    assert_eq!(a.cr8(), 5);
    a.set_cr8(0xA).unwrap();
    assert_eq!(a.read_register(TPR, 0), 0xA0);
    assert_eq!(
        a.set_cr8(0x10),
        Err(vlapic::GpFault),
        "CR8 bits 63:4 are reserved"
    );
    assert_eq!(a.tpr(), 0xA0);
}

// SDM §11.8.3.1: PPR = TPR when TPR's class >= ISRV's, else ISRV & 0xF0.
#[test]
fn ppr_follows_tpr_and_isr() {
    let mut a = xapic();
    let _ = a.write_register(TPR, 0x23, 0);
    assert_eq!(a.read_register(PPR, 0), 0x23);
    a.deliver(Delivery::fixed(0x51), 0);
    assert_eq!(a.acknowledge(), Some(0x51));
    assert_eq!(
        a.read_register(PPR, 0),
        0x50,
        "acknowledge raises PPR to the class"
    );
    let _ = a.write_register(TPR, 0x5F, 0);
    assert_eq!(
        a.read_register(PPR, 0),
        0x5F,
        "equal class: TPR with its low nibble"
    );
    let _ = a.write_register(EOI, 0, 0);
    assert_eq!(a.read_register(PPR, 0), 0x5F);
}

// ---------------------------------------------------------------- arrival / accept / EOI

// SDM §11.8.4 and illumos 13007: TMR is set or cleared for the trigger mode before IRR.
#[test]
fn arrival_sets_tmr_by_trigger_mode() {
    let mut a = xapic();
    a.deliver(Delivery::fixed_level(0x70), 0);
    assert!(a.tmr().contains(0x70) && a.irr().contains(0x70));
    assert_eq!(a.read_register(0x180 + 0x30, 0), 1 << (0x70 - 0x60));
    a.deliver(Delivery::fixed(0x70), 0);
    assert!(!a.tmr().contains(0x70), "a later edge arrival clears TMR");
}

// SDM §11.5.3 ESR bit 6: vectors 0–15 are illegal on receipt.
#[test]
fn illegal_vectors_are_refused_with_receive_illegal() {
    let mut a = xapic();
    for v in 0..16u8 {
        assert!(!a.deliver(Delivery::fixed(v), 0));
    }
    assert!(a.irr().is_empty());
    assert_eq!(latch_esr(&mut a), ESR_RECEIVE_ILLEGAL_VECTOR);
}

// SDM §11.4.7.2: a software-disabled APIC takes no fixed interrupts but still
// responds to NMI, INIT, SMI and SIPI.
#[test]
fn software_disabled_refuses_fixed_but_takes_events() {
    let mut a = vlapic::LocalApic::new(LapicConfig::default());
    assert!(!a.deliver(Delivery::fixed(0x40), 0));
    assert!(a.irr().is_empty());
    assert!(a.deliver(Delivery::event(DeliveryMode::Nmi, 0), 0));
    assert!(a.deliver(Delivery::event(DeliveryMode::Smi, 0), 0));
    assert!(a.deliver(Delivery::event(DeliveryMode::StartUp, 0x9A), 0));
    let e = a.take_events();
    assert!(e.nmi == 1 && e.smi && e.sipi == Some(0x9A));
    assert_eq!(a.stats().refused_disabled, 1);
}

// SDM §11.8.3.1: pending = highest IRR vector whose class is above PPR's class.
#[test]
fn pending_is_highest_irr_above_ppr() {
    let mut a = xapic();
    a.deliver(Delivery::fixed(0x35), 0);
    a.deliver(Delivery::fixed(0x61), 0);
    let _ = a.write_register(TPR, 0x60, 0);
    assert_eq!(a.pending_vector(), None, "0x61 is in TPR's class");
    let _ = a.write_register(TPR, 0x50, 0);
    assert_eq!(a.pending_vector(), Some(0x61));
    assert_eq!(a.acknowledge(), Some(0x61));
    assert_eq!(
        a.pending_vector(),
        None,
        "0x35 is below the in-service class"
    );
    // ACRN #3795: after the EOI the lower vector must become deliverable again.
    let _ = a.write_register(EOI, 0, 0);
    let _ = a.write_register(TPR, 0, 0);
    assert_eq!(a.pending_vector(), Some(0x35));
}

// SDM §11.8.5: EOI retires the highest ISR bit; a level vector is reported to the
// IOAPIC unless SVR bit 12 suppresses the broadcast.
#[test]
fn eoi_retires_highest_and_reports_level() {
    let mut a = xapic();
    a.deliver(Delivery::fixed_level(0x41), 0);
    assert_eq!(a.acknowledge(), Some(0x41));
    a.deliver(Delivery::fixed(0x81), 0);
    assert_eq!(a.acknowledge(), Some(0x81));
    let fx = a.write_register(EOI, 0, 0);
    assert_eq!(fx.eoi, None, "0x81 was edge-triggered");
    assert_eq!(a.isr().highest(), Some(0x41));
    let fx = a.write_register(EOI, 0, 0);
    assert_eq!(fx.eoi, Some(0x41));
    // With suppression the same sequence reports nothing.
    let _ = a.write_register(SVR, 0x11FF, 0);
    a.deliver(Delivery::fixed_level(0x41), 0);
    a.acknowledge();
    assert_eq!(a.write_register(EOI, 0, 0).eoi, None);
}

// crosvm observed bug: suppression advertised but SVR bit 12 unwritable; and when
// not offered, the bit must stay clear (so EOIs keep being broadcast).
#[test]
fn suppression_bit_writable_only_when_offered() {
    let mut a = xapic_with(LapicConfig::default().with_eoi_broadcast_suppression(false));
    let _ = a.write_register(SVR, 0x11FF, 0);
    assert_eq!(a.read_register(SVR, 0), 0x1FF);
    a.deliver(Delivery::fixed_level(0x41), 0);
    a.acknowledge();
    assert_eq!(a.write_register(EOI, 0, 0).eoi, Some(0x41));
}

// illumos VLAPIC_GRATUITOUS_EOI: an EOI with nothing in service is a counted no-op.
#[test]
fn eoi_with_nothing_in_service_is_counted() {
    let mut a = xapic();
    let fx = a.write_register(EOI, 0, 0);
    assert_eq!(fx, vlapic::Effects::default());
    assert_eq!(a.stats().spurious_eoi, 1);
    assert_eq!(a.verifier().violations(), 0);
}

// ACRN observed bug: vectors 16–31 (word 0) must be delivered and EOI'd.
#[test]
fn vectors_16_to_31_work() {
    let mut a = xapic();
    a.deliver(Delivery::fixed(0x10), 0);
    assert_eq!(a.acknowledge(), Some(0x10));
    assert_eq!(a.read_register(0x100, 0), 1 << 16);
    let _ = a.write_register(EOI, 0, 0);
    assert!(a.isr().is_empty());
}

// ---------------------------------------------------------------- verifier (point 7)

// The seed's nested scenario: three levels in service, then unwound in order.
#[test]
fn verifier_tracks_three_deep_nesting() {
    let mut a = xapic();
    for v in [0x41u8, 0x61, 0x91] {
        a.deliver(Delivery::fixed(v), 0);
        assert_eq!(a.acknowledge(), Some(v));
    }
    assert_eq!(a.verifier().depth(), 3);
    assert_eq!(a.verifier().stack(), &[0x41, 0x61, 0x91]);
    for expect in [0x91u8, 0x61, 0x41] {
        assert_eq!(a.isr().highest(), Some(expect));
        let _ = a.write_register(EOI, 0, 0);
    }
    assert_eq!(a.verifier().violations(), 0);
    assert_eq!(a.verifier().max_depth(), 3);
}

#[test]
fn verifier_runtime_switch_rebuilds_from_isr() {
    let mut a = xapic_with(LapicConfig::default()); // verifier off
    for v in [0x31u8, 0x52] {
        a.deliver(Delivery::fixed(v), 0);
        a.acknowledge();
    }
    assert!(!a.verifier().enabled());
    assert_eq!(a.verifier().depth(), 0, "off: no shadow kept");
    a.set_verifier_enabled(true);
    assert_eq!(a.verifier().stack(), &[0x31, 0x52]);
    let _ = a.write_register(EOI, 0, 0);
    let _ = a.write_register(EOI, 0, 0);
    assert_eq!(a.verifier().violations(), 0);
}

// Fifteen classes in service at once is the architectural maximum.
#[test]
fn fifteen_deep_nesting_is_legal() {
    let mut a = xapic();
    for c in 1..=15u8 {
        a.deliver(Delivery::fixed(c << 4 | 3), 0);
        assert_eq!(a.acknowledge(), Some(c << 4 | 3));
    }
    assert_eq!(a.verifier().max_depth(), 15);
    assert_eq!(a.ppr(), 0xF0);
    a.deliver(Delivery::fixed(0xFF), 0);
    assert_eq!(a.pending_vector(), None);
    assert_eq!(a.verifier().violations(), 0);
}

// ---------------------------------------------------------------- LVTs (point 8)

// SDM §11.5.1: LINT1 programmed as NMI delivers an NMI on its rising edge only.
#[test]
fn lint1_nmi_on_edge() {
    let mut a = xapic();
    let _ = a.write_register(LVT_LINT1, 0x400, 0);
    assert!(a.set_lint(1, true, 0));
    assert!(!a.set_lint(1, true, 0), "no edge, nothing delivered");
    assert_eq!(a.take_events().nmi, 1);
    assert!(!a.set_lint(1, false, 0));
}

#[test]
fn lint0_extint_and_masking() {
    let mut a = xapic();
    let _ = a.write_register(LVT_LINT0, 0x700, 0);
    assert!(a.set_lint(0, true, 0));
    assert!(a.take_events().extint);
    let _ = a.write_register(LVT_LINT0, 0x1_0700, 0);
    a.set_lint(0, false, 0);
    assert!(!a.set_lint(0, true, 0), "masked");
    assert!(!a.events().extint);
}

// SDM §11.5.1 remote IRR: a level-triggered fixed LINT0 sets remote IRR when accepted,
// clears it on EOI, and re-delivers while the pin stays asserted.
#[test]
fn lint0_level_fixed_remote_irr_cycle() {
    let mut a = xapic();
    let _ = a.write_register(LVT_LINT0, 0x8000 | 0x55, 0);
    assert!(a.set_lint(0, true, 0));
    assert_ne!(a.read_register(LVT_LINT0, 0) & (1 << 14), 0, "remote IRR");
    assert!(a.tmr().contains(0x55));
    assert!(
        !a.set_lint(0, true, 0),
        "no second delivery while remote IRR is set"
    );
    assert_eq!(a.acknowledge(), Some(0x55));
    let fx = a.write_register(EOI, 0, 0);
    assert_eq!(fx.eoi, Some(0x55), "level EOIs are broadcast as usual");
    assert!(a.irr().contains(0x55), "still asserted: delivered again");
    a.set_lint(0, false, 0);
    assert_eq!(a.acknowledge(), Some(0x55));
    let _ = a.write_register(EOI, 0, 0);
    assert!(a.irr().is_empty());
    assert_eq!(a.read_register(LVT_LINT0, 0) & (1 << 14), 0);
}

// SDM §11.5.1 polarity: active-low pins assert on the falling edge.
#[test]
fn lint_polarity() {
    let mut a = xapic();
    let _ = a.write_register(LVT_LINT1, 0x2000 | 0x400, 0);
    a.set_lint(1, true, 0);
    assert_eq!(a.events().nmi, 0);
    assert!(a.set_lint(1, false, 0));
    assert_eq!(a.events().nmi, 1);
}

// SDM §11.4.3: with the APIC globally disabled, LINT0 is INTR and LINT1 is NMI.
#[test]
fn disabled_apic_passes_lint_pins_through() {
    let mut a = xapic();
    let _ = a.write_apic_base(0xFEE0_0100, 0).unwrap();
    assert!(a.set_lint(1, true, 0));
    assert!(a.set_lint(0, true, 0));
    let e = a.take_events();
    assert!(e.nmi == 1 && e.extint);
}

#[test]
fn thermal_perf_cmci_are_delivered_per_lvt() {
    let mut a = xapic();
    let _ = a.write_register(0x330, 0x61, 0); // thermal fixed 0x61
    let _ = a.write_register(0x340, 0x400, 0); // perf NMI
    let _ = a.write_register(0x2F0, 0x1_0062, 0); // CMCI masked
    assert!(a.raise_local(Lvt::Thermal, 0));
    assert!(a.raise_local(Lvt::Perf, 0));
    assert!(!a.raise_local(Lvt::Cmci, 0));
    assert!(
        !a.raise_local(Lvt::Timer, 0),
        "not an embedder-raisable source"
    );
    assert_eq!(a.pending_vector(), Some(0x61));
    assert_eq!(a.events().nmi, 1);
}

// arceos observed bug (inverted mask): a masked LVT never delivers, an unmasked one does.
#[test]
fn lvt_mask_bit_is_not_inverted() {
    let mut a = xapic();
    let _ = a.write_register(0x330, 0x1_0061, 0);
    assert!(!a.raise_local(Lvt::Thermal, 0));
    let _ = a.write_register(0x330, 0x0_0061, 0);
    assert!(a.raise_local(Lvt::Thermal, 0));
}

// SDM §11.4.7.2: software disable sets every mask bit; clearing them is ignored.
#[test]
fn software_disable_forces_lvt_masks() {
    let mut a = xapic();
    let _ = a.write_register(LVT_TIMER, 0x40, 0);
    let _ = a.write_register(SVR, 0xFF, 0);
    assert_eq!(a.read_register(LVT_TIMER, 0), 0x1_0040);
    let _ = a.write_register(LVT_TIMER, 0x40, 0);
    assert_eq!(
        a.read_register(LVT_TIMER, 0),
        0x1_0040,
        "mask stays while disabled"
    );
    let _ = a.write_register(SVR, 0x1FF, 0);
    assert_eq!(
        a.read_register(LVT_TIMER, 0),
        0x1_0040,
        "enable does not unmask"
    );
}

// SDM §11.5.1 delivery status: "send pending" while the interrupt waits in IRR.
#[test]
fn lvt_delivery_status_is_derived_from_irr() {
    let mut a = xapic();
    let _ = a.write_register(0x330, 0x61, 0);
    a.raise_local(Lvt::Thermal, 0);
    assert_eq!(a.read_register(0x330, 0), 0x1061);
    a.acknowledge();
    assert_eq!(a.read_register(0x330, 0), 0x61);
}

// ---------------------------------------------------------------- ESR

// SDM §11.5.3: errors collect in a hidden latch; a write to ESR makes them visible
// and clears the latch; new error bits fire the error LVT.
#[test]
fn esr_latch_and_error_lvt() {
    let mut a = xapic();
    let _ = a.write_register(LVT_ERROR, 0xE0, 0);
    let _ = a.write_register(ICR_LO, 0x4003, 0); // fixed vector 3: send illegal
    assert_eq!(a.pending_vector(), Some(0xE0), "error LVT fired");
    a.acknowledge();
    let _ = a.write_register(EOI, 0, 0);
    let _ = a.write_register(ICR_LO, 0x4003, 0);
    assert_eq!(
        a.pending_vector(),
        None,
        "the same pending bit does not fire again"
    );
    assert_eq!(a.read_register(ESR, 0), 0);
    assert_eq!(latch_esr(&mut a), ESR_SEND_ILLEGAL_VECTOR);
    let _ = a.write_register(ICR_LO, 0x4003, 0);
    assert_eq!(
        a.pending_vector(),
        Some(0xE0),
        "after the latch cleared, it fires again"
    );
}

// Xen XSA-462: an illegal error-LVT vector must not make error reporting recurse.
#[test]
fn illegal_error_lvt_vector_does_not_recurse() {
    let mut a = xapic();
    let _ = a.write_register(LVT_ERROR, 0x05, 0);
    let _ = a.write_register(ICR_LO, 0x4002, 0);
    assert!(a.irr().is_empty());
    assert_eq!(
        latch_esr(&mut a),
        ESR_SEND_ILLEGAL_VECTOR | ESR_RECEIVE_ILLEGAL_VECTOR
    );
}

// ---------------------------------------------------------------- ICR (point 10)

// SDM §11.6.1: an ICR-low write sends; the message is returned, not delivered.
#[test]
fn icr_modes_produce_messages() {
    let mut a = xapic();
    let _ = a.write_register(ICR_HI, 0x0500_0000, 0);
    let cases = [
        (0x4041u32, DeliveryMode::Fixed),
        (0x4141, DeliveryMode::LowestPriority),
        (0x4200, DeliveryMode::Smi),
        (0x4400, DeliveryMode::Nmi),
        (0x4500, DeliveryMode::Init),
        (0x4608, DeliveryMode::StartUp),
    ];
    for (lo, mode) in cases {
        let m = a.write_register(ICR_LO, lo, 0).ipi.expect("sent");
        assert_eq!(m.mode, mode);
        assert_eq!(m.dest, 5);
        assert_eq!(m.dest_mode, DestMode::Physical);
        assert!(!m.x2apic);
    }
    let m = a.write_register(ICR_LO, 0xC0851, 0).ipi.unwrap();
    assert_eq!(
        (m.shorthand, m.dest_mode),
        (Shorthand::AllExcludingSelf, DestMode::Logical)
    );
    let m = a.write_register(ICR_LO, 0x80051, 0).ipi.unwrap();
    assert_eq!(m.shorthand, Shorthand::AllIncludingSelf);
    assert_eq!(
        a.read_register(ICR_LO, 0) & (1 << 12),
        0,
        "delivery status idle"
    );
}

// SDM Table "Valid combinations": NMI to self, INIT level de-assert, reserved modes
// send nothing; vectors below 16 set ESR send-illegal.
#[test]
fn invalid_icr_sends_nothing() {
    let mut a = xapic();
    assert_eq!(
        a.write_register(ICR_LO, 0x44400, 0).ipi,
        None,
        "NMI with self shorthand"
    );
    assert_eq!(
        a.write_register(ICR_LO, 0x8500, 0).ipi,
        None,
        "INIT level de-assert"
    );
    assert_eq!(a.write_register(ICR_LO, 0x4340, 0).ipi, None, "mode 011");
    assert_eq!(a.write_register(ICR_LO, 0x4740, 0).ipi, None, "mode 111");
    assert_eq!(a.stats().ipi_dropped, 4);
    assert_eq!(a.write_register(ICR_LO, 0x400F, 0).ipi, None);
    assert_eq!(latch_esr(&mut a), ESR_SEND_ILLEGAL_VECTOR);
}

// QEMU observed bug: a self IPI must reach this APIC whatever its (guest-written) ID.
#[test]
fn self_ipi_ignores_the_guest_written_id() {
    let mut a = xapic();
    let _ = a.write_register(0x20, 0xFF00_0000, 0);
    let fx = a.write_register(ICR_LO, 0x40061, 0);
    assert_eq!(fx.ipi, None, "handled locally");
    assert_eq!(a.pending_vector(), Some(0x61));
    let mut b = x2apic(0xFFFF_FFFE);
    let _ = b.write_msr(0x83F, 0x62, 0).unwrap();
    assert_eq!(b.pending_vector(), Some(0x62));
}

// COCONUT-SVSM observed bug: SELF IPI must refuse vectors 0–15 (and vector 0 is not "none").
#[test]
fn self_ipi_register_refuses_illegal_vectors() {
    let mut a = x2apic(1);
    let _ = a.write_msr(0x83F, 0, 0).unwrap();
    assert!(a.irr().is_empty());
    let _ = a.write_msr(0x828, 0, 0).unwrap();
    assert_eq!(a.read_msr(0x828, 0), Ok(u64::from(ESR_SEND_ILLEGAL_VECTOR)));
}

// OpenVMM observed bug (unreachable!() on odd DFR models): any DFR value is stored.
#[test]
fn odd_dfr_model_is_harmless() {
    let mut a = xapic();
    let fx = a.write_register(0xE0, 0x5000_0000, 0);
    assert!(fx.routing_changed);
    assert_eq!(a.read_register(0xE0, 0), 0x5FFF_FFFF);
}

// SDM Vol. 3A §6.7.1 (kvm-unit-tests test_multiple_nmi / test_pending_nmi): two NMIs that
// arrive before the core takes the first are both delivered (one taken, one latched);
// further ones collapse.
#[test]
fn two_nmis_are_kept_more_collapse() {
    let mut a = xapic();
    let nmi = Delivery::event(DeliveryMode::Nmi, 0);
    a.deliver(nmi, 0);
    a.deliver(nmi, 0);
    assert_eq!(a.events().nmi, 2);
    for _ in 0..8 {
        a.deliver(nmi, 0);
    }
    assert_eq!(a.take_events().nmi, 2);
    assert_eq!(a.events().nmi, 0);
    assert!(!a.has_work());
}
