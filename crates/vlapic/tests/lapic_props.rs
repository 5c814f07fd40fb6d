//! Issue 2 property tests: PPR always equals the SDM rule computed from TPR and ISR;
//! the verifier never reports a violation for legal traffic and its depth equals the
//! ISR population; no sequence of guest accesses panics or breaks the invariants.

mod common;
use common::*;
use proptest::prelude::*;
use vlapic::{ApicMode, Delivery, DeliveryMode, LapicConfig, LocalApic, VectorSet};

/// SDM §11.8.3.1, written independently of the crate: scan ISR bits from 255 down.
fn naive_ppr(tpr: u8, isr: &VectorSet) -> u8 {
    let isrv = (0..=255u8).rev().find(|&v| isr.contains(v)).unwrap_or(0);
    if tpr >> 4 >= isrv >> 4 {
        tpr
    } else {
        isrv & 0xF0
    }
}

fn one_per_class(isr: &VectorSet) -> bool {
    (0..16u8).all(|c| isr.count_in_class(c) <= 1)
}

#[derive(Clone, Debug)]
enum Op {
    Irq(u8, bool),
    Ack,
    Eoi,
    Tpr(u8),
    Cr8(u8),
    Init,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<u8>(), any::<bool>()).prop_map(|(v, l)| Op::Irq(v, l)),
        4 => Just(Op::Ack),
        3 => Just(Op::Eoi),
        2 => any::<u8>().prop_map(Op::Tpr),
        1 => (0u8..16).prop_map(Op::Cr8),
        1 => Just(Op::Init),
    ]
}

fn apply(a: &mut LocalApic, op: &Op) {
    match *op {
        Op::Irq(v, l) => {
            a.deliver(
                Delivery {
                    mode: DeliveryMode::Fixed,
                    vector: v,
                    level_triggered: l,
                },
                0,
            );
        }
        Op::Ack => {
            a.acknowledge();
        }
        Op::Eoi => {
            let _ = a.write_register(EOI, 0, 0);
        }
        Op::Tpr(t) => {
            let _ = a.write_register(TPR, u32::from(t), 0);
        }
        Op::Cr8(c) => a.set_cr8(u64::from(c)).unwrap(),
        Op::Init => {
            a.init_reset();
            let _ = a.write_register(SVR, 0x1FF, 0);
        }
    }
}

/// Arbitrary guest-side traffic: any offset, size, value, MSR, APIC-base write,
/// pin level, delivery mode or time step.
#[derive(Clone, Debug)]
enum Guest {
    Read(u16, u8),
    Write(u16, Vec<u8>),
    RdMsr(u32),
    WrMsr(u32, u64),
    Base(u64),
    Deliver(u8, u8, bool),
    Lint(u8, bool),
    Time(u32),
    Ack,
    Cr8(u64),
}

fn msr() -> impl Strategy<Value = u32> {
    prop_oneof![0x800u32..0x900, Just(0x1B), Just(0x6E0), any::<u32>()]
}

fn guest() -> impl Strategy<Value = Guest> {
    prop_oneof![
        (0u16..0x1000, 0u8..10).prop_map(|(o, l)| Guest::Read(o, l)),
        (0u16..0x1000, proptest::collection::vec(any::<u8>(), 0..9))
            .prop_map(|(o, d)| Guest::Write(o, d)),
        // Aligned 4-byte writes to real registers are the interesting ones.
        (0u16..0x40, any::<u32>())
            .prop_map(|(o, v)| Guest::Write(o << 4, v.to_le_bytes().to_vec())),
        msr().prop_map(Guest::RdMsr),
        (msr(), any::<u64>()).prop_map(|(m, v)| Guest::WrMsr(m, v)),
        prop_oneof![
            any::<u64>(),
            Just(0xFEE0_0900u64),
            Just(0xFEE0_0D00),
            Just(0xFEE0_0100),
            Just(0xFEE0_0000)
        ]
        .prop_map(Guest::Base),
        (0u8..8, any::<u8>(), any::<bool>()).prop_map(|(m, v, l)| Guest::Deliver(m, v, l)),
        (0u8..3, any::<bool>()).prop_map(|(p, l)| Guest::Lint(p, l)),
        any::<u32>().prop_map(Guest::Time),
        Just(Guest::Ack),
        prop_oneof![0u64..16, any::<u64>()].prop_map(Guest::Cr8),
    ]
}

fn drive(a: &mut LocalApic, g: &Guest, now: &mut u64) {
    match g {
        Guest::Read(o, l) => {
            let mut buf = vec![0u8; usize::from(*l)];
            a.mmio_read(u64::from(*o), &mut buf, *now);
        }
        Guest::Write(o, d) => {
            let _ = a.mmio_write(u64::from(*o), d, *now);
        }
        Guest::RdMsr(m) => {
            let _ = a.read_msr(*m, *now);
        }
        Guest::WrMsr(m, v) => {
            let _ = a.write_msr(*m, *v, *now);
        }
        Guest::Base(b) => {
            let _ = a.write_apic_base(*b, *now);
        }
        Guest::Deliver(m, v, l) => {
            if let Some(mode) = DeliveryMode::from_bits(u32::from(*m)) {
                a.deliver(
                    Delivery {
                        mode,
                        vector: *v,
                        level_triggered: *l,
                    },
                    *now,
                );
            }
        }
        Guest::Lint(p, l) => {
            a.set_lint(*p, *l, *now);
        }
        Guest::Time(dt) => {
            *now = now.saturating_add(u64::from(*dt));
            a.advance(*now);
        }
        Guest::Ack => {
            a.acknowledge();
        }
        Guest::Cr8(c) => {
            let _ = a.set_cr8(*c);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    // Point 5: PPR is always the SDM rule over TPR and ISR.
    #[test]
    fn ppr_always_matches_the_rule(ops in proptest::collection::vec(op(), 0..200)) {
        let mut a = xapic();
        for op in &ops {
            apply(&mut a, op);
            prop_assert_eq!(a.ppr(), naive_ppr(a.tpr(), a.isr()));
            prop_assert_eq!(a.read_register(PPR, 0), u32::from(naive_ppr(a.tpr(), a.isr())));
        }
    }

    // Point 7: legal traffic never trips the verifier; depth = ISR population.
    #[test]
    fn verifier_is_clean_and_tracks_isr(ops in proptest::collection::vec(op(), 0..300)) {
        let mut a = xapic();
        for op in &ops {
            apply(&mut a, op);
            prop_assert_eq!(u32::from(a.verifier().depth()), a.isr().len());
            prop_assert!(one_per_class(a.isr()));
        }
        prop_assert_eq!(a.verifier().violations(), 0);
        prop_assert!(a.verifier().max_depth() <= 15);
    }

    // Guest input never panics, in either mode, and the architectural invariants hold
    // whatever the guest writes (no vector < 16 in ISR/IRR, one in-service vector per
    // class, PPR per rule, verifier clean).
    #[test]
    fn arbitrary_guest_traffic_never_panics(
        x2 in any::<bool>(),
        id in any::<u32>(),
        traffic in proptest::collection::vec(guest(), 0..200),
    ) {
        let cfg = LapicConfig::default().with_apic_id(if x2 { id } else { id & 0xFF }).with_mode(if x2 { ApicMode::X2Apic } else { ApicMode::XApic }).with_verify(true);
        let mut a = LocalApic::new(cfg);
        let mut now = 0u64;
        for g in &traffic {
            drive(&mut a, g, &mut now);
            prop_assert!(!a.isr().has_illegal_vectors() && !a.irr().has_illegal_vectors());
            prop_assert!(one_per_class(a.isr()));
            prop_assert_eq!(a.ppr(), naive_ppr(a.tpr(), a.isr()));
            // Every reachable state is legal state: it validates and re-imports exactly
            // (what a guest can do, a migration must carry).
            let st = a.export();
            prop_assert!(st.validate(&cfg).is_empty(), "{:?} after {:?}", st.validate(&cfg), g);
            let mut b = LocalApic::new(cfg);
            prop_assert!(b.import(&st, a.now()).is_ok());
            prop_assert_eq!(b.export(), st);
            // Every entry point runs due expiries first: an armed deadline is in the future.
            if let Some(d) = a.next_timer_deadline() {
                prop_assert!(d > a.now(), "deadline {} not after now {}", d, a.now());
            }
        }
        prop_assert_eq!(a.verifier().violations(), 0);
    }
}
