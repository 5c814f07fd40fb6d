//! MSI decoding (Intel SDM Vol. 3A §11.11, address/data layout) including the 15-bit
//! extended destination ID in address bits 11:5 (Linux/KVM), and routing of decoded MSIs.

use vlapic::fabric::{FabricConfig, SharedFabric};
use vlapic::msi::{self, Msi, MsiError};
use vlapic::{ApicMode, DeliveryMode, DestMode, Effects, LapicConfig};

// SDM Figure 11-24/11-25: destination 19:12, RH bit 3, DM bit 2; vector 7:0, delivery
// mode 10:8, level bit 14, trigger bit 15.
#[test]
fn decode_fields() {
    let m = Msi::decode(0xFEE0_0000 | (0x12 << 12) | (1 << 3) | (1 << 2), 0xC141).unwrap();
    assert_eq!(m.dest_id, 0x12);
    assert!(!m.extended);
    assert_eq!(m.dest_mode, DestMode::Logical);
    assert!(m.redirection_hint);
    assert_eq!(m.mode, DeliveryMode::LowestPriority);
    assert_eq!(m.vector, 0x41);
    assert!(m.level_triggered && m.assert);
    let m = Msi::decode(0xFEE0_0003, 0x0400).unwrap(); // bits 1:0 ignored
    assert_eq!(
        (m.dest_id, m.mode, m.dest_mode),
        (0, DeliveryMode::Nmi, DestMode::Physical)
    );
}

// Linux/KVM extended destination ID: address bits 11:5 are destination bits 14:8.
#[test]
fn extended_destination_id() {
    let a = msi::address(0x7ABC, false).unwrap();
    assert_eq!(a, 0xFEE0_0000 | (0xBC << 12) | (0x7A << 5));
    let m = Msi::decode(a, 0x41).unwrap();
    assert_eq!(m.dest_id, 0x7ABC);
    assert!(m.extended);
    assert_eq!(msi::address(0x8000, false), None);
    // With extended bits, a low byte of 0xFF is an ID, not a broadcast.
    let m = Msi::decode(msi::address(0x1FF, false).unwrap(), 0x41).unwrap();
    assert_eq!(m.message().unwrap().dest.id, 0x1FF);
    assert!(!m.message().unwrap().dest.is_broadcast());
}

// Malformed messages are refused, not guessed: wrong address window, remappable format
// (bit 4, needs an IOMMU), reserved delivery modes 011 and 110.
#[test]
fn malformed_refused() {
    assert_eq!(
        Msi::decode(0xFED0_0000, 0x41),
        Err(MsiError::NotInterruptAddress)
    );
    assert_eq!(
        Msi::decode(0x1_FEE0_0000, 0x41),
        Err(MsiError::NotInterruptAddress)
    );
    assert_eq!(Msi::decode(0, 0), Err(MsiError::NotInterruptAddress));
    assert_eq!(Msi::decode(0xFEE0_0010, 0x41), Err(MsiError::Remappable));
    assert_eq!(
        Msi::decode(0xFEE0_0000, 0x341),
        Err(MsiError::ReservedDeliveryMode)
    );
    assert_eq!(
        Msi::decode(0xFEE0_0000, 0x641),
        Err(MsiError::ReservedDeliveryMode)
    );
    let f = SharedFabric::new(FabricConfig::with_vcpus(1));
    assert_eq!(f.msi(0xFEE0_0010, 0x41, 0), Err(MsiError::Remappable));
}

// SDM §11.11.2: a level-triggered de-assert message sends nothing.
#[test]
fn level_deassert_sends_nothing() {
    let m = Msi::decode(0xFEE0_0000, 0x8041).unwrap();
    assert!(m.message().is_none());
    let f = SharedFabric::new(FabricConfig::with_vcpus(1));
    f.lapic_mmio_write(0, 0xF0, &0x1FFu32.to_le_bytes(), 0);
    assert!(f.msi(0xFEE0_0000, 0x8041, 0).unwrap().is_empty());
    // Level assert sets TMR at the target.
    assert!(f.msi(0xFEE0_0000, 0xC041, 0).unwrap().contains(0));
    let (t, _) = f
        .with_apic(0, 0, |a| (a.tmr().contains(0x41), Effects::default()))
        .unwrap();
    assert!(t);
}

// An MSI with an extended destination reaches an x2APIC vCPU with an ID above 255
// (what Linux does for >255 CPUs without an IOMMU); 8-bit 0xFF broadcasts.
#[test]
fn extended_msi_routes_to_high_ids() {
    let apics = [0u32, 300, 0x7FFF]
        .iter()
        .map(|&id| LapicConfig::with_id(id).with_mode(ApicMode::X2Apic))
        .collect();
    let f = SharedFabric::new(
        FabricConfig::from_apics(apics)
            .with_ioapic_pins(24)
            .with_ioapic_id(0)
            .with_ioapic_base(vlapic::ioapic::IoApic::DEFAULT_BASE),
    );
    for i in 0..3 {
        f.lapic_msr_write(i, 0x80F, 0x1FF, 0).unwrap();
    }
    let w = f.msi(msi::address(300, false).unwrap(), 0x41, 0).unwrap();
    assert_eq!(w.iter().collect::<Vec<_>>(), [1]);
    let w = f
        .msi(msi::address(0x7FFF, false).unwrap(), 0x42, 0)
        .unwrap();
    assert_eq!(w.iter().collect::<Vec<_>>(), [2]);
    let w = f.msi(0xFEE0_0000 | (0xFF << 12), 0x43, 0).unwrap();
    assert_eq!(w.len(), 3);
    // Without the extension the 8-bit ID 300 & 0xFF = 44 exists nowhere.
    assert!(f.msi(0xFEE0_0000 | (44 << 12), 0x44, 0).unwrap().is_empty());
}
