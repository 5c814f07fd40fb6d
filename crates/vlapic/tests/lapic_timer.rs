//! Issue 2, point 9: the APIC timer through its registers — one-shot, periodic,
//! TSC-deadline, divide values, mode switches, catch-up (SDM Vol. 3A §11.5.4).

mod common;
use common::*;
use vlapic::{LapicConfig, TimerClock};

fn apic_1ns() -> vlapic::LocalApic {
    // 1 ns bus cycle, 1 GHz TSC: one tick = one ns at divide-by-1 (KVM's default bus).
    // No minimum period: these tests are about the architectural timer (the minimum
    // is tested in lapic_timer_hostile.rs).
    xapic_with(
        LapicConfig::default()
            .with_clock(TimerClock {
                bus_cycle_ns: 1,
                tsc_hz: 1_000_000_000,
            })
            .with_min_timer_period_us(0),
    )
}

// SDM §11.5.4: one-shot counts down once and interrupts at zero; kvm-unit-tests
// test_apic_timer_one_shot: fires once, not before the interval.
#[test]
fn one_shot_fires_once_at_the_deadline() {
    let mut a = apic_1ns();
    let _ = a.write_register(TDCR, 0xB, 0);
    let _ = a.write_register(LVT_TIMER, 0x40, 0);
    let fx = a.write_register(TMICT, 1000, 500);
    assert!(fx.timer_changed);
    assert_eq!(a.next_timer_deadline(), Some(1500));
    assert_eq!(a.read_register(TMCCT, 1000), 500);
    assert!(!a.advance(1499));
    assert_eq!(a.pending_vector(), None, "not early");
    assert!(a.advance(1500));
    assert_eq!(a.pending_vector(), Some(0x40));
    assert_eq!(a.next_timer_deadline(), None);
    assert_eq!(a.read_register(TMCCT, 3000), 0);
    a.acknowledge();
    let _ = a.write_register(EOI, 0, 3000);
    assert!(!a.advance(10_000));
    assert_eq!(a.stats().timer_expired, 1);
}

// SDM Figure 11-10: all eight divide values, observed through the current count.
#[test]
fn all_divide_values_scale_the_count() {
    for (dcr, div) in [
        (0x0, 2u64),
        (0x1, 4),
        (0x2, 8),
        (0x3, 16),
        (0x8, 32),
        (0x9, 64),
        (0xA, 128),
        (0xB, 1),
    ] {
        let mut a = apic_1ns();
        let _ = a.write_register(TDCR, dcr, 0);
        let _ = a.write_register(TMICT, 1000, 0);
        // LVT timer is masked after reset: the timer counts, no deadline is reported.
        assert_eq!(a.timer().deadline(), Some(1000 * div), "dcr {dcr:#x}");
        assert_eq!(a.read_register(TMCCT, 100 * div), 900, "dcr {dcr:#x}");
    }
}

// SDM §11.5.4: periodic reloads; an initial count of 0 stops the timer.
#[test]
fn periodic_reloads_and_zero_stops() {
    let mut a = apic_1ns();
    let _ = a.write_register(TDCR, 0xB, 0);
    let _ = a.write_register(LVT_TIMER, 0x2_0041, 0);
    let _ = a.write_register(TMICT, 100, 0);
    let mut fired = 0;
    for t in (0..=1000).step_by(10) {
        if a.advance(t) {
            fired += 1;
            a.acknowledge();
            let _ = a.write_register(EOI, 0, t);
        }
    }
    assert_eq!(fired, 10);
    let _ = a.write_register(TMICT, 0, 1000);
    assert_eq!(a.next_timer_deadline(), None);
    assert!(!a.advance(5000));
}

// Documented catch-up policy: one interrupt, next expiry on the first period boundary
// after now (no drift, no burst); missed periods counted.
#[test]
fn late_periodic_delivers_once_and_keeps_phase() {
    let mut a = apic_1ns();
    let _ = a.write_register(TDCR, 0xB, 0);
    let _ = a.write_register(LVT_TIMER, 0x2_0041, 0);
    let _ = a.write_register(TMICT, 100, 0);
    assert!(a.advance(1050));
    assert_eq!(a.timer().deadline(), Some(1100));
    assert_eq!(a.stats().timer_missed, 9);
    assert_eq!(a.irr().len(), 1);
    assert_eq!(
        a.next_timer_deadline(),
        None,
        "0x41 already pending (issue 10)"
    );
    assert_eq!(a.plan_entry(1060, true).timer_deadline, Some(1100));
}

// Masked timer keeps counting; the interrupt is dropped (bhyve, ACRN).
#[test]
fn masked_timer_counts_without_interrupting() {
    let mut a = apic_1ns();
    let _ = a.write_register(TDCR, 0xB, 0);
    let _ = a.write_register(LVT_TIMER, 0x3_0041, 0); // periodic, masked
    let _ = a.write_register(TMICT, 100, 0);
    assert!(a.advance(100));
    assert_eq!(a.pending_vector(), None);
    assert_eq!(a.read_register(TMCCT, 150), 50, "still reloading");
    assert_eq!(
        a.next_timer_deadline(),
        None,
        "nothing to wake for (issue 10)"
    );
}

// kvm-unit-tests test_apic_change_mode: TMICT survives one-shot <-> periodic, an
// expired one-shot stays at 0 after switching to periodic.
#[test]
fn one_shot_periodic_switches_keep_counting() {
    let mut a = apic_1ns();
    let _ = a.write_register(TDCR, 0xB, 0);
    let _ = a.write_register(LVT_TIMER, 0x41, 0);
    let _ = a.write_register(TMICT, 100, 0);
    let _ = a.write_register(LVT_TIMER, 0x2_0041, 50);
    assert_eq!(a.read_register(TMICT, 50), 100);
    assert_eq!(a.read_register(TMCCT, 50), 50);
    assert!(a.advance(100));
    assert_eq!(a.timer().deadline(), Some(200), "periodic now: reloads");
    let _ = a.write_register(LVT_TIMER, 0x41, 150);
    assert!(a.advance(200));
    assert_eq!(a.next_timer_deadline(), None, "one-shot again: stops");
    let _ = a.write_register(LVT_TIMER, 0x2_0041, 300);
    assert_eq!(a.read_register(TMCCT, 300), 0, "expired one-shot stays 0");
}

// SDM §11.5.4.1: TSC-deadline mode arms on IA32_TSC_DEADLINE, ignores TMICT, reads
// CCR 0, clears the MSR when it fires; a past deadline fires at once
// (kvm-unit-tests test_tsc_deadline_timer).
#[test]
fn tsc_deadline_mode() {
    let mut a = xapic_with(LapicConfig::default().with_clock(TimerClock {
        bus_cycle_ns: 1,
        tsc_hz: 3_000_000_000,
    }));
    let _ = a.write_register(LVT_TIMER, 0x4_0042, 0);
    let _ = a.write_register(TMICT, 1000, 0);
    assert_eq!(a.read_register(TMICT, 0), 0, "ignored in TSC-deadline mode");
    let fx = a.write_msr(0x6E0, 3_000_000, 0).unwrap();
    assert!(fx.timer_changed);
    assert_eq!(a.next_timer_deadline(), Some(1_000_000));
    assert_eq!(a.read_msr(0x6E0, 999_999), Ok(3_000_000));
    assert_eq!(a.read_register(TMCCT, 10), 0);
    assert!(a.advance(1_000_000));
    assert_eq!(a.read_msr(0x6E0, 1_000_000), Ok(0));
    assert_eq!(a.acknowledge(), Some(0x42));
    let _ = a.write_register(EOI, 0, 1_000_000);
    // A deadline already in the past fires immediately.
    let _ = a.write_msr(0x6E0, 1, 2_000_000).unwrap();
    assert_eq!(a.pending_vector(), Some(0x42));
}

#[test]
fn tsc_deadline_writes_ignored_in_other_modes_and_gp_when_not_offered() {
    let mut a = apic_1ns();
    let _ = a.write_msr(0x6E0, 5000, 0).unwrap();
    assert_eq!(a.read_msr(0x6E0, 0), Ok(0));
    assert_eq!(a.next_timer_deadline(), None);
    let mut b = xapic_with(LapicConfig::default().with_tsc_deadline(false));
    assert_eq!(b.read_msr(0x6E0, 0), Err(vlapic::GpFault));
    // Without TSC-deadline support, LVT timer bit 18 is reserved.
    let _ = b.write_register(LVT_TIMER, 0x4_0042, 0);
    assert_eq!(b.read_register(LVT_TIMER, 0), 0x42);
}

// SDM §11.5.4.1: switching into or out of TSC-deadline mode disarms the timer.
#[test]
fn switching_to_tsc_deadline_disarms() {
    let mut a = apic_1ns();
    let _ = a.write_register(TMICT, 1000, 0);
    let fx = a.write_register(LVT_TIMER, 0x4_0042, 10);
    assert!(fx.timer_changed);
    assert_eq!(a.next_timer_deadline(), None);
    let _ = a.write_msr(0x6E0, 500, 10).unwrap();
    let _ = a.write_register(LVT_TIMER, 0x42, 20);
    assert_eq!(a.next_timer_deadline(), None);
    assert_eq!(a.read_msr(0x6E0, 20), Ok(0));
}

// Time never runs backwards inside the model.
#[test]
fn time_is_monotonic() {
    let mut a = apic_1ns();
    let _ = a.write_register(TDCR, 0xB, 0);
    let _ = a.write_register(TMICT, 100, 1000);
    assert_eq!(
        a.read_register(TMCCT, 500),
        100,
        "an older time is taken as the latest seen"
    );
    assert_eq!(a.now(), 1000);
}
