//! Unit tests of the routing core that need its internals: lowest-priority arbitration
//! retried when the winner refuses (disabled between arbitration and delivery).

use super::core::*;
use super::single::*;
use super::{FabricConfig, Wake};
use crate::delivery::{Delivery, DeliveryMode};
use crate::lapic::{LapicConfig, LocalApic};
use crate::routing::Destination;
use crate::routing::Message;

/// Disables APIC `victim` (SVR bit 8 clear) just before the `at`-th access, as
/// another vCPU thread could between arbitration and delivery.
struct DisableBefore<'a> {
    inner: CoreAccess<'a>,
    calls: usize,
    at: usize,
    victim: usize,
}

impl ApicAccess for DisableBefore<'_> {
    fn with<R>(&mut self, idx: usize, f: impl FnOnce(&mut LocalApic) -> R) -> Option<R> {
        self.calls += 1;
        if self.calls == self.at {
            let victim = self.victim;
            self.inner.with(victim, |a| {
                let _ = a.write_register(0xF0, 0xFF, 0);
            });
        }
        self.inner.with(idx, f)
    }
}

fn lowest(vector: u8) -> Message {
    Message {
        delivery: Delivery {
            mode: DeliveryMode::LowestPriority,
            vector,
            level_triggered: false,
        },
        dest: Destination::physical(0xFF, false),
    }
}

// Finding 4 (issue 10): the arbitration winner is software-disabled after the
// priorities were read (two reads, then the delivery is access 3). SDM §11.6.2.4:
// the message goes to a destination processor that can take it; APIC 1 can.
#[test]
fn lowest_priority_retries_when_the_winner_refuses() {
    let mut core = Core::new(&[LapicConfig::with_id(0), LapicConfig::with_id(1)]);
    for i in 0..2 {
        let _ = core.with(i, |a| a.write_register(0xF0, 0x1FF, 0));
    }
    let (acc, map) = core.access();
    let map = map.clone();
    let mut acc = DisableBefore {
        inner: acc,
        calls: 0,
        at: 3,
        victim: 0,
    };
    let mut wake = Wake::default();
    let r = route_message(
        &mut acc,
        &map,
        0,
        &lowest(0x41),
        Origin::host(),
        5,
        &mut wake,
    );
    assert_eq!(r.accepted, 1, "delivered to the APIC still enabled");
    assert_eq!(
        r.rotor,
        Some(0),
        "rotor moves past the actual winner (1 of 2)"
    );
    assert_eq!(wake.iter().collect::<Vec<_>>(), [1]);
    assert!(core.apics[1].irr().contains(0x41));
    assert!(!core.apics[0].irr().contains(0x41));
    assert_eq!(core.apics[0].stats().refused_disabled, 1);
}

// No candidate accepts: the retries end (bounded by the candidate count) and the
// message is dropped, as with no software-enabled target at all.
#[test]
fn lowest_priority_retry_is_bounded() {
    let mut core = Core::new(&[LapicConfig::with_id(0), LapicConfig::with_id(1)]);
    let _ = core.with(0, |a| a.write_register(0xF0, 0x1FF, 0));
    let (acc, map) = core.access();
    let map = map.clone();
    let mut acc = DisableBefore {
        inner: acc,
        calls: 0,
        at: 3,
        victim: 0,
    };
    let mut wake = Wake::default();
    let r = route_message(
        &mut acc,
        &map,
        0,
        &lowest(0x41),
        Origin::host(),
        5,
        &mut wake,
    );
    assert_eq!(r.accepted, 0);
    assert!(wake.is_empty());
    assert!(acc.calls <= 6, "{} accesses", acc.calls);
}

// A refusal by an enabled winner (illegal vector: ESR, SDM §11.5.3) is not retried:
// every candidate would refuse it the same way, latching ESR on each.
#[test]
fn lowest_priority_illegal_vector_is_not_retried() {
    let mut f = Fabric::new(FabricConfig::with_vcpus(2));
    for i in 0..2 {
        let _ = f.lapic_mmio_write(i, 0xF0, &0x1FFu32.to_le_bytes(), 0);
    }
    let wake = f.send(&lowest(0x05), 0);
    assert!(wake.is_empty());
    let esr: Vec<u32> = (0..2)
        .filter_map(|i| f.apic(i).map(|a| a.esr_pending()))
        .collect();
    assert_eq!(esr.iter().filter(|&&e| e != 0).count(), 1, "{esr:?}");
}
