//! Issue 2, points 2–4: the xAPIC page, the x2APIC MSRs and IA32_APIC_BASE, each
//! test citing the SDM (Vol. 3A, chapter 11) or the peer whose behaviour it follows.

mod common;
use common::*;
use vlapic::regs::*;
use vlapic::{ApicMode, GpFault, LapicConfig, LocalApic};

// ---------------------------------------------------------------- xAPIC page

// SDM §11.4.8 (Figure 11-7): version 0x14 family, max LVT entry in bits 23:16,
// bit 24 only when EOI-broadcast suppression is offered.
#[test]
fn version_register_reports_max_lvt_and_suppression() {
    let mut a = xapic();
    assert_eq!(a.read_register(0x30, 0), 0x0106_0014);
    let mut b = xapic_with(
        LapicConfig::default()
            .with_cmci(false)
            .with_eoi_broadcast_suppression(false),
    );
    assert_eq!(b.read_register(0x30, 0), 0x0005_0014);
}

// SDM §11.4.7.1: power-up values.
#[test]
fn power_up_register_values() {
    let mut a = LocalApic::new(LapicConfig::with_id(5));
    assert_eq!(a.read_register(0x20, 0), 5 << 24);
    assert_eq!(a.read_register(SVR, 0), 0xFF);
    assert_eq!(a.read_register(0xE0, 0), 0xFFFF_FFFF);
    for off in [0x2F0, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370] {
        assert_eq!(a.read_register(off, 0), 0x1_0000, "LVT {off:#x} masked");
    }
    for off in [TPR, PPR, 0xD0, ICR_LO, ICR_HI, TMICT, TMCCT, TDCR, ESR] {
        assert_eq!(a.read_register(off, 0), 0, "{off:#x}");
    }
    assert_eq!(a.apic_base(), 0xFEE0_0800, "enabled xAPIC, not BSP (ID 5)");
}

// SDM Table 11-1: read-only registers ignore writes.
#[test]
fn read_only_registers_ignore_writes() {
    let mut a = xapic();
    a.deliver(vlapic::Delivery::fixed(0x41), 0);
    let before: Vec<u32> = [0x30u64, 0x90, PPR, 0xC0, 0x100, 0x180, 0x200, 0x220, TMCCT]
        .iter()
        .map(|&o| a.read_register(o, 0))
        .collect();
    for off in [0x30u64, 0x90, PPR, 0xC0, 0x100, 0x180, 0x200, 0x220, TMCCT] {
        let _ = a.write_register(off, 0xFFFF_FFFF, 0);
    }
    let after: Vec<u32> = [0x30u64, 0x90, PPR, 0xC0, 0x100, 0x180, 0x200, 0x220, TMCCT]
        .iter()
        .map(|&o| a.read_register(o, 0))
        .collect();
    assert_eq!(before, after);
    assert!(a.irr().contains(0x41));
}

// SDM Figures 11-5, 11-13, 11-14, 11-18 and 11-10: reserved bits read as written-0
// (DFR bits 27:0 read as ones).
#[test]
fn reserved_bits_are_masked_on_mmio_writes() {
    let mut a = xapic();
    let cases = [
        (TPR, 0xFFFF_FFFF, 0xFF),
        (0x20, 0xFFFF_FFFF, 0xFF00_0000),
        (0xD0, 0xFFFF_FFFF, 0xFF00_0000),
        (0xE0, 0x0000_0000, 0x0FFF_FFFF),
        (TDCR, 0xFFFF_FFFF, 0xB),
        (LVT_ERROR, 0xFFFF_FFFF, 0x1_00FF),
        (LVT_LINT0, 0xFFFF_FFFF, 0x1_A7FF),
        (LVT_TIMER, 0x0002_00FF, 0x0002_00FF),
        (ICR_HI, 0xFFFF_FFFF, 0xFF00_0000),
        (SVR, 0xFFFF_FFFF, 0x13FF),
    ];
    for (off, w, r) in cases {
        let _ = a.write_register(off, w, 0);
        assert_eq!(a.read_register(off, 0), r, "{off:#x}");
    }
}

// Access-size rule (KVM's): reads of 1/2/4 bytes inside bytes 0–3 of a slot; other
// reads return zeros; only aligned 4-byte writes take effect.
#[test]
fn access_sizes_and_alignment() {
    let mut a = xapic();
    let _ = a.write_register(TPR, 0xA5, 0);
    let _ = a.write_register(0x20, 0x1200_0000, 0);
    let mut b1 = [0u8; 1];
    a.mmio_read(0x23, &mut b1, 0);
    assert_eq!(b1, [0x12], "byte 3 of the ID register");
    let mut b2 = [0u8; 2];
    a.mmio_read(0x80, &mut b2, 0);
    assert_eq!(b2, [0xA5, 0]);
    let mut b4 = [0xEEu8; 4];
    a.mmio_read(0x84, &mut b4, 0);
    assert_eq!(b4, [0; 4], "bytes 4–15 of a slot read zero");
    let mut b8 = [0xEEu8; 8];
    a.mmio_read(0x80, &mut b8, 0);
    assert_eq!(b8, [0; 8], "8-byte reads are not supported");
    let mut straddle = [0xEEu8; 4];
    a.mmio_read(0x82, &mut straddle, 0);
    assert_eq!(straddle, [0; 4]);
    // Writes: 1-byte, 2-byte, 8-byte and misaligned 4-byte writes are ignored.
    let _ = a.mmio_write(0x80, &[0x11], 0);
    let _ = a.mmio_write(0x80, &[0x11, 0], 0);
    let _ = a.mmio_write(0x80, &[0x11, 0, 0, 0, 0, 0, 0, 0], 0);
    let _ = a.mmio_write(0x84, &[0x11, 0, 0, 0], 0);
    assert_eq!(a.tpr(), 0xA5);
    assert_eq!(
        a.stats().ignored_access,
        3 + 4,
        "three reads and four writes"
    );
}

// SDM §11.5.3, ESR bit 7: access to a reserved offset in xAPIC mode.
#[test]
fn reserved_offsets_read_zero_and_latch_illegal_register() {
    let mut a = xapic();
    for off in [0x000u64, 0x010, 0x040, 0x2A0, 0x3A0, 0x3F0, 0x400, 0xFF0] {
        assert_eq!(a.read_register(off, 0), 0, "{off:#x}");
        let _ = a.write_register(off, 0xFFFF_FFFF, 0);
    }
    assert_eq!(
        a.read_register(ESR, 0),
        0,
        "not visible before an ESR write"
    );
    assert_eq!(latch_esr(&mut a), ESR_ILLEGAL_REGISTER);
    assert_eq!(latch_esr(&mut a), 0, "the next write clears it");
}

#[test]
fn lvt_cmci_is_reserved_when_not_offered() {
    let mut a = xapic_with(LapicConfig::default().with_cmci(false));
    let _ = a.write_register(0x2F0, 0x30, 0);
    assert_eq!(a.read_register(0x2F0, 0), 0);
    assert_eq!(latch_esr(&mut a), ESR_ILLEGAL_REGISTER);
}

// kvm-unit-tests test_apic_disable: a hardware-disabled APIC's page reads all ones;
// SDM §11.12.1.2: in x2APIC mode the MMIO interface is unavailable.
#[test]
fn page_reads_all_ones_when_disabled_or_x2apic() {
    let mut a = xapic();
    let _ = a.write_apic_base(0xFEE0_0000 | APIC_BASE_BSP, 0).unwrap();
    assert_eq!(a.read_register(0x30, 0), 0xFFFF_FFFF);
    let mut b = x2apic(1);
    assert_eq!(b.read_register(0x30, 0), 0xFFFF_FFFF);
    let _ = b.write_register(TPR, 0x20, 0);
    assert_eq!(b.tpr(), 0, "writes ignored");
}

// ---------------------------------------------------------------- x2APIC MSRs

// SDM §11.12.5.1 / §11.12.10.2: x2APIC ID is the initial ID; LDR is derived.
#[test]
fn x2apic_id_and_derived_ldr() {
    let mut a = x2apic(0x1_2345);
    assert_eq!(a.read_msr(0x802, 0), Ok(0x1_2345));
    assert_eq!(
        a.read_msr(0x80D, 0),
        Ok(((0x1_2345u64 >> 4) << 16) | (1 << 5))
    );
    assert_eq!(a.ldr(), x2apic_ldr(0x1_2345));
}

// SDM §11.12.1.2: #GP for undefined MSRs in the range, read-only writes, write-only reads.
#[test]
fn x2apic_gp_cases() {
    let mut a = x2apic(3);
    for msr in [
        0x800u32, 0x801, 0x804, 0x809, 0x80C, 0x80E, 0x831, 0x83A, 0x840, 0x8FF,
    ] {
        assert_eq!(a.read_msr(msr, 0), Err(GpFault), "read {msr:#x}");
        assert_eq!(a.write_msr(msr, 0, 0), Err(GpFault), "write {msr:#x}");
    }
    for ro in [
        0x802u32, 0x803, 0x80A, 0x80D, 0x810, 0x817, 0x818, 0x820, 0x827, 0x839,
    ] {
        assert_eq!(
            a.write_msr(ro, 0, 0),
            Err(GpFault),
            "write to read-only {ro:#x}"
        );
        assert!(a.read_msr(ro, 0).is_ok());
    }
    for wo in [0x80Bu32, 0x83F] {
        assert_eq!(
            a.read_msr(wo, 0),
            Err(GpFault),
            "read of write-only {wo:#x}"
        );
    }
}

// SDM §11.12.1.3: non-zero reserved bits are #GP in x2APIC mode (EOI value, ESR
// value, SELF IPI bits 63:8, ICR bits 13/17:16/31:20 as KVM, 32-bit registers' high half).
#[test]
fn x2apic_reserved_bit_gp() {
    let mut a = x2apic(3);
    assert_eq!(a.write_msr(0x80B, 1, 0), Err(GpFault));
    assert_eq!(a.write_msr(0x828, 1, 0), Err(GpFault));
    assert_eq!(a.write_msr(0x83F, 0x100, 0), Err(GpFault));
    for bit in [13u32, 16, 17, 20, 31] {
        assert_eq!(
            a.write_msr(0x830, 0x40 | 1 << bit, 0),
            Err(GpFault),
            "ICR bit {bit}"
        );
    }
    assert_eq!(a.write_msr(0x808, 0x100, 0), Err(GpFault), "TPR bits 31:8");
    assert_eq!(a.write_msr(0x808, 1 << 32, 0), Err(GpFault), "bits 63:32");
    assert_eq!(a.write_msr(0x83E, 0x4, 0), Err(GpFault), "DCR bit 2");
    assert_eq!(
        a.write_msr(0x832, 3 << 17, 0),
        Err(GpFault),
        "timer mode 11"
    );
    assert_eq!(
        a.write_msr(0x837, 0x700, 0),
        Err(GpFault),
        "error LVT has no delivery mode"
    );
    assert_eq!(a.write_msr(0x80F, 1 << 10, 0), Err(GpFault), "SVR bit 10");
    // Read-only status bits are not reserved: a read-modify-write must not #GP.
    assert!(a.write_msr(0x835, 0x1_0000 | 1 << 12 | 1 << 14, 0).is_ok());
    // Nothing changed by the faulting writes.
    assert_eq!(a.tpr(), 0);
    assert_eq!(a.timer().divide_config(), 0);
}

// SDM §11.12.9: the 64-bit ICR at 0x830 carries a 32-bit destination; no ICR high.
#[test]
fn x2apic_icr_is_64_bit() {
    let mut a = x2apic(0);
    let fx = a.write_msr(0x830, 0xABCD_0123_0000_0051, 0).unwrap();
    let m = fx.ipi.expect("sent");
    assert_eq!((m.dest, m.vector, m.x2apic), (0xABCD_0123, 0x51, true));
    assert_eq!(a.read_msr(0x830, 0), Ok(0xABCD_0123_0000_0051));
}

#[test]
fn x2apic_msrs_gp_outside_x2apic_mode() {
    let mut a = xapic();
    assert_eq!(a.read_msr(0x802, 0), Err(GpFault));
    assert_eq!(a.write_msr(0x808, 0, 0), Err(GpFault));
    assert_eq!(a.read_msr(0x1B, 0), Ok(0xFEE0_0900));
    assert_eq!(a.read_msr(0x10, 0), Err(GpFault), "not an APIC MSR");
}

// Xen XSA-108: MSRs above the defined range must never map onto page offsets.
#[test]
fn msrs_beyond_the_page_do_not_alias_registers() {
    let mut a = x2apic(0);
    for msr in 0x840u32..=0x8FF {
        assert_eq!(a.read_msr(msr, 0), Err(GpFault));
    }
    assert_eq!(a.read_msr(0x900, 0), Err(GpFault));
}

// ---------------------------------------------------------------- IA32_APIC_BASE

// SDM §11.12.5 Figure 11-27 (x2APIC state transitions); kvm-unit-tests test_enable_x2apic.
#[test]
fn apic_base_transitions() {
    const BASE: u64 = 0xFEE0_0000 | APIC_BASE_BSP;
    const XA: u64 = BASE | APIC_BASE_EN;
    const X2: u64 = XA | APIC_BASE_EXTD;
    const INVALID: u64 = BASE | APIC_BASE_EXTD;
    let mut a = xapic();
    assert_eq!(
        a.write_apic_base(INVALID, 0),
        Err(GpFault),
        "EXTD without EN"
    );
    assert!(a.write_apic_base(X2, 0).is_ok(), "xAPIC -> x2APIC");
    assert_eq!(a.mode(), ApicMode::X2Apic);
    assert_eq!(a.write_apic_base(XA, 0), Err(GpFault), "x2APIC -> xAPIC");
    assert_eq!(a.write_apic_base(INVALID, 0), Err(GpFault));
    assert!(a.write_apic_base(BASE, 0).is_ok(), "x2APIC -> disabled");
    assert_eq!(a.write_apic_base(X2, 0), Err(GpFault), "disabled -> x2APIC");
    assert!(a.write_apic_base(XA, 0).is_ok(), "disabled -> xAPIC");
    assert_eq!(a.mode(), ApicMode::XApic);
}

// SDM §11.4.4: reserved bits and bits at or above MAXPHYADDR are #GP.
#[test]
fn apic_base_reserved_bits() {
    let mut a = xapic_with(LapicConfig::default().with_max_phys_addr(36));
    let ok = a.apic_base();
    for bit in [0u32, 7, 9, 36, 40, 63] {
        assert_eq!(
            a.write_apic_base(ok | 1 << bit, 0),
            Err(GpFault),
            "bit {bit}"
        );
    }
    let mut no_x2 = xapic_with(LapicConfig::default().with_x2apic(false));
    assert_eq!(no_x2.write_apic_base(ok | APIC_BASE_EXTD, 0), Err(GpFault));
    assert_eq!(a.apic_base(), ok);
}

// SDM §11.4.3 / §11.12.5.1: disabling resets the APIC to its power-up state.
#[test]
fn disabling_resets_to_power_up_state() {
    let mut a = xapic();
    let _ = a.write_register(TPR, 0x30, 0);
    let _ = a.write_register(0x20, 0x0900_0000, 0);
    a.deliver(vlapic::Delivery::fixed(0x80), 0);
    a.acknowledge();
    let _ = a.write_apic_base(0xFEE0_0900 & !APIC_BASE_EN, 0).unwrap();
    let _ = a.write_apic_base(0xFEE0_0900, 0).unwrap();
    assert_eq!(a.read_register(SVR, 0), 0xFF);
    assert_eq!(a.tpr(), 0);
    assert!(a.isr().is_empty() && a.irr().is_empty());
    assert_eq!(a.id(), 0, "ID back to the initial APIC ID");
    assert_eq!(a.verifier().violations(), 0);
}

// SDM §11.12.5.1: INIT keeps the x2APIC mode (illumos O7, ACRN #4267 lost it).
#[test]
fn init_keeps_mode_and_id() {
    let mut a = x2apic(7);
    let _ = a.write_msr(0x808, 0x40, 0).unwrap();
    a.deliver(vlapic::Delivery::event(vlapic::DeliveryMode::Init, 0), 0);
    assert_eq!(a.mode(), ApicMode::X2Apic);
    assert_eq!(a.read_msr(0x802, 0), Ok(7));
    assert_eq!(a.tpr(), 0);
    assert_eq!(a.read_msr(0x80F, 0), Ok(0xFF), "software-disabled again");
    assert!(a.take_events().init);
    let mut b = xapic();
    let _ = b.write_register(0x20, 0x0300_0000, 0);
    b.init_reset();
    assert_eq!(b.id(), 3, "INIT leaves the (written) xAPIC ID alone");
    assert_eq!(b.mode(), ApicMode::XApic);
}

// kvm-unit-tests test_apicbase: relocation is honoured (this crate's choice).
#[test]
fn apic_base_relocation_moves_the_page() {
    let mut a = xapic();
    assert_eq!(a.mmio_base(), Some(0xFEE0_0000));
    let fx = a
        .write_apic_base(0xFED4_0000 | APIC_BASE_EN | APIC_BASE_BSP, 0)
        .unwrap();
    assert!(fx.routing_changed);
    assert_eq!(a.mmio_base(), Some(0xFED4_0000));
    assert_eq!(a.read_register(0x30, 0) & 0xFF, 0x14, "registers intact");
}

// The BSP flag is not guest-writable (documented choice; illumos #GPs instead).
#[test]
fn bsp_flag_is_kept() {
    let mut a = xapic();
    let _ = a.write_apic_base(0xFEE0_0000 | APIC_BASE_EN, 0).unwrap();
    assert_eq!(a.apic_base() & APIC_BASE_BSP, APIC_BASE_BSP);
}
