//! Issue 14 point 4: the caches added for speed are derived, never load-bearing.
//! After every operation of random sequences — arrivals in every delivery mode,
//! acknowledge, EOI by MMIO and MSR, TPR/CR8, INIT, power-on reset, IA32_APIC_BASE
//! writes (disable resets), imports of reachable and of corrupted states, verifier
//! on/off and audits, time — every cache equals a fresh derivation
//! ([`LocalApic::caches_consistent`]), no timer expiry is left due at the latest time
//! seen ([`LocalApic::timer_settled`], which `advance` relies on), and PPR, the
//! pending vector and the vector an
//! EOI retires equal the SDM rules computed here from ISR, IRR and TPR alone
//! (SDM Vol. 3A §11.8.3.1, §11.8.4, §11.8.5).
//!
//! Also: the fabric's [`Wake`], which now keeps a single vCPU without allocating,
//! still names exactly the vCPUs a naive model says, ascending and once each.

mod common;
use common::*;
use proptest::prelude::*;
use vlapic::fabric::{Fabric, FabricConfig, Wake};
use vlapic::routing::{Destination, Message};
use vlapic::state::LapicState;
use vlapic::{ApicMode, Delivery, DeliveryMode, LapicConfig, LocalApic, VectorSet};

/// SDM §11.8.3.1 by a scan of every ISR bit from 255 down.
fn naive_ppr(tpr: u8, isr: &VectorSet) -> u8 {
    let isrv = (0..=255u8).rev().find(|&v| isr.contains(v)).unwrap_or(0);
    if tpr >> 4 >= isrv >> 4 {
        tpr
    } else {
        isrv & 0xF0
    }
}

/// SDM §11.8.3.1/§11.8.4: the highest IRR vector, if its class is above PPR's.
fn naive_pending(a: &LocalApic) -> Option<u8> {
    let v = (0..=255u8).rev().find(|&v| a.irr().contains(v))?;
    (v >> 4 > naive_ppr(a.tpr(), a.isr()) >> 4).then_some(v)
}

#[derive(Clone, Debug)]
enum Op {
    Deliver(u8, u8, bool),
    Ack,
    EoiMmio,
    EoiMsr,
    Tpr(u8),
    Cr8(u8),
    SelfIpi(u8),
    Init,
    PowerOn,
    Base(u64),
    Enable,
    /// Import the state the shadow APIC reached.
    ImportShadow,
    /// Import a state with ISR/IRR/TPR replaced (may be refused: then nothing changes).
    ImportCorrupt([u32; 8], [u32; 8], u8),
    Verifier(bool),
    Audit,
    Time(u32),
    Write(u16, u32),
    /// WRMSR IA32_TSC_DEADLINE: a TSC value near the current time, past or future.
    TscDeadline(i16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (prop_oneof![Just(0u8), Just(1), 0u8..8], any::<u8>(), any::<bool>())
            .prop_map(|(m, v, l)| Op::Deliver(m, v, l)),
        6 => Just(Op::Ack),
        5 => Just(Op::EoiMmio),
        1 => Just(Op::EoiMsr),
        2 => any::<u8>().prop_map(Op::Tpr),
        1 => (0u8..16).prop_map(Op::Cr8),
        1 => any::<u8>().prop_map(Op::SelfIpi),
        1 => Just(Op::Init),
        1 => Just(Op::PowerOn),
        1 => prop_oneof![Just(0xFEE0_0900u64), Just(0xFEE0_0D00), Just(0xFEE0_0100), any::<u64>()]
            .prop_map(Op::Base),
        2 => Just(Op::Enable),
        1 => Just(Op::ImportShadow),
        1 => (any::<[u32; 8]>(), any::<[u32; 8]>(), any::<u8>())
            .prop_map(|(i, r, t)| Op::ImportCorrupt(i, r, t)),
        1 => any::<bool>().prop_map(Op::Verifier),
        1 => Just(Op::Audit),
        1 => (0u32..5000).prop_map(Op::Time),
        2 => (0u16..0x40, any::<u32>()).prop_map(|(o, v)| Op::Write(o << 4, v)),
        1 => any::<i16>().prop_map(Op::TscDeadline),
    ]
}

fn cfg() -> LapicConfig {
    LapicConfig::default().with_verify(true)
}

/// Runs `op` on `a`. `shadow` is a second APIC that sees only legal traffic; its
/// state is what `ImportShadow` installs.
fn apply(a: &mut LocalApic, shadow: &mut LocalApic, op: &Op, now: &mut u64) {
    match op {
        Op::Deliver(m, v, l) => {
            if let Some(mode) = DeliveryMode::from_bits(u32::from(*m)) {
                let d = Delivery {
                    mode,
                    vector: *v,
                    level_triggered: *l,
                };
                a.deliver(d, *now);
                if mode == DeliveryMode::Fixed {
                    shadow.deliver(d, *now);
                }
            }
        }
        Op::Ack => {
            let expect = naive_pending(a);
            assert_eq!(a.acknowledge(), expect);
            shadow.acknowledge();
        }
        Op::EoiMmio => {
            // SDM §11.8.5: the EOI retires the highest in-service vector.
            let expect = (0..=255u8).rev().find(|&v| a.isr().contains(v));
            let before = *a.isr();
            let _ = a.write_register(EOI, 0, *now);
            if a.mode() == ApicMode::XApic {
                if let Some(v) = expect {
                    let mut after = before;
                    after.remove(v);
                    assert_eq!(*a.isr(), after);
                }
            }
            let _ = shadow.write_register(EOI, 0, *now);
        }
        Op::EoiMsr => {
            let _ = a.write_msr(0x80B, 0, *now);
        }
        Op::Tpr(t) => {
            let _ = a.write_register(TPR, u32::from(*t), *now);
            let _ = shadow.write_register(TPR, u32::from(*t), *now);
        }
        Op::Cr8(c) => {
            let _ = a.set_cr8(u64::from(*c));
        }
        Op::SelfIpi(v) => {
            let _ = a.write_register(ICR_LO, 0x4_0000 | u32::from(*v), *now);
        }
        Op::Init => a.init_reset(),
        Op::PowerOn => a.power_on_reset(),
        Op::Base(b) => {
            let _ = a.write_apic_base(*b, *now);
        }
        Op::Enable => {
            let _ = a.write_register(SVR, 0x1FF, *now);
            let _ = a.write_msr(0x80F, 0x1FF, *now);
            let _ = shadow.write_register(SVR, 0x1FF, *now);
        }
        Op::ImportShadow => {
            let st = shadow.export();
            assert_eq!(a.import(&st, *now), Ok(()));
        }
        Op::ImportCorrupt(isr, irr, tpr) => {
            let mut st: LapicState = a.export();
            st.isr = *isr;
            st.irr = *irr;
            st.tpr = u32::from(*tpr);
            let before = a.export();
            if a.import(&st, *now).is_err() {
                assert_eq!(a.export(), before, "a refused import changes nothing");
            }
        }
        Op::Verifier(on) => a.set_verifier_enabled(*on),
        Op::Audit => {
            a.audit_verifier();
        }
        Op::Time(dt) => {
            *now = now.saturating_add(u64::from(*dt));
            a.advance(*now);
        }
        Op::Write(o, v) => {
            let _ = a.write_register(u64::from(*o), *v, *now);
        }
        Op::TscDeadline(d) => {
            // The default clock: 1 GHz TSC, so a TSC value is a VM time in ns.
            let tsc = now.saturating_add_signed(i64::from(*d)).max(1);
            let _ = a.write_msr(0x6E0, tsc, *now);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(384))]

    #[test]
    fn caches_equal_a_fresh_derivation_after_every_operation(
        ops in proptest::collection::vec(op(), 0..250),
    ) {
        let mut a = LocalApic::new(cfg());
        let mut shadow = LocalApic::new(cfg());
        let _ = a.write_register(SVR, 0x1FF, 0);
        let _ = shadow.write_register(SVR, 0x1FF, 0);
        let mut now = 0u64;
        prop_assert!(a.caches_consistent());
        for op in &ops {
            apply(&mut a, &mut shadow, op, &mut now);
            prop_assert!(a.caches_consistent(), "after {:?}", op);
            // advance() does nothing at a time already seen: no timer is left due.
            prop_assert!(a.timer_settled(), "after {:?}", op);
            prop_assert!(shadow.caches_consistent());
            prop_assert_eq!(a.ppr(), naive_ppr(a.tpr(), a.isr()), "after {:?}", op);
            prop_assert_eq!(a.pending_vector(), naive_pending(&a), "after {:?}", op);
            prop_assert_eq!(a.has_work(), naive_pending(&a).is_some() || a.events().any());
            // A clone (the embedder's snapshot) carries consistent caches too.
            prop_assert!(a.clone().caches_consistent());
        }
        // The shadow saw only legal traffic: its verifier never complained.
        prop_assert_eq!(shadow.verifier().violations(), 0);
    }

    // The fabric's Wake: exactly the vCPUs that took a fixed interrupt and have it
    // pending, ascending, once each; a unicast yields one entry (no allocation).
    #[test]
    fn wake_names_exactly_the_vcpus_with_work(
        n in 1usize..6,
        sends in proptest::collection::vec((any::<u8>(), 0x20u8..0xFF, any::<bool>()), 1..20),
    ) {
        let mut f = Fabric::new(FabricConfig::with_vcpus(n));
        for i in 0..n {
            let _ = f.lapic_mmio_write(i, SVR, &0x1FFu32.to_le_bytes(), 0);
        }
        let mut all = Wake::default();
        for (dest, vector, logical) in &sends {
            let id = u32::from(*dest % 8).min(0xFF);
            let broadcast = *dest >= 0xF0;
            let dest = if broadcast {
                Destination::physical(0xFF, false)
            } else if *logical {
                Destination::logical(id, false)
            } else {
                Destination::physical(id, false)
            };
            let w = f.send(&Message { delivery: Delivery::fixed(*vector), dest }, 0);
            let got: Vec<usize> = w.iter().collect();
            let mut sorted = got.clone();
            sorted.sort_unstable();
            sorted.dedup();
            prop_assert_eq!(&got, &sorted, "ascending, once each");
            prop_assert_eq!(w.len(), got.len());
            prop_assert_eq!(w.is_empty(), got.is_empty());
            for i in 0..n {
                let has = f.apic(i).unwrap().has_work();
                prop_assert_eq!(w.contains(i), got.contains(&i));
                if w.contains(i) {
                    prop_assert!(has);
                }
            }
            if broadcast {
                prop_assert_eq!(w.len(), n);
            }
            all.merge(&w);
        }
        let merged: Vec<usize> = all.iter().collect();
        let mut expect = merged.clone();
        expect.sort_unstable();
        expect.dedup();
        prop_assert_eq!(merged, expect);
    }
}

// The merge of one-vCPU wakes, in any order and with repeats, is the sorted set; the
// same set built two ways compares equal (one canonical form).
#[test]
fn wake_merge_is_canonical() {
    let mut f = Fabric::new(FabricConfig::with_vcpus(4));
    for i in 0..4 {
        let _ = f.lapic_mmio_write(i, SVR, &0x1FFu32.to_le_bytes(), 0);
    }
    let one = |f: &mut Fabric, id: u32| {
        f.send(
            &Message {
                delivery: Delivery::fixed(0x40),
                dest: Destination::physical(id, false),
            },
            0,
        )
    };
    let (w3, w1, w2) = (one(&mut f, 3), one(&mut f, 1), one(&mut f, 2));
    assert_eq!(w3.len(), 1);
    let mut a = Wake::default();
    for w in [&w3, &w1, &w3, &w2, &w1] {
        a.merge(w);
    }
    let mut b = Wake::default();
    for w in [&w1, &w2, &w3] {
        b.merge(w);
    }
    assert_eq!(a.iter().collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(a, b);
    let mut c = Wake::default();
    c.merge(&w2);
    c.merge(&w2);
    assert_eq!(c, w2, "a repeated single vCPU stays one entry");
}
