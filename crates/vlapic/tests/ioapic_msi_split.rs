//! Issue 9, point 2: the IOAPIC as an MSI source for split-irqchip VMMs (KVM
//! KVM_CAP_SPLIT_IRQCHIP, Cloud Hypervisor): an entry's MSI reaches what the entry does.

use proptest::prelude::*;
use vlapic::fabric::{Fabric, FabricConfig};
use vlapic::ioapic::IoApic;
use vlapic::msi::{Msi, MsiMessage};
use vlapic::{ApicMode, LapicConfig};

const MSR_SVR: u32 = 0x80F;

/// Three xAPICs (IDs 0–2, flat logical IDs 1, 2, 4) and two x2APICs (IDs 0x105 and
/// 0x1FF, clusters 0x10 and 0x1F), all software-enabled: 8-bit, 15-bit, physical,
/// logical and broadcast destinations all have someone to reach.
fn vm() -> Fabric {
    let mut apics: Vec<LapicConfig> = (0..3).map(LapicConfig::with_id).collect();
    for id in [0x105, 0x1FF] {
        apics.push(LapicConfig::with_id(id).with_mode(ApicMode::X2Apic));
    }
    let mut f = Fabric::new(FabricConfig::from_apics(apics));
    for v in 0..3 {
        f.lapic_mmio_write(v, 0xF0, &0x1FFu32.to_le_bytes(), 0);
        f.lapic_mmio_write(v, 0xD0, &(1u32 << (24 + v)).to_le_bytes(), 0);
    }
    for v in 3..5 {
        f.lapic_msr_write(v, MSR_SVR, 0x1FF, 0).unwrap();
    }
    f
}

fn entry() -> impl Strategy<Value = u64> {
    (
        any::<u8>(),
        0u64..8,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![0u64..6, Just(0xFF), 0u64..0x100],
        prop_oneof![Just(0u64), Just(1), Just(0x7F), 0u64..0x80],
    )
        .prop_map(|(vector, mode, logical, level, masked, dest, ext)| {
            u64::from(vector)
                | mode << 8
                | u64::from(logical) << 11
                | u64::from(level) << 15
                | u64::from(masked) << 16
                | ext << 49
                | dest << 56
        })
}

proptest! {
    // SDM Vol. 3A §11.11 (MSI format) and the 82093AA redirection entry carry the same
    // message: routing the entry through the fabric's IOAPIC and routing the decoded
    // MSI deliver the same vector to the same APICs with the same trigger mode.
    #[test]
    fn entry_and_its_msi_deliver_alike(e in entry()) {
        let mut io = IoApic::default();
        io.set_entry(0, e);
        let msi = io.msi_message(0);
        let masked = e & (1 << 16) != 0;
        let reserved = matches!((e >> 8) & 7, 3 | 6);
        prop_assert_eq!(msi.is_none(), masked || reserved);
        let m = MsiMessage::from_redirection_entry(e);
        match Msi::decode(m.address, m.data) {
            Ok(decoded) => {
                prop_assert!(!reserved);
                prop_assert_eq!(decoded.message(), io.message(0).or_else(|| {
                    // Masked: compare with the same entry unmasked.
                    let mut u = IoApic::default();
                    u.set_entry(0, e & !(1 << 16));
                    u.message(0)
                }));
            }
            Err(_) => prop_assert!(reserved),
        }
        let Some(msi) = msi else { return Ok(()) };

        let mut by_ioapic = vm();
        by_ioapic.with_ioapic(|io| io.set_entry(0, e));
        let wake_io = by_ioapic.set_irq_line(0, true, 0);
        let mut by_msi = vm();
        let wake_msi = by_msi.msi(msi.address, msi.data, 0).unwrap();
        prop_assert_eq!(wake_io, wake_msi);
        prop_assert_eq!(by_ioapic.export().apics, by_msi.export().apics);
        for v in 0..5 {
            let tmr = |f: &Fabric| f.read_apic(v, |a| *a.tmr()).unwrap();
            prop_assert_eq!(tmr(&by_ioapic), tmr(&by_msi));
        }
    }
}

// The documented encoding, field by field (SDM §11.11.1 address, §11.11.2 data).
#[test]
fn encoding_of_each_field() {
    let m = MsiMessage::from_redirection_entry(0x41);
    assert_eq!((m.address, m.data), (0xFEE0_0000, 0x41));
    let m = MsiMessage::from_redirection_entry(0xAB << 56);
    assert_eq!(m.address, 0xFEEA_B000);
    let m = MsiMessage::from_redirection_entry(0x7F << 49);
    assert_eq!(m.address, 0xFEE0_0FE0); // destination bits 14:8 in address 11:5
    assert_eq!(Msi::decode(m.address, m.data).unwrap().dest_id, 0x7F00);
    let m = MsiMessage::from_redirection_entry(1 << 8);
    assert_eq!((m.address, m.data), (0xFEE0_0008, 0x100)); // lowest priority: hint
    let m = MsiMessage::from_redirection_entry(1 << 11);
    assert_eq!(m.address, 0xFEE0_0004); // logical
    let m = MsiMessage::from_redirection_entry(1 << 15 | 0x30);
    assert_eq!(m.data, 0xC030); // level: trigger and assert
    let m = MsiMessage::from_redirection_entry(7 << 8 | 1 << 13 | 1 << 14 | 1 << 12);
    assert_eq!((m.address, m.data), (0xFEE0_0000, 0x700)); // polarity, IRR, status dropped
}

// msi_message: None for pins that do not exist, masked entries, reserved modes.
#[test]
fn msi_message_none_cases() {
    let mut io = IoApic::default();
    assert_eq!(io.msi_message(0), None, "reset: masked");
    assert_eq!(io.msi_message(24), None);
    assert_eq!(io.msi_message(255), None);
    io.set_entry(1, 3 << 8 | 0x30);
    assert_eq!(io.msi_message(1), None);
    io.set_entry(1, 6 << 8 | 0x30);
    assert_eq!(io.msi_message(1), None);
    io.set_entry(1, 2 << 56 | 0x30);
    let m = io.msi_message(1).unwrap();
    assert_eq!((m.address, m.data), (0xFEE0_2000, 0x30));
}

// The 15-bit destination (entry bits 55:49, MSI address 11:5) reaches an x2APIC whose
// ID needs more than 8 bits, level-triggered, both ways; the level EOI goes back to
// the IOAPIC as the split model's KVM_EXIT_IOAPIC_EOI would.
#[test]
fn extended_destination_reaches_an_x2apic() {
    let e = 0x05 << 56 | 1 << 49 | 1 << 15 | 0x61;
    let mut a = vm();
    a.with_ioapic(|io| io.set_entry(0, e));
    let wa = a.set_irq_line(0, true, 0);
    assert_eq!(wa.iter().collect::<Vec<_>>(), [3]);
    let m = a.with_ioapic(|io| io.msi_message(0)).unwrap();
    let mut b = vm();
    let wb = b.msi(m.address, m.data, 0).unwrap();
    assert_eq!(wa, wb);
    for f in [&mut a, &mut b] {
        assert_eq!(f.plan_entry(3, 0, true).unwrap().inject, Some(0x61));
        assert!(f.read_apic(3, |x| x.tmr().contains(0x61)).unwrap());
    }
    // Split model: the guest's EOI of the level vector clears remote IRR.
    let mut io = IoApic::default();
    io.set_entry(0, e);
    assert_eq!(io.set_line(0, true), Some(0));
    io.set_remote_irr(0);
    assert_eq!(io.set_line(0, true), None, "in service: no second MSI");
    assert_eq!(io.eoi(0x61).iter().collect::<Vec<_>>(), [0]);
}
