//! Property tests (the CI equivalent of the cargo-fuzz targets in `fuzz/`): no
//! decoder or import panics on arbitrary bytes, and every state an APIC can reach
//! through guest traffic validates and round-trips through every format.

use proptest::prelude::*;
use vlapic::state::kvm::{self, KvmExtra};
use vlapic::state::{bhyve, native, LapicState};
use vlapic::{Delivery, LapicConfig, LocalApic, TimerClock};

const CLK: TimerClock = TimerClock {
    bus_cycle_ns: 1,
    tsc_hz: 1_000_000_000,
};

fn cfg() -> LapicConfig {
    LapicConfig::default().with_verify(true)
}

/// Imports whatever decoded; a successful import must export a valid state.
fn import_any(state: &LapicState) {
    let mut apic = LocalApic::new(cfg());
    let before = apic.export();
    match apic.import(state, 1000) {
        Ok(()) => assert!(apic.export().validate(&cfg()).is_empty()),
        Err(_) => assert_eq!(apic.export(), before),
    }
}

#[derive(Clone, Debug)]
enum Op {
    Write(u16, u32),
    Msr(u32, u64),
    Irq(u8, bool),
    Ack,
    Eoi,
    Time(u32),
    X2apic,
    Base(u64),
    Lint(u8, bool),
}

const OFFSETS: [u16; 22] = [
    0x20, 0x80, 0xB0, 0xD0, 0xE0, 0xF0, 0xF0, 0x280, 0x2F0, 0x300, 0x310, 0x320, 0x320, 0x330,
    0x340, 0x350, 0x360, 0x370, 0x380, 0x3E0, 0x3E0, 0x400,
];
const MSRS: [u32; 10] = [
    0x808, 0x80B, 0x80F, 0x828, 0x830, 0x832, 0x838, 0x83E, 0x83F, 0x6E0,
];

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..OFFSETS.len(), any::<u32>()).prop_map(|(i, v)| Op::Write(OFFSETS[i], v)),
        2 => (0..OFFSETS.len(), prop_oneof![Just(0x1FFu32), Just(0x100FF), Just(0x200EC), Just(0x400E0), 0u32..0x2_0000])
            .prop_map(|(i, v)| Op::Write(OFFSETS[i], v)),
        2 => (0..MSRS.len(), any::<u64>(), 0u64..0x1_0000)
            .prop_map(|(i, v, small)| Op::Msr(MSRS[i], if v & 1 == 0 { small } else { v })),
        4 => (any::<u8>(), any::<bool>()).prop_map(|(v, l)| Op::Irq(v, l)),
        3 => Just(Op::Ack),
        2 => Just(Op::Eoi),
        2 => (0u32..20_000).prop_map(Op::Time),
        1 => Just(Op::X2apic),
        1 => prop_oneof![Just(0xFEE0_0100u64), Just(0xFEE0_0900), Just(0xFEB0_0900), any::<u64>()].prop_map(Op::Base),
        2 => (0u8..3, any::<bool>()).prop_map(|(p, l)| Op::Lint(p, l)),
    ]
}

fn run(ops: &[Op]) -> (LocalApic, u64) {
    let mut apic = LocalApic::new(cfg());
    let mut now = 0u64;
    for op in ops {
        match *op {
            Op::Write(off, v) => {
                let _ = apic.write_register(u64::from(off), v, now);
            }
            Op::Msr(msr, v) => {
                let _ = apic.write_msr(msr, v, now);
            }
            Op::Irq(v, level) => {
                let d = if level {
                    Delivery::fixed_level(v)
                } else {
                    Delivery::fixed(v)
                };
                apic.deliver(d, now);
            }
            Op::Ack => {
                apic.acknowledge();
            }
            Op::Eoi => {
                let _ = apic.write_register(0xB0, 0, now);
                let _ = apic.write_msr(0x80B, 0, now);
            }
            Op::Time(dt) => {
                now += u64::from(dt);
                apic.advance(now);
            }
            Op::X2apic => {
                let _ = apic.write_apic_base(0xFEE0_0D00, now);
            }
            Op::Base(v) => {
                let _ = apic.write_apic_base(v, now);
            }
            Op::Lint(pin, level) => {
                apic.set_lint(pin, level, now);
            }
        }
    }
    (apic, now)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    // Decoders never panic (the fuzz targets' property), and whatever decodes
    // either imports or is refused with the APIC untouched.
    #[test]
    fn kvm_decoder_total(bytes in proptest::collection::vec(any::<u8>(), 1020..1030),
                         base in any::<u64>(), tsc in any::<u64>(), now in any::<u64>()) {
        if let Ok(s) = kvm::decode(&bytes, KvmExtra { apic_base: base, tsc_deadline: tsc }, now, &CLK) {
            import_any(&s);
        }
    }

    #[test]
    fn bhyve_decoder_total(bytes in proptest::collection::vec(any::<u8>(), 195..205), tsc in any::<u64>()) {
        if let Ok(s) = bhyve::decode(&bytes, tsc) {
            import_any(&s);
            let mut padded_zero = bytes.clone();
            padded_zero[132..136].fill(0);
            padded_zero[196..200].fill(0);
            let again = bhyve::encode(&s);
            prop_assert_eq!(&again[..], &padded_zero[..], "bhyve decode is exact but for padding");
        }
    }

    #[test]
    fn native_decoder_total(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(s) = native::decode_lapic(&bytes) {
            import_any(&s);
        }
        let _ = native::decode_ioapic(&bytes);
        let _ = native::decode_fabric(&bytes);
    }

    // Valid framing with an arbitrary body reaches the body decoder; accepted
    // bodies are canonical (re-encoding reproduces the file).
    #[test]
    fn native_bodies_total(body in proptest::collection::vec(any::<u8>(), 0..160), kind in 1u16..4) {
        let mut file = b"VLAPICST".to_vec();
        file.extend_from_slice(&1u16.to_le_bytes());
        file.extend_from_slice(&kind.to_le_bytes());
        file.extend_from_slice(&(body.len() as u32).to_le_bytes());
        file.extend_from_slice(&body);
        let crc = crc32(&file);
        file.extend_from_slice(&crc.to_le_bytes());
        if let Ok(s) = native::decode_lapic(&file) {
            prop_assert_eq!(native::encode_lapic(&s), file.clone());
            import_any(&s);
        }
        if let Ok(s) = native::decode_fabric(&file) {
            prop_assert_eq!(native::encode_fabric(&s), file.clone());
            let _ = s.validate(&[cfg()]);
        }
        if let Ok(s) = native::decode_ioapic(&file) {
            prop_assert_eq!(native::encode_ioapic(&s), file);
            let _ = s.validate();
        }
    }

    // Arbitrary field values: validation never panics; a state it accepts imports.
    #[test]
    fn arbitrary_states_validate_or_import(words in proptest::collection::vec(any::<u32>(), 40),
                                           big in proptest::collection::vec(any::<u64>(), 4)) {
        let w = |i: usize| words[i];
        let mut s = LapicState {
            apic_base: big[0], id: w(0), version: w(1), tpr: w(2) & 0x1FF, apr: w(3) & 0x1FF,
            ldr: w(4), dfr: w(5), svr: w(6), esr: w(7) & 0x1FF, esr_pending: w(8) & 0x1FF,
            icr: big[1], timer_initial: w(9), timer_divide: w(10) & 0xF,
            timer_deadline: big[2], tsc_deadline: big[3], ..LapicState::default()
        };
        for i in 0..8 { s.isr[i] = w(11 + i); s.tmr[i] = w(19 + i); s.irr[i] = w(27 + i); }
        for i in 0..5 { s.lvt[i] = w(35 + i); }
        let errors = s.validate(&cfg());
        prop_assert_eq!(s.check(&cfg()).err(), errors.first().copied());
        import_any(&s);
    }

    // Any state guest traffic can produce validates, and survives every format and
    // an import into a fresh APIC unchanged (KVM: modulo the ESR latch it lacks).
    #[test]
    fn reachable_states_round_trip(ops in proptest::collection::vec(op(), 0..60)) {
        let (apic, now) = run(&ops);
        let s = apic.export();
        prop_assert_eq!(s.validate(&cfg()), vec![]);
        prop_assert_eq!(native::decode_lapic(&native::encode_lapic(&s)), Ok(s));
        prop_assert_eq!(bhyve::decode(&bhyve::encode(&s), s.tsc_deadline), Ok(s));
        let (page, extra) = kvm::encode(&s, now, &CLK);
        let k = kvm::decode(&page, extra, now, &CLK).unwrap();
        prop_assert_eq!(k.validate(&cfg()), vec![]);
        prop_assert_eq!(LapicState { esr_pending: s.esr_pending, timer_deadline: s.timer_deadline, ..k }, s);
        let mut fresh = LocalApic::new(cfg());
        fresh.import(&s, now).unwrap();
        prop_assert_eq!(fresh.export(), s);
        prop_assert_eq!(fresh.ppr(), apic.ppr());
        prop_assert_eq!(fresh.pending_vector(), apic.pending_vector());
        prop_assert_eq!(fresh.verifier().violations(), 0);
    }
}

/// CRC-32 (IEEE), for building framed test inputs.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
