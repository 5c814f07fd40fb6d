//! Byte formats: round trips, conversions, golden files and decode errors with
//! offsets (KVM `kvm_lapic_state`, illumos `vdi_lapic_v1`, the native format).

use std::path::PathBuf;
use vlapic::state::kvm::{self, KvmExtra};
use vlapic::state::{bhyve, native, DecodeError, FabricState, Field, IoApicState, LapicState};
use vlapic::{Delivery, LapicConfig, LocalApic, TimerClock};

const CLK: TimerClock = TimerClock {
    bus_cycle_ns: 1,
    tsc_hz: 1_000_000_000,
};

/// The golden scenario: nested 0x41 (level) / 0x61 / 0x81 in service, 0x35
/// pending, TPR 0x20, periodic timer (divide by 1, count 5000) armed at 6000,
/// a pending ESR bit (send illegal vector).
fn golden_apic() -> LocalApic {
    let mut apic = LocalApic::new(LapicConfig::default());
    let _ = apic.write_register(0xF0, 0x1FF, 0);
    let _ = apic.write_register(0x80, 0x20, 0);
    let _ = apic.write_register(0x3E0, 0xB, 0);
    let _ = apic.write_register(0x320, 0x2_00EC, 0);
    let _ = apic.write_register(0x350, 0x700, 0); // LINT0 ExtINT
    let _ = apic.write_register(0x360, 0x400, 0); // LINT1 NMI
    let _ = apic.write_register(0x370, 0x1_00FE, 0); // error LVT masked
    let _ = apic.write_register(0x380, 5000, 1000);
    for (v, level) in [(0x41, true), (0x61, false), (0x81, false)] {
        let d = if level {
            Delivery::fixed_level(v)
        } else {
            Delivery::fixed(v)
        };
        apic.deliver(d, 1000);
        assert_eq!(apic.acknowledge(), Some(v));
    }
    apic.deliver(Delivery::fixed(0x35), 1000);
    let _ = apic.write_register(0x310, 0x0300_0000, 1000);
    let _ = apic.write_register(0x300, 0x4_0005, 1000); // self IPI, vector 5: illegal
    apic
}

fn golden_state() -> LapicState {
    golden_apic().export()
}

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Compares with the golden file; `VLAPIC_BLESS=1` rewrites it instead.
fn golden(name: &str, bytes: &[u8]) {
    let path = golden_dir().join(name);
    if std::env::var_os("VLAPIC_BLESS").is_some() {
        std::fs::write(&path, bytes).unwrap();
    }
    let want = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        want == bytes,
        "{name} differs from the golden file (VLAPIC_BLESS=1 to update)"
    );
}

#[test]
fn golden_state_is_what_we_think() {
    let s = golden_state();
    assert_eq!(
        s.isr_set().iter().collect::<Vec<_>>(),
        vec![0x41, 0x61, 0x81]
    );
    assert_eq!(s.tmr_set().iter().collect::<Vec<_>>(), vec![0x41]);
    assert_eq!(s.irr_set().iter().collect::<Vec<_>>(), vec![0x35]);
    assert_eq!(s.esr_pending, 0x20);
    assert_eq!(s.timer_deadline, 6000);
    assert!(s.validate(&LapicConfig::default()).is_empty());
}

// Golden files pin the three byte layouts.
#[test]
fn golden_files() {
    let s = golden_state();
    golden("nested.native", &native::encode_lapic(&s));
    golden("nested.kvm", &kvm::encode(&s, 2000, &CLK).0);
    golden("nested.bhyve", &bhyve::encode(&s));
    assert_eq!(
        native::decode_lapic(&std::fs::read(golden_dir().join("nested.native")).unwrap()),
        Ok(s)
    );
}

// state-formats.md §1: the KVM page layout, slot by slot.
#[test]
fn kvm_layout() {
    let s = golden_state();
    let (page, extra) = kvm::encode(&s, 2000, &CLK);
    let word = |off: usize| u32::from_le_bytes(page[off..off + 4].try_into().unwrap());
    assert_eq!(word(0x20), 0, "xAPIC ID 0 in bits 31:24");
    assert_eq!(word(0x30), 0x0106_0014);
    assert_eq!(word(0x80), 0x20);
    assert_eq!(word(0xA0), 0x80, "PPR written for KVM");
    assert_eq!(word(0xF0), 0x1FF);
    assert_eq!(word(0x120), 1 << 1, "ISR2 holds 0x41");
    assert_eq!(word(0x130), 1 << 1, "ISR3 holds 0x61");
    assert_eq!(word(0x140), 1 << 1, "ISR4 holds 0x81");
    assert_eq!(word(0x1A0), 1 << 1, "TMR2 holds 0x41");
    assert_eq!(word(0x200 + 0x10), 1 << (0x35 - 32), "IRR1 holds 0x35");
    assert_eq!(word(0x310), 0x0300_0000, "ICR high");
    assert_eq!(word(0x300), 0x4_0005, "ICR low");
    assert_eq!(word(0x320), 0x2_00EC);
    assert_eq!(word(0x380), 5000);
    assert_eq!(
        word(0x390),
        4000,
        "current count at 2000 of an expiry at 6000"
    );
    assert_eq!(word(0x3E0), 0xB);
    assert!(
        page[0x24..0x30].iter().all(|&b| b == 0),
        "reserved slot bytes zero"
    );
    assert_eq!(extra.apic_base, 0xFEE0_0900);
    // KVM SET_LAPIC re-arms TMCCT ticks after now.
    let back = kvm::decode(&page, extra, 2000, &CLK).unwrap();
    assert_eq!(back.timer_deadline, 6000);
    assert_eq!(back.esr_pending, 0, "KVM has no place for pending ESR bits");
    assert_eq!(
        LapicState {
            esr_pending: 0x20,
            ..back
        },
        s
    );
}

// KVM_X2APIC_API_USE_32BIT_IDS: the full 32-bit ID at 0x20 in x2APIC mode.
#[test]
fn kvm_x2apic_id_is_32_bits() {
    let c = LapicConfig::default().with_apic_id(0x1234).with_bsp(false);
    let mut apic = LocalApic::new(c);
    let _ = apic.write_apic_base(0xFEE0_0C00, 0).unwrap();
    let s = apic.export();
    let (page, extra) = kvm::encode(&s, 0, &CLK);
    assert_eq!(&page[0x20..0x24], &0x1234u32.to_le_bytes());
    assert_eq!(kvm::decode(&page, extra, 0, &CLK), Ok(s));
    let b = bhyve::encode(&s);
    assert_eq!(&b[0..4], &0x1234u32.to_le_bytes());
    assert_eq!(bhyve::decode(&b, 0), Ok(s));
}

// KVM clamps a TMCCT above TMICT to TMICT; an expiry already due survives as 1.
#[test]
fn kvm_current_count_clamped_and_due_expiry_kept() {
    let s = golden_state();
    let (mut page, extra) = kvm::encode(&s, 2000, &CLK);
    page[0x390..0x394].copy_from_slice(&u32::MAX.to_le_bytes());
    let back = kvm::decode(&page, extra, 2000, &CLK).unwrap();
    assert_eq!(back.timer_deadline, 7000, "2000 + TMICT");
    let (page, _) = kvm::encode(&s, 9000, &CLK);
    assert_eq!(&page[0x390..0x394], &1u32.to_le_bytes());
}

// state-formats.md §2: vdi_lapic_v1 offsets (C ABI on x86-64).
#[test]
fn bhyve_layout() {
    let s = golden_state();
    let b = bhyve::encode(&s);
    let u32_at = |off: usize| u32::from_le_bytes(b[off..off + 4].try_into().unwrap());
    let u64_at = |off: usize| u64::from_le_bytes(b[off..off + 8].try_into().unwrap());
    assert_eq!(b.len(), 200);
    assert_eq!(u32_at(4), 0x0106_0014);
    assert_eq!(u32_at(8), 0x20);
    assert_eq!(u32_at(24), 0x1FF);
    assert_eq!(u32_at(28 + 8), 1 << 1, "vlp_isr[2]");
    assert_eq!(u32_at(60 + 8), 1 << 1, "vlp_tmr[2]");
    assert_eq!(u32_at(92 + 4), 1 << (0x35 - 32), "vlp_irr[1]");
    assert_eq!(u64_at(136), 0x0300_0000_0004_0005, "vlp_icr");
    assert_eq!(u32_at(144), 0x2_00EC, "vlp_lvt_timer");
    assert_eq!(u32_at(164), 0x1_00FE, "vlp_lvt_error");
    assert_eq!(u32_at(168), 5000);
    assert_eq!(u32_at(172), 0xB);
    assert_eq!(u64_at(176), 0xFEE0_0900);
    assert_eq!(u64_at(184), 6000, "vl_timer_target");
    assert_eq!(u32_at(192), 0x20, "vl_esr_pending");
    assert_eq!(bhyve::decode(&b, 0), Ok(s), "nothing lost");
}

#[test]
fn conversions_between_formats() {
    let s = golden_state();
    // native -> bhyve -> KVM -> native, at a fixed now.
    let n = native::decode_lapic(&native::encode_lapic(&s)).unwrap();
    let b = bhyve::decode(&bhyve::encode(&n), 0).unwrap();
    let (page, extra) = kvm::encode(&b, 3000, &CLK);
    let k = kvm::decode(&page, extra, 3000, &CLK).unwrap();
    assert_eq!(
        LapicState {
            esr_pending: s.esr_pending,
            ..k
        },
        s
    );
    // KVM -> bhyve keeps the expiry KVM implied.
    let b2 = bhyve::decode(&bhyve::encode(&k), 0).unwrap();
    assert_eq!(b2.timer_deadline, 6000);
    // Every converted state still imports.
    for st in [n, b, k, b2] {
        let mut apic = LocalApic::new(LapicConfig::default());
        apic.import(&st, 3000).unwrap();
    }
}

#[test]
fn decode_errors_carry_offsets() {
    assert_eq!(
        kvm::decode(&[0u8; 10], KvmExtra::default(), 0, &CLK)
            .unwrap_err()
            .offset,
        10
    );
    let mut page = [0u8; 1024];
    page[0x20] = 1;
    assert_eq!(
        kvm::decode(&page, KvmExtra::default(), 0, &CLK),
        Err(DecodeError {
            offset: 0x20,
            field: "id",
            reason: "xAPIC ID register bits 23:0 are not zero",
            version: None,
        })
    );
    let mut b = bhyve::encode(&golden_state());
    b[191] = 0x80;
    assert_eq!(bhyve::decode(&b, 0).unwrap_err().offset, 184);
    assert_eq!(bhyve::decode(&b[..199], 0).unwrap_err().offset, 199);
    let mut n = native::encode_lapic(&golden_state());
    assert_eq!(native::decode_lapic(&n[..5]).unwrap_err().field, "magic");
    let last = n.len() - 1;
    n[last] ^= 1;
    assert_eq!(native::decode_lapic(&n).unwrap_err().offset, last - 3);
    n[last] ^= 1;
    n[9] = 9;
    assert_eq!(
        native::decode_lapic(&n).unwrap_err().field,
        "format_version"
    );
}

// Issue 10 finding 6: a file from another format version says which version it
// holds and which one this build reads (docs/state-formats.md, native header).
#[test]
fn unsupported_native_version_names_both_versions() {
    let mut n = native::encode_lapic(&golden_state());
    n[8..10].copy_from_slice(&7u16.to_le_bytes());
    let e = native::decode_lapic(&n).unwrap_err();
    assert_eq!((e.offset, e.field), (8, "format_version"));
    assert_eq!(
        e.version,
        Some(vlapic::state::VersionMismatch {
            found: 7,
            supported: 1
        })
    );
    assert_eq!(
        e.to_string(),
        "format_version (byte 0x8): unsupported format version 7 (this build reads version 1)"
    );
    n[8..10].copy_from_slice(&0x0100u16.to_le_bytes());
    let e = native::decode_fabric(&n).unwrap_err();
    assert!(
        e.to_string()
            .contains("version 256 (this build reads version 1)"),
        "{e}"
    );
}

#[test]
fn field_offsets_per_format() {
    let s = golden_state();
    assert_eq!(kvm::field_offset(Field::Isr), Some(0x100));
    assert_eq!(kvm::field_offset(Field::EsrPending), None);
    assert_eq!(bhyve::field_offset(Field::TimerDeadline), Some(184));
    assert_eq!(
        bhyve::field_offset(Field::Lvt(vlapic::Lvt::Cmci)),
        Some(128)
    );
    assert_eq!(
        native::field_offset(&s, Field::ApicBase),
        native::HEADER_LEN
    );
    // apic_base 0xFEE00900 is a 5-byte varint; id 0 one byte.
    assert_eq!(
        native::field_offset(&s, Field::Version),
        native::HEADER_LEN + 6
    );
}

// The native body is the postcard 1.x encoding of the serde derive.
#[cfg(feature = "serde")]
#[test]
fn native_body_is_postcard() {
    let s = golden_state();
    let pc = postcard::to_allocvec(&s).unwrap();
    assert_eq!(native::lapic_body(&s), pc);
    assert_eq!(postcard::from_bytes::<LapicState>(&pc).unwrap(), s);
    let f = FabricState {
        apics: vec![s, s],
        ioapic: IoApicState {
            id: 1,
            select: 0x12,
            redirection: vec![0x1_0000; 24],
            pin_levels: vec![false; 24],
        },
    };
    let file = native::encode_fabric(&f);
    let body = &file[native::HEADER_LEN..file.len() - native::TRAILER_LEN];
    assert_eq!(body, postcard::to_allocvec(&f).unwrap().as_slice());
    assert_eq!(native::decode_fabric(&file), Ok(f.clone()));
    let io = native::encode_ioapic(&f.ioapic);
    assert_eq!(native::decode_ioapic(&io), Ok(f.ioapic.clone()));
    assert!(native::decode_lapic(&io).is_err(), "kind checked");
}

// JSON for people: the serde derive through serde_json round-trips.
#[cfg(feature = "serde")]
#[test]
fn json_round_trip() {
    let s = golden_state();
    let j = serde_json::to_string_pretty(&s).unwrap();
    assert!(j.contains("\"timer_deadline\": 6000"));
    assert!(
        j.contains("\"isr\": [\n    65,\n    97,\n    129\n  ]"),
        "{j}"
    );
    assert_eq!(serde_json::from_str::<LapicState>(&j).unwrap(), s);
    golden("nested.json", j.as_bytes());
}

#[test]
fn ioapic_and_fabric_rules() {
    let good = IoApicState {
        id: 2,
        select: 0,
        redirection: vec![0x1_0000; 24],
        pin_levels: vec![false; 24],
    };
    assert!(good.validate().is_empty());
    let mut bad = good.clone();
    bad.id = 0x10;
    bad.redirection[3] = 1 << 20;
    bad.redirection[4] = 1 << 14; // remote IRR on an edge entry
    bad.pin_levels.pop();
    let fields: Vec<_> = bad.validate().iter().map(|e| e.to_string()).collect();
    assert_eq!(fields.len(), 4, "{fields:?}");
    let f = FabricState {
        apics: vec![LapicState::power_on(&LapicConfig::with_id(0))],
        ioapic: good,
    };
    assert!(f.validate(&[LapicConfig::with_id(0)]).is_empty());
    assert_eq!(f.validate(&[LapicConfig::with_id(1)]).len(), 1, "BSP flag");
    assert_eq!(f.validate(&[]).len(), 1, "APIC count");
    // Two xAPICs whose guest rewrote one ID onto the other's: legal (kvm-unit-tests
    // test_aliased_xapic_physical_ipi), the fabric delivers to both, so it must migrate.
    let mut two = f.clone();
    let mut second = LapicState::power_on(&LapicConfig::with_id(1));
    assert_eq!(
        two.validate(&[LapicConfig::with_id(0), LapicConfig::with_id(1)])
            .len(),
        1,
        "one APIC state for two APICs"
    );
    second.id = 0;
    two.apics.push(second);
    let errs = two.validate(&[LapicConfig::with_id(0), LapicConfig::with_id(1)]);
    assert!(errs.is_empty(), "{errs:?}");
}

/// KVM's page for a vCPU without CMCI (no `KVM_X86_SETUP_MCE` with `MCG_CMCI_P`):
/// the version register announces max LVT 5 (`kvm_apic_set_version`:
/// `nr_lvt_entries - 1` = 5) and nothing ever writes 0x2F0, so it reads 0. Such a
/// page must decode (CMCI read as absent, i.e. its masked reset value) and import
/// into an APIC without CMCI; issue 15 found it refused as "LVT CMCI not in reset".
#[test]
fn kvm_page_without_cmci_reads_lvt_cmci_zero_and_imports() {
    let cfg = LapicConfig::default()
        .with_cmci(false)
        .with_eoi_broadcast_suppression(false);
    let mut apic = LocalApic::new(cfg);
    let _ = apic.write_register(0xF0, 0x1FF, 0);
    let (mut page, extra) = kvm::encode(&apic.export(), 0, &CLK);
    assert_eq!(
        &page[0x30..0x34],
        &0x5_0014u32.to_le_bytes(),
        "KVM's LVR without CMCI"
    );
    page[0x2F0..0x2F4].fill(0); // as KVM_GET_LAPIC returns it
    let s = kvm::decode(&page, extra, 0, &CLK).expect("decodes");
    assert_eq!(s.lvt(vlapic::Lvt::Cmci), vlapic::lvt::LVT_RESET);
    let mut dst = LocalApic::new(cfg);
    dst.import(&s, 0)
        .expect("imports into an APIC without CMCI");
    assert_eq!(dst.export(), apic.export());
    // With CMCI announced, 0 is a real (unmasked, vector 0) value and is kept.
    let mut with = page;
    with[0x30..0x34].copy_from_slice(&0x6_0014u32.to_le_bytes());
    let s = kvm::decode(&with, extra, 0, &CLK).expect("decodes");
    assert_eq!(s.lvt(vlapic::Lvt::Cmci), 0);
}

/// KVM's in-kernel APIC puts a self IPI with an illegal vector (here 3) into IRR
/// (`__apic_accept_irq` does not check the vector; found by
/// `crates/vlapic-vmm/tests/kvm_format_oracle.rs`). A real APIC never accepts one
/// (SDM §11.5.3), so the KVM decoder drops IRR bits 0-15 and the page imports.
#[test]
fn kvm_page_with_illegal_vector_in_irr_imports_without_it() {
    let cfg = LapicConfig::default();
    let mut apic = LocalApic::new(cfg);
    let _ = apic.write_register(0xF0, 0x1FF, 0);
    apic.deliver(Delivery::fixed(0x41), 0);
    let (mut page, extra) = kvm::encode(&apic.export(), 0, &CLK);
    page[0x200] |= 1 << 3; // IRR vector 3, as KVM_GET_LAPIC returned it
    let s = kvm::decode(&page, extra, 0, &CLK).expect("decodes");
    assert_eq!(s.irr, apic.export().irr, "vector 3 dropped, 0x41 kept");
    LocalApic::new(cfg).import(&s, 0).expect("imports");
}

/// KVM stores a guest's LVT timer write with the reserved mode 11 (its LVTT mask keeps
/// bits 18:17) and runs that timer as one-shot (`apic_update_lvtt`); found by
/// `crates/vlapic-vmm/tests/kvm_format_oracle.rs`. The decoder reads it as one-shot.
#[test]
fn kvm_page_with_reserved_timer_mode_reads_as_one_shot() {
    let cfg = LapicConfig::default();
    let mut apic = LocalApic::new(cfg);
    let _ = apic.write_register(0xF0, 0x1FF, 0);
    let _ = apic.write_register(0x320, 0x31, 0);
    let (mut page, extra) = kvm::encode(&apic.export(), 0, &CLK);
    page[0x322] |= 0x06; // mode 11, as KVM_GET_LAPIC returned it
    let s = kvm::decode(&page, extra, 0, &CLK).expect("decodes");
    assert_eq!(s.lvt(vlapic::Lvt::Timer), 0x31);
    LocalApic::new(cfg).import(&s, 0).expect("imports");
}
