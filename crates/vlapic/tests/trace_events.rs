//! Trace events (feature `trace`) through the fabric: each interrupt's origin (IPI
//! sender, IOAPIC pin, MSI, LVT timer, self IPI), its acknowledge and EOI, NMI/INIT.
//! Run with `cargo test -p vlapic --features trace --test trace_events`.
#![cfg(feature = "trace")]

use vlapic::fabric::{FabricConfig, SharedFabric};
use vlapic::lvt::Lvt;
use vlapic::trace::{Source, TraceKind, TRACE_CAPACITY};
use vlapic::{DeliveryMode, Effects};

fn vm(n: usize) -> SharedFabric {
    let f = SharedFabric::new(FabricConfig::with_vcpus(n));
    for i in 0..n {
        f.lapic_mmio_write(i, 0xF0, &0x1FFu32.to_le_bytes(), 0);
        f.with_apic(i, 0, |a| (a.set_trace_enabled(true), Effects::default()));
    }
    f
}

fn drain(f: &SharedFabric, vcpu: usize) -> Vec<(u64, TraceKind)> {
    let mut out = Vec::new();
    f.with_apic(vcpu, 0, |a| {
        (
            a.drain_trace(|e| out.push((e.time, e.kind))),
            Effects::default(),
        )
    });
    out
}

fn ack(f: &SharedFabric, vcpu: usize, now: u64) -> Option<u8> {
    f.plan_entry(vcpu, now, true).and_then(|p| p.inject)
}

/// A fixed IPI (SDM §11.6.1) carries its sender; a higher class interrupting a lower
/// one nests (SDM §11.8.3.1), and EOI retires the highest first (§11.8.5).
#[test]
fn ipi_and_msi_nest_with_their_origins() {
    let f = vm(2);
    // vCPU 0 sends vector 0x41 to APIC 1 (ICR high, then low: fixed, physical).
    f.lapic_mmio_write(0, 0x310, &(1u32 << 24).to_le_bytes(), 10);
    f.lapic_mmio_write(0, 0x300, &0x41u32.to_le_bytes(), 10);
    assert_eq!(ack(&f, 1, 20), Some(0x41));
    // An MSI to APIC 1, vector 0x61: a higher class, so it interrupts 0x41.
    f.msi(0xFEE0_1000, 0x61, 30).unwrap();
    assert_eq!(ack(&f, 1, 40), Some(0x61));
    f.lapic_mmio_write(1, 0xB0, &0u32.to_le_bytes(), 50);
    f.lapic_mmio_write(1, 0xB0, &0u32.to_le_bytes(), 60);
    let t = drain(&f, 1);
    assert_eq!(
        t,
        [
            (
                10,
                TraceKind::Accepted {
                    vector: 0x41,
                    level: false,
                    source: Source::Ipi { from: 0 }
                }
            ),
            (20, TraceKind::Acknowledged { vector: 0x41 }),
            (
                30,
                TraceKind::Accepted {
                    vector: 0x61,
                    level: false,
                    source: Source::Msi
                }
            ),
            (40, TraceKind::Acknowledged { vector: 0x61 }),
            (50, TraceKind::Eoi { vector: 0x61 }),
            (60, TraceKind::Eoi { vector: 0x41 }),
        ]
    );
    assert!(drain(&f, 1).is_empty(), "drained");
    assert!(
        drain(&f, 0).is_empty(),
        "the sender's own ring records nothing for it"
    );
}

/// An IOAPIC pin (82093AA redirection entry) is named by its pin; a level entry sets
/// TMR (SDM §11.8.4), seen as `level`.
#[test]
fn ioapic_pin_is_the_source() {
    let f = vm(1);
    let (index, low) = (0x10 + 2 * 5u8, 0x35u32 | 1 << 15); // pin 5, level, vector 0x35
    f.ioapic_mmio_write(0x00, &[index], 0);
    f.ioapic_mmio_write(0x10, &low.to_le_bytes(), 0);
    f.set_irq_line(5, true, 7);
    let t = drain(&f, 0);
    assert_eq!(
        t,
        [(
            7,
            TraceKind::Accepted {
                vector: 0x35,
                level: true,
                source: Source::IoApic { pin: 5 }
            }
        )]
    );
}

/// The LVT timer (SDM §11.5.4) and a self IPI (§11.6.1 shorthand self) are local.
#[test]
fn timer_and_self_ipi_are_local() {
    let f = vm(1);
    f.lapic_mmio_write(0, 0x3E0, &0xBu32.to_le_bytes(), 0); // divide by 1
    f.lapic_mmio_write(0, 0x320, &0x50u32.to_le_bytes(), 0); // one-shot, vector 0x50
    f.lapic_mmio_write(0, 0x380, &100u32.to_le_bytes(), 0); // initial count
    f.plan_entry(0, 1_000_000, false);
    f.lapic_mmio_write(0, 0x300, &(0x71u32 | 1 << 18).to_le_bytes(), 1_000_001); // self
    let t = drain(&f, 0);
    let accepted: Vec<_> = t
        .iter()
        .filter_map(|(_, k)| match k {
            TraceKind::Accepted { vector, source, .. } => Some((*vector, *source)),
            _ => None,
        })
        .collect();
    assert_eq!(
        accepted,
        [(0x50, Source::Local(Lvt::Timer)), (0x71, Source::SelfIpi)]
    );
}

/// NMI and INIT IPIs (SDM §11.6.1) are events with their sender; INIT resets the
/// target's registers (§11.4.7.3), recorded as a reset; TPR writes are recorded.
#[test]
fn nmi_init_and_tpr() {
    let f = vm(2);
    f.lapic_mmio_write(0, 0x310, &(1u32 << 24).to_le_bytes(), 1);
    f.lapic_mmio_write(0, 0x300, &0x400u32.to_le_bytes(), 2); // NMI
    f.lapic_mmio_write(1, 0x80, &0x20u32.to_le_bytes(), 3); // TPR
    f.lapic_mmio_write(0, 0x300, &0x4500u32.to_le_bytes(), 4); // INIT
    let t = drain(&f, 1);
    assert_eq!(
        t,
        [
            (
                2,
                TraceKind::Event {
                    mode: DeliveryMode::Nmi,
                    vector: 0,
                    source: Source::Ipi { from: 0 }
                }
            ),
            (3, TraceKind::Tpr { tpr: 0x20 }),
            (
                4,
                TraceKind::Event {
                    mode: DeliveryMode::Init,
                    vector: 0,
                    source: Source::Ipi { from: 0 }
                }
            ),
            (4, TraceKind::Reset),
        ]
    );
}

/// Off until enabled; the ring is bounded and counts what it could not keep.
#[test]
fn off_by_default_and_bounded() {
    let f = SharedFabric::new(FabricConfig::with_vcpus(1));
    f.lapic_mmio_write(0, 0xF0, &0x1FFu32.to_le_bytes(), 0);
    f.lapic_mmio_write(0, 0x300, &(0x71u32 | 1 << 18).to_le_bytes(), 1);
    assert!(drain(&f, 0).is_empty());
    f.with_apic(0, 0, |a| (a.set_trace_enabled(true), Effects::default()));
    // Alternating 0x10 and 0 from 0: every write is a change.
    for i in 1..=(TRACE_CAPACITY as u32 + 5) {
        f.lapic_mmio_write(0, 0x80, &((i % 2) * 0x10).to_le_bytes(), 2);
    }
    assert_eq!(drain(&f, 0).len(), TRACE_CAPACITY);
    assert_eq!(f.read_apic(0, |a| a.trace().lost()), Some(5));
}
