//! Issue 10 point 1: a masked, TPR-blocked or 1-tick periodic timer must not keep the
//! host busy. `next_timer_deadline()` is `None` when an expiry would change nothing
//! (LVT timer masked, or its edge vector already waiting in IRR: SDM Vol. 3A §11.5.4,
//! "the local timer interrupt is not sent" while masked; §11.8.4, IRR holds one bit per
//! vector), while TMCCT and the periodic phase stay exact; a periodic timer's
//! expiries are at least `min_timer_period_us` apart (KVM's `min_timer_period_us`,
//! 200 µs by default, `limit_periodic_timer_frequency` in arch/x86/kvm/lapic.c).

mod common;
use common::*;
use vlapic::{Delivery, LapicConfig, LocalApic};

const PERIODIC: u32 = 1 << 17;
const MASKED: u32 = 1 << 16;
const TSC_DEADLINE_MODE: u32 = 2 << 17;
const VEC: u32 = 0x40;
const MSR_TSC_DEADLINE: u32 = 0x6E0;
const US: u64 = 1_000;
const MS: u64 = 1_000_000;
const SEC: u64 = 1_000_000_000;

/// Default configuration (1 ns bus cycle, 1 GHz TSC, 200 µs minimum period).
fn apic() -> LocalApic {
    xapic_with(LapicConfig::default())
}

/// Takes the pending vector and EOIs it.
fn take(a: &mut LocalApic, now: u64) -> Option<u8> {
    let v = a.plan_entry(now, true).inject;
    if v.is_some() {
        let _ = a.write_register(EOI, 0, now);
    }
    v
}

/// Periodic timer, divide by 1, `lvt_extra` or'ed into LVT timer.
fn periodic(a: &mut LocalApic, count: u32, lvt_extra: u32, now: u64) {
    let _ = a.write_register(TDCR, 0xB, now);
    let _ = a.write_register(LVT_TIMER, PERIODIC | VEC | lvt_extra, now);
    let _ = a.write_register(TMICT, count, now);
}

// The guest: periodic, initial count 1, divide 1, masked. Nothing needs waking;
// advancing far delivers nothing; TMCCT still counts (1 tick period: always 1).
#[test]
fn masked_one_tick_periodic_timer_has_no_deadline() {
    let mut a = apic();
    periodic(&mut a, 1, MASKED, 0);
    assert_eq!(a.next_timer_deadline(), None);
    a.advance(10 * SEC);
    assert_eq!(a.irr().len(), 0, "masked: nothing delivered");
    assert_eq!(a.pending_vector(), None);
    assert_eq!(a.next_timer_deadline(), None);
    assert_eq!(a.read_register(TMCCT, 10 * SEC + 7), 1);
    let plan = a.plan_entry(11 * SEC, true);
    assert_eq!((plan.inject, plan.timer_deadline), (None, None));
}

// Masking an armed periodic timer drops the deadline; TMCCT keeps the phase exactly;
// unmasking reports timer_changed and restores the deadline on the original grid.
#[test]
fn unmasking_restores_the_deadline_in_phase() {
    let mut a = apic();
    periodic(&mut a, 1_000_000, 0, 0); // 1 ms period
    assert_eq!(a.next_timer_deadline(), Some(MS));
    let fx = a.write_register(LVT_TIMER, PERIODIC | VEC | MASKED, 100 * US);
    assert!(fx.timer_changed);
    assert_eq!(a.next_timer_deadline(), None);
    assert_eq!(a.read_register(TMCCT, 5 * MS + 300 * US), 700_000);
    assert_eq!(a.irr().len(), 0);
    let fx = a.write_register(LVT_TIMER, PERIODIC | VEC, 5 * MS + 300 * US);
    assert!(fx.timer_changed, "the embedder re-reads the deadline");
    assert_eq!(
        a.next_timer_deadline(),
        Some(6 * MS),
        "same phase as before the mask"
    );
    assert!(!a.advance(6 * MS - 1));
    assert!(a.advance(6 * MS));
    assert_eq!(take(&mut a, 6 * MS), Some(VEC as u8));
    assert_eq!(a.next_timer_deadline(), Some(7 * MS));
}

// TPR 0xF0 blocks the timer vector: after the first expiry it waits in IRR and further
// expiries would only set the same bit. No deadline until the core takes the vector;
// then the next expiry is on the period grid.
#[test]
fn tpr_blocked_periodic_timer_sleeps_until_the_vector_is_taken() {
    let mut a = apic();
    let _ = a.write_register(TPR, 0xF0, 0);
    periodic(&mut a, 1_000_000, 0, 0); // 1 ms period
    assert!(a.advance(MS));
    assert_eq!(a.irr().highest(), Some(VEC as u8));
    assert_eq!(a.next_timer_deadline(), None, "vector already pending");
    assert_eq!(a.plan_entry(2 * MS + 1, true).timer_deadline, None);
    assert_eq!(a.read_register(TMCCT, 3 * MS + 250 * US), 750_000);
    let _ = a.write_register(TPR, 0, 3 * MS + 500 * US);
    let plan = a.plan_entry(3 * MS + 600 * US, true);
    assert_eq!(plan.inject, Some(VEC as u8));
    assert_eq!(
        plan.timer_deadline,
        Some(4 * MS),
        "taken: next expiry on the grid"
    );
    assert_eq!(a.irr().len(), 0);
}

// The one-tick periodic timer, unmasked: successive expiries at least 200 µs apart
// (KVM's default min_timer_period_us), each one delivered.
#[test]
fn one_tick_periodic_expiries_are_at_least_200us_apart() {
    let mut a = apic();
    periodic(&mut a, 1, 0, 0);
    let mut last = a.next_timer_deadline().expect("armed");
    assert_eq!(last, 1, "the first expiry is architectural");
    assert!(a.advance(last));
    assert_eq!(take(&mut a, last), Some(VEC as u8));
    for _ in 0..5 {
        let d = a.next_timer_deadline().expect("armed");
        assert!(d - last >= 200 * US, "{} ns apart", d - last);
        assert!(!a.advance(d - 1));
        assert!(a.advance(d));
        assert_eq!(take(&mut a, d), Some(VEC as u8));
        last = d;
    }
    assert_eq!(a.stats().timer_expired, 6);
    assert_eq!(a.stats().timer_missed, 0);
}

// A level-triggered interrupt with the timer's vector in IRR: an expiry would change
// TMR (the timer is edge), so it is not a no-op and the deadline stays.
#[test]
fn level_vector_in_irr_keeps_the_deadline() {
    let mut a = apic();
    let _ = a.write_register(TPR, 0xF0, 0);
    periodic(&mut a, 1_000_000, 0, 0);
    a.deliver(Delivery::fixed_level(VEC as u8), 10);
    assert_eq!(a.next_timer_deadline(), Some(MS));
    assert!(a.advance(MS));
    assert!(
        !a.tmr().contains(VEC as u8),
        "the timer's edge expiry rewrote TMR"
    );
    assert_eq!(a.next_timer_deadline(), None, "now an edge vector pending");
}

// One-shot and TSC-deadline modes keep their architectural deadlines, however short
// (the minimum period is for periodic mode only, as KVM).
#[test]
fn one_shot_and_tsc_deadline_are_not_rate_limited() {
    let mut a = apic();
    let _ = a.write_register(TDCR, 0xB, 0);
    let _ = a.write_register(LVT_TIMER, VEC, 0);
    for k in 0..3u64 {
        let t = k * 10;
        let _ = a.write_register(TMICT, 1, t);
        assert_eq!(a.next_timer_deadline(), Some(t + 1));
        assert!(a.advance(t + 1));
        assert_eq!(take(&mut a, t + 1), Some(VEC as u8));
        assert_eq!(a.next_timer_deadline(), None);
    }
    let _ = a.write_register(LVT_TIMER, TSC_DEADLINE_MODE | VEC, 100);
    for k in 1..4u64 {
        let t = 100 + k * 5;
        let _ = a
            .write_msr(MSR_TSC_DEADLINE, t, t - 4)
            .expect("TSC-deadline offered");
        assert_eq!(a.next_timer_deadline(), Some(t), "1 GHz TSC: ns = ticks");
        assert!(a.advance(t));
        assert_eq!(take(&mut a, t), Some(VEC as u8));
    }
}

// Masked one-shot and TSC-deadline timers have no deadline either, and their state
// is still exact when read: TMCCT 0 and IA32_TSC_DEADLINE 0 once the time passed.
#[test]
fn masked_one_shot_and_tsc_deadline_have_no_deadline_but_exact_state() {
    let mut a = apic();
    let _ = a.write_register(TDCR, 0xB, 0);
    let _ = a.write_register(LVT_TIMER, VEC | MASKED, 0);
    let _ = a.write_register(TMICT, 1000, 0);
    assert_eq!(a.next_timer_deadline(), None);
    assert_eq!(a.read_register(TMCCT, 400), 600);
    assert_eq!(a.read_register(TMCCT, 1000), 0);
    let _ = a.write_register(LVT_TIMER, TSC_DEADLINE_MODE | VEC | MASKED, 2000);
    let _ = a.write_msr(MSR_TSC_DEADLINE, 3000, 2000).expect("offered");
    assert_eq!(a.next_timer_deadline(), None);
    assert_eq!(a.read_msr(MSR_TSC_DEADLINE, 2999), Ok(3000));
    assert_eq!(
        a.read_msr(MSR_TSC_DEADLINE, 3000),
        Ok(0),
        "expired while masked"
    );
    assert_eq!(a.irr().len(), 0);
}

fn apic_min(us: u32) -> LocalApic {
    xapic_with(LapicConfig::default().with_min_timer_period_us(us))
}

// min_timer_period_us = 0 disables the limit: the architectural 1-tick period.
#[test]
fn zero_minimum_period_is_architectural() {
    let mut a = apic_min(0);
    periodic(&mut a, 1, 0, 0);
    for t in 1..5u64 {
        assert_eq!(a.next_timer_deadline(), Some(t));
        assert!(a.advance(t));
        assert_eq!(take(&mut a, t), Some(VEC as u8));
    }
}

// TMCCT counts with the architectural period under the minimum period, and a late
// report counts the missed expiries at the limited spacing, keeping its phase.
#[test]
fn minimum_period_keeps_the_count_architectural_and_the_phase() {
    let mut a = apic();
    periodic(&mut a, 3, 0, 0); // 3 ns period: expiries at 3, 6, 9, ...
    assert!(a.advance(3));
    assert_eq!(take(&mut a, 3), Some(VEC as u8));
    assert_eq!(a.next_timer_deadline(), Some(3 + 200 * US));
    // 1000 is 997 ns past the zero at 3: 332 periods and 1 ns, 2 ticks left.
    assert_eq!(a.read_register(TMCCT, 1000), 2);
    assert_eq!(a.read_register(TMCCT, 1002), 3, "reloaded at 1002");
    // Five minimum periods late: one interrupt, five missed, next on the same grid.
    let late = 3 + 200 * US + MS;
    assert!(a.advance(late));
    assert_eq!(a.stats().timer_missed, 5);
    assert_eq!(a.stats().timer_expired, 2);
    assert_eq!(take(&mut a, late), Some(VEC as u8));
    assert_eq!(a.next_timer_deadline(), Some(3 + 7 * 200 * US));
}

// Saved state records the architectural expiry (the next zero of the count), so a
// round trip through export/import is exact and TMCCT agrees on both sides.
#[test]
fn export_of_a_rate_limited_timer_round_trips() {
    let mut a = apic();
    periodic(&mut a, 3, 0, 0);
    assert!(a.advance(3));
    let _ = take(&mut a, 3);
    assert_eq!(a.read_register(TMCCT, 1000), 2);
    let s = a.export();
    assert_eq!(
        s.timer_deadline, 1002,
        "next zero of the count, not the next expiry"
    );
    let mut b = LocalApic::new(LapicConfig::default());
    b.import(&s, 1000).expect("valid");
    assert_eq!(b.export(), s);
    assert_eq!(b.read_register(TMCCT, 1001), a.read_register(TMCCT, 1001));
}

// Leaving periodic mode: a one-shot timer expires when its count reaches zero, not at
// the next rate-limited expiry (SDM §11.5.4: the mode in force at zero decides).
#[test]
fn periodic_to_one_shot_expires_at_the_count_zero() {
    let mut a = apic();
    periodic(&mut a, 1000, 0, 0); // 1 µs period
    assert!(a.advance(1000));
    let _ = take(&mut a, 1000);
    assert_eq!(a.next_timer_deadline(), Some(1000 + 200 * US));
    let fx = a.write_register(LVT_TIMER, VEC, 1500);
    assert!(fx.timer_changed);
    assert_eq!(a.read_register(TMCCT, 1500), 500);
    assert_eq!(a.next_timer_deadline(), Some(2000));
    assert!(a.advance(2000));
    assert_eq!(take(&mut a, 2000), Some(VEC as u8));
    assert_eq!(a.next_timer_deadline(), None, "one-shot: done");
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // The minimum period changes when interrupts come, never what TMCCT reads
        // (SDM §11.5.4: the count reloads every period), and expiries it spaces are
        // at least the minimum apart.
        #[test]
        fn minimum_period_leaves_the_count_architectural(
            count in 1u32..5000,
            dcr in prop::sample::select(vec![0x0u32, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB]),
            start in 0u64..10_000,
            steps in prop::collection::vec(1u64..150_000, 1..40),
        ) {
            let mut limited = apic();
            let mut arch = apic_min(0);
            for a in [&mut limited, &mut arch] {
                let _ = a.write_register(TDCR, dcr, start);
                let _ = a.write_register(LVT_TIMER, PERIODIC | VEC, start);
                let _ = a.write_register(TMICT, count, start);
            }
            let mut now = start;
            // Expiry instants: the timer's deadline moves only when one is processed.
            let mut expiry = limited.timer().deadline();
            for step in steps {
                now += step;
                prop_assert_eq!(
                    limited.read_register(TMCCT, now),
                    arch.read_register(TMCCT, now),
                    "TMCCT at {}", now
                );
                let _ = take(&mut limited, now);
                let next = limited.timer().deadline();
                if let (Some(prev), Some(d)) = (expiry, next) {
                    prop_assert!(d == prev || d - prev >= 200 * US, "{} after {}", d, prev);
                }
                expiry = next;
                let _ = take(&mut arch, now);
            }
        }
    }
}
