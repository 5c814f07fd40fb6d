//! Fabric routing: every destination mode and shorthand, events, lowest priority,
//! map rebuilds and guest-triggerable edge cases, through `SharedFabric` and `Fabric`.

use vlapic::fabric::{Fabric, FabricConfig, SharedFabric};
use vlapic::routing::{Destination, Message};
use vlapic::{ApicMode, Delivery, DeliveryMode, Effects, LapicConfig, Shorthand};

const SVR: u64 = 0xF0;
const LDR: u64 = 0xD0;
const DFR: u64 = 0xE0;
const ICR_LO: u64 = 0x300;
const ICR_HI: u64 = 0x310;
const ID: u64 = 0x20;
const TPR: u64 = 0x80;

fn w32(f: &SharedFabric, vcpu: usize, off: u64, v: u32) -> vlapic::fabric::Wake {
    f.lapic_mmio_write(vcpu, off, &v.to_le_bytes(), 0)
}

/// `n` software-enabled xAPIC vCPUs (IDs 0..n).
fn xapic_vm(n: usize) -> SharedFabric {
    let f = SharedFabric::new(FabricConfig::with_vcpus(n));
    for i in 0..n {
        w32(&f, i, SVR, 0x1FF);
    }
    f
}

/// `n` software-enabled x2APIC vCPUs with the given IDs.
fn x2apic_vm(ids: &[u32]) -> SharedFabric {
    let apics = ids
        .iter()
        .map(|&id| LapicConfig::with_id(id).with_mode(ApicMode::X2Apic))
        .collect();
    let f = SharedFabric::new(
        FabricConfig::from_apics(apics)
            .with_ioapic_pins(24)
            .with_ioapic_id(0)
            .with_ioapic_base(vlapic::ioapic::IoApic::DEFAULT_BASE),
    );
    for i in 0..ids.len() {
        f.lapic_msr_write(i, 0x80F, 0x1FF, 0).unwrap();
    }
    f
}

fn xapic_ipi(f: &SharedFabric, from: usize, dest: u8, low: u32) -> vlapic::fabric::Wake {
    w32(f, from, ICR_HI, u32::from(dest) << 24);
    w32(f, from, ICR_LO, low)
}

fn x2apic_ipi(f: &SharedFabric, from: usize, icr: u64) -> vlapic::fabric::Wake {
    f.lapic_msr_write(from, 0x830, icr, 0).unwrap()
}

fn irr(f: &SharedFabric, vcpu: usize, v: u8) -> bool {
    f.with_apic(vcpu, 0, |a| (a.irr().contains(v), Effects::default()))
        .unwrap()
        .0
}

fn who_has(f: &SharedFabric, v: u8) -> Vec<usize> {
    (0..f.len()).filter(|&i| irr(f, i, v)).collect()
}

fn woken(w: &vlapic::fabric::Wake) -> Vec<usize> {
    w.iter().collect()
}

// SDM §11.6.2.1 physical destination: exactly the APIC with that ID; the Wake names it.
#[test]
fn physical_unicast_xapic() {
    let f = xapic_vm(4);
    let w = xapic_ipi(&f, 0, 2, 0x4041);
    assert_eq!(who_has(&f, 0x41), [2]);
    assert_eq!(woken(&w), [2]);
}

// crosvm `waiters[id]` panic (peers.md §5): an IPI or MSI to an APIC ID with no vCPU
// must be dropped, not index out of bounds.
#[test]
fn ipi_and_msi_to_nonexistent_id_are_dropped() {
    let f = xapic_vm(2);
    for dest in [2u8, 7, 0xFE] {
        let w = xapic_ipi(&f, 0, dest, 0x4041);
        assert!(w.is_empty(), "dest {dest}");
    }
    let w = f
        .msi(0xFEE0_0000 | (0x7F << 12) | (0x7F << 5), 0x41, 0)
        .unwrap();
    assert!(w.is_empty());
    let x2 = x2apic_vm(&[0, 1]);
    assert!(x2apic_ipi(&x2, 0, 0xDEAD_BEEF_0000_4041).is_empty());
    assert!(who_has(&f, 0x41).is_empty() && who_has(&x2, 0x41).is_empty());
    // Nonexistent vCPU indices from the VMM side are refused, not a panic.
    assert!(f.with_apic(5, 0, |_| ((), Effects::default())).is_none());
    assert!(f.lapic_msr_read(99, 0x802, 0).is_err());
    let mut b = [0u8; 4];
    f.lapic_mmio_read(99, 0x20, &mut b, 0);
    assert_eq!(b, [0xFF; 4]);
}

// SDM §11.6.2.2 flat model; kvm-unit-tests `test_logical_ipi_xapic` (absent targets ignored).
#[test]
fn logical_flat_xapic() {
    let f = xapic_vm(4);
    for i in 0..4 {
        w32(&f, i, LDR, 1 << (24 + i));
    }
    let w = xapic_ipi(&f, 0, 0b1010, 0x4851);
    assert_eq!(who_has(&f, 0x51), [1, 3]);
    assert_eq!(woken(&w), [1, 3]);
    // Bits with no APIC behind them are ignored.
    xapic_ipi(&f, 1, 0b1111_0100, 0x4852);
    assert_eq!(who_has(&f, 0x52), [2]);
}

// SDM §11.6.2.2 cluster model (DFR 0000b): cluster in bits 7:4, members in 3:0.
#[test]
fn logical_cluster_xapic() {
    let f = xapic_vm(4);
    let ldrs = [0x11u32, 0x12, 0x21, 0x24];
    for (i, l) in ldrs.iter().enumerate() {
        w32(&f, i, DFR, 0x0FFF_FFFF);
        w32(&f, i, LDR, l << 24);
    }
    xapic_ipi(&f, 0, 0x13, 0x4861);
    assert_eq!(who_has(&f, 0x61), [0, 1]);
    xapic_ipi(&f, 0, 0x25, 0x4862);
    assert_eq!(who_has(&f, 0x62), [2, 3]);
    xapic_ipi(&f, 0, 0x34, 0x4863);
    assert!(who_has(&f, 0x63).is_empty());
}

// Mixed flat and cluster DFRs: each APIC matches with its own model (the map never
// needs to fall back; the property test covers the general case).
#[test]
fn mixed_logical_models() {
    let f = xapic_vm(3);
    w32(&f, 0, LDR, 0x01 << 24); // flat, bit 0
    w32(&f, 1, DFR, 0x0FFF_FFFF);
    w32(&f, 1, LDR, 0x11 << 24); // cluster 1, member 0
    w32(&f, 2, LDR, 0x10 << 24); // flat, bit 4
    xapic_ipi(&f, 0, 0x11, 0x4871);
    assert_eq!(who_has(&f, 0x71), [0, 1, 2]);
}

// SDM §11.12.10.2 x2APIC logical: cluster = ID[19:4], member bit ID[3:0].
#[test]
fn x2apic_cluster_and_physical() {
    let f = x2apic_vm(&[0, 1, 0x11, 0x1F, 0x1_0000]);
    x2apic_ipi(&f, 0, (0x0001_8002u64 << 32) | 0x0800 | 0x41);
    assert_eq!(who_has(&f, 0x41), [2, 3]);
    // Physical x2APIC: 32-bit IDs above 0xFF are reachable.
    x2apic_ipi(&f, 0, (0x1_0000u64 << 32) | 0x42);
    assert_eq!(who_has(&f, 0x42), [4]);
    // 0xFF is an ordinary ID in x2APIC format, not a broadcast.
    x2apic_ipi(&f, 0, (0xFFu64 << 32) | 0x43);
    assert!(who_has(&f, 0x43).is_empty());
}

// kvm-unit-tests `test_physical_broadcast`: 0xFF / 0xFFFFFFFF and all-including-self
// reach every CPU once.
#[test]
fn broadcasts_reach_everyone_once() {
    let f = xapic_vm(3);
    let w = xapic_ipi(&f, 1, 0xFF, 0x4041);
    assert_eq!(woken(&w), [0, 1, 2]);
    assert_eq!(who_has(&f, 0x41), [0, 1, 2]);
    let w = xapic_ipi(&f, 1, 0, 0x8_4042); // all including self
    assert_eq!(woken(&w), [0, 1, 2]);
    let x2 = x2apic_vm(&[0, 5, 0x300]);
    let w = x2apic_ipi(&x2, 0, (0xFFFF_FFFFu64 << 32) | 0x44);
    assert_eq!(woken(&w), [0, 1, 2]);
    // Logical broadcast too.
    let w = x2apic_ipi(&x2, 0, (0xFFFF_FFFFu64 << 32) | 0x800 | 0x45);
    assert_eq!(woken(&w), [0, 1, 2]);
}

// SDM §11.6.1 shorthands: all-excluding-self skips the sender; self uses the sender
// object even when another APIC shares its (guest-writable) ID (QEMU bug, peers.md §5).
#[test]
fn shorthands() {
    let f = xapic_vm(3);
    let w = xapic_ipi(&f, 1, 0, 0xC_4041);
    assert_eq!(woken(&w), [0, 2]);
    assert_eq!(who_has(&f, 0x41), [0, 2]);
    w32(&f, 2, ID, 1 << 24); // vCPU 2 now claims ID 1
    xapic_ipi(&f, 1, 0, 0x4_4042); // self
    assert_eq!(who_has(&f, 0x42), [1]);
    let w = f.send(
        &Message {
            delivery: Delivery::fixed(0x43),
            dest: Destination::shorthand(Shorthand::SelfOnly),
        },
        0,
    );
    assert!(w.is_empty(), "self with no sender reaches nobody");
}

// kvm-unit-tests `test_aliased_xapic_physical_ipi`: two vCPUs sharing an xAPIC ID both
// receive physical IPIs; the map follows ID writes (map rebuilt on ID change).
#[test]
fn aliased_xapic_ids_and_id_change() {
    let f = xapic_vm(3);
    w32(&f, 2, ID, 1 << 24);
    xapic_ipi(&f, 0, 1, 0x4041);
    assert_eq!(who_has(&f, 0x41), [1, 2]);
    xapic_ipi(&f, 0, 2, 0x4042);
    assert!(who_has(&f, 0x42).is_empty(), "old ID 2 is gone");
    w32(&f, 1, ID, 9 << 24);
    xapic_ipi(&f, 0, 9, 0x4043);
    assert_eq!(who_has(&f, 0x43), [1]);
}

// SDM §11.4.7.2: a software-disabled APIC refuses fixed interrupts (no wake) but takes
// NMI; a hardware-disabled APIC is invisible.
#[test]
fn disabled_apics() {
    let f = xapic_vm(3);
    w32(&f, 1, SVR, 0xFF);
    let w = xapic_ipi(&f, 0, 0xFF, 0x4041);
    assert_eq!(woken(&w), [0, 2]);
    let w = xapic_ipi(&f, 0, 1, 0x4400);
    assert_eq!(woken(&w), [1]);
    assert_eq!(f.take_events(1).unwrap().nmi, 1);
    f.lapic_msr_write(2, 0x1B, 0xFEE0_0000, 0).unwrap(); // EN = 0
    let w = xapic_ipi(&f, 0, 0xFF, 0x4400);
    assert_eq!(woken(&w), [0, 1]);
}

// SDM §11.4.7.3: INIT resets the target keeping ID and mode; SIPI records the vector;
// both are per-vCPU events. The INIT also drops the target's LDR and enable from the map.
#[test]
fn init_sipi_nmi_smi_events() {
    let f = xapic_vm(2);
    w32(&f, 1, LDR, 0x02 << 24);
    let w = xapic_ipi(&f, 0, 1, 0x4500);
    assert_eq!(woken(&w), [1]);
    let (st, _) = f
        .with_apic(1, 0, |a| {
            (
                (a.id(), a.ldr(), a.is_enabled(), a.mode()),
                Effects::default(),
            )
        })
        .unwrap();
    assert_eq!(st, (1, 0, false, ApicMode::XApic));
    xapic_ipi(&f, 0, 0x02, 0x4841); // logical to the old LDR: nobody now
    assert!(who_has(&f, 0x41).is_empty());
    let w = xapic_ipi(&f, 0, 1, 0x4698);
    assert_eq!(woken(&w), [1]);
    let ev = f.take_events(1).unwrap();
    assert!(ev.init);
    assert_eq!(ev.sipi, Some(0x98));
    xapic_ipi(&f, 0, 1, 0x4200); // SMI
    assert!(f.take_events(1).unwrap().smi);
    // x2APIC mode survives INIT (ACRN #4267, illumos O7).
    let x2 = x2apic_vm(&[0, 0x123]);
    x2apic_ipi(&x2, 0, (0x123u64 << 32) | 0x4500);
    let (m, _) = x2
        .with_apic(1, 0, |a| ((a.mode(), a.id()), Effects::default()))
        .unwrap();
    assert_eq!(m, (ApicMode::X2Apic, 0x123));
}

// SDM §11.6.2.4 lowest priority: the lowest PPR wins.
#[test]
fn lowest_priority_picks_lowest_ppr() {
    let f = xapic_vm(4);
    for i in 0..4 {
        w32(&f, i, LDR, 1 << (24 + i));
    }
    w32(&f, 0, TPR, 0x50);
    w32(&f, 1, TPR, 0x30);
    w32(&f, 2, TPR, 0x20);
    w32(&f, 3, TPR, 0x40);
    let w = xapic_ipi(&f, 0, 0x0F, 0x4941);
    assert_eq!(woken(&w), [2]);
    assert_eq!(who_has(&f, 0x41), [2]);
    // Only software-enabled targets compete.
    w32(&f, 2, SVR, 0xFF);
    xapic_ipi(&f, 0, 0x0F, 0x4942);
    assert_eq!(who_has(&f, 0x42), [1]);
}

// Lowest priority ties rotate (the rotating arbitration ID): equal PPRs share the load.
#[test]
fn lowest_priority_ties_rotate() {
    let f = xapic_vm(3);
    for i in 0..3 {
        w32(&f, i, LDR, 1 << (24 + i));
    }
    let mut winners = Vec::new();
    for v in 0x40..0x46u8 {
        xapic_ipi(&f, 0, 0x07, 0x4900 | u32::from(v));
        let w = who_has(&f, v);
        assert_eq!(w.len(), 1);
        winners.push(w[0]);
    }
    for i in 0..3 {
        assert_eq!(
            winners.iter().filter(|&&x| x == i).count(),
            2,
            "{winners:?}"
        );
    }
}

// MSI redirection hint (SDM §11.11.1): lowest priority among the destinations.
#[test]
fn msi_redirection_hint_is_lowest_priority() {
    let f = xapic_vm(3);
    for i in 0..3 {
        w32(&f, i, LDR, 1 << (24 + i));
    }
    w32(&f, 0, TPR, 0x80);
    w32(&f, 2, TPR, 0x80);
    let w = f
        .msi(0xFEE0_0000 | (0x07 << 12) | (1 << 3) | (1 << 2), 0x61, 0)
        .unwrap();
    assert_eq!(woken(&w), [1]);
    let w = f
        .msi(0xFEE0_0000 | (0x07 << 12) | (1 << 2), 0x92, 0)
        .unwrap();
    assert_eq!(
        woken(&w),
        [0, 1, 2],
        "without the hint every destination gets it"
    );
}

// The Wake reports vCPUs that can take something now, and those where only TPR holds a
// posted vector back (a running vCPU must arm its TPR poll: lowering CR8 may not exit);
// a vector below the class in service needs no kick, the EOI exit will come (SDM §11.8.3.1).
#[test]
fn wake_only_when_deliverable_or_held_by_tpr() {
    let f = xapic_vm(2);
    w32(&f, 1, TPR, 0x60);
    let w = xapic_ipi(&f, 0, 1, 0x4051);
    assert_eq!(woken(&w), [1], "held back by TPR alone: kicked");
    assert!(irr(&f, 1, 0x51));
    let w = xapic_ipi(&f, 0, 1, 0x4071);
    assert_eq!(woken(&w), [1]);
    // vCPU 1 takes 0x71 (ISR class 7) and drops TPR: 0x61 is then below the class in service.
    assert_eq!(f.plan_entry(1, 0, true).and_then(|p| p.inject), Some(0x71));
    w32(&f, 1, TPR, 0x00);
    let w = xapic_ipi(&f, 0, 1, 0x4061);
    assert!(w.is_empty(), "below the in-service class: no kick");
    assert!(irr(&f, 1, 0x61));
}

// LINT pins go to the vCPU's own LVT (SDM §11.5.1): LINT1 programmed as NMI.
#[test]
fn lint_lines() {
    let f = xapic_vm(2);
    w32(&f, 1, 0x360, 0x400); // LVT LINT1: NMI, unmasked
    assert_eq!(woken(&f.set_lint(1, 1, true, 0)), [1]);
    assert_eq!(f.take_events(1).unwrap().nmi, 1);
    assert!(f.set_lint(1, 1, false, 0).is_empty());
    assert!(f.set_lint(7, 1, true, 0).is_empty());
}

// The single-threaded core routes exactly like the shared one.
#[test]
fn plain_fabric_routes() {
    let mut f = Fabric::new(FabricConfig::with_vcpus(3));
    for i in 0..3 {
        f.lapic_mmio_write(i, SVR, &0x1FFu32.to_le_bytes(), 0);
    }
    f.lapic_mmio_write(0, ICR_HI, &(2u32 << 24).to_le_bytes(), 0);
    let w = f.lapic_mmio_write(0, ICR_LO, &0x4041u32.to_le_bytes(), 0);
    assert_eq!(w.iter().collect::<Vec<_>>(), [2]);
    assert!(f.apic(2).unwrap().irr().contains(0x41));
    let w = f.send(
        &Message {
            delivery: Delivery::event(DeliveryMode::Nmi, 0),
            dest: Destination::physical(0xFF, false),
        },
        0,
    );
    assert_eq!(w.len(), 3);
    assert_eq!(f.take_events(1).unwrap().nmi, 1);
}

// 1,024 vCPUs with 32-bit x2APIC IDs; the default config picks x2APIC mode above 255.
#[test]
fn thousand_vcpus_x2apic() {
    let f = SharedFabric::new(FabricConfig::with_vcpus(1024));
    assert_eq!(f.len(), 1024);
    for i in 0..1024 {
        f.lapic_msr_write(i, 0x80F, 0x1FF, 0).unwrap();
    }
    let w = x2apic_ipi(&f, 3, (1000u64 << 32) | 0x41);
    assert_eq!(woken(&w), [1000]);
    let w = x2apic_ipi(&f, 3, 0xC_0042);
    assert_eq!(w.len(), 1023);
    assert!(!w.contains(3));
}

// SMP boot (SDM §9.4.4.1 MP initialization): INIT then SIPI to all-excluding-self; every
// AP gets both events, the BSP none.
#[test]
fn smp_boot_init_sipi_all_but_self() {
    let f = xapic_vm(4);
    let w = xapic_ipi(&f, 0, 0, 0xC_4500);
    assert_eq!(woken(&w), [1, 2, 3]);
    let w = xapic_ipi(&f, 0, 0, 0xC_469A);
    assert_eq!(woken(&w), [1, 2, 3]);
    for ap in 1..4 {
        let ev = f.take_events(ap).unwrap();
        assert!(ev.init && ev.sipi == Some(0x9A), "AP {ap}: {ev:?}");
    }
    assert!(!f.take_events(0).unwrap().any());
}

// SDM §11.12.5.1: switching to x2APIC mode makes the ID the 32-bit initial APIC ID; the
// map follows the mode change (xAPIC ID 0x05 → x2APIC ID 0x105).
#[test]
fn map_follows_x2apic_switch() {
    let f = SharedFabric::new(
        FabricConfig::from_apics(vec![LapicConfig::with_id(0), LapicConfig::with_id(0x105)])
            .with_ioapic_pins(24)
            .with_ioapic_id(0)
            .with_ioapic_base(vlapic::ioapic::IoApic::DEFAULT_BASE),
    );
    for i in 0..2 {
        w32(&f, i, SVR, 0x1FF);
    }
    xapic_ipi(&f, 0, 0x05, 0x4041);
    assert_eq!(who_has(&f, 0x41), [1]);
    for i in 0..2 {
        f.lapic_msr_write(i, 0x1B, 0xFEE0_0C00, 0).unwrap(); // EN | EXTD
    }
    x2apic_ipi(&f, 0, 0x5_0000_0042);
    assert!(who_has(&f, 0x42).is_empty());
    x2apic_ipi(&f, 0, 0x105_0000_0043);
    assert_eq!(who_has(&f, 0x43), [1]);
}
