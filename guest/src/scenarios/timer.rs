//! Local APIC timer scenarios: one-shot, periodic, TSC-deadline.
//!
//! Durations are programmed through the calibration in `time` (TSC cycles
//! per timer tick), so "not early" is checked against the timer's own
//! count-down rate; upper bounds are generous (nested virtualisation is
//! noisy) but still catch a timer that fires at the wrong rate; the
//! periodic lower bound discounts time the host did not run the vCPU.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

use crate::apic::{self, LVT_MASKED, LVT_TIMER_PERIODIC, LVT_TIMER_TSC_DEADLINE};
use crate::idt::{self, Frame};
use crate::report::Res;
use crate::{cpu, time};

const V_ONESHOT: u8 = 0x38;
const V_PERIODIC: u8 = 0x39;
const V_DEADLINE: u8 = 0x3A;

static FIRES: AtomicU32 = AtomicU32::new(0);
static FIRST_TSC: AtomicU64 = AtomicU64::new(0);

fn timer_handler(_f: &mut Frame) {
    let t = cpu::rdtsc();
    if FIRES.fetch_add(1, SeqCst) == 0 {
        FIRST_TSC.store(t, SeqCst);
    }
    apic::eoi();
}

fn reset_fires() {
    FIRES.store(0, SeqCst);
    FIRST_TSC.store(0, SeqCst);
}

fn fires() -> u32 {
    FIRES.load(SeqCst)
}

/// Arm a one-shot with `count` ticks (current DCR) and check it fires once,
/// not before `expected` TSC cycles.
fn oneshot_once(count: u32, expected: u64, what: &str) -> Res {
    reset_fires();
    let t0 = cpu::rdtsc();
    apic::write(apic::TIMER_ICR, count);
    let ccr = apic::read(apic::TIMER_CCR);
    ensure!(
        ccr <= count,
        "{}: current count {} above initial count {}",
        what,
        ccr,
        count
    );
    let fired = time::wait_irq(20 * expected + time::timeout(), || fires() >= 1);
    ensure!(fired, "{}: one-shot (count {}) never fired", what, count);
    let elapsed = FIRST_TSC.load(SeqCst).wrapping_sub(t0);
    ensure!(
        elapsed * 100 >= expected * 98,
        "{}: fired early, after {} TSC cycles (expected >= {})",
        what,
        elapsed,
        expected
    );
    ensure!(
        elapsed <= 20 * expected + time::ms(500),
        "{}: fired very late, after {} TSC cycles (expected ~{})",
        what,
        elapsed,
        expected
    );
    time::settle(2 * expected + time::settle_time());
    ensure!(fires() == 1, "{}: one-shot fired {} times", what, fires());
    let ccr = apic::read(apic::TIMER_CCR);
    ensure!(
        ccr == 0,
        "{}: current count {} after expiry (expected 0)",
        what,
        ccr
    );
    Ok(())
}

/// Change the divide configuration with the timer stopped.
fn set_divide(dcr: u32) {
    apic::write(apic::TIMER_ICR, 0);
    apic::write(apic::TIMER_DCR, dcr);
    time::settle(time::ms(1));
}

pub fn oneshot() -> Res {
    ensure!(
        time::tsc_per_tick_q16() != 0,
        "APIC timer did not count during calibration"
    );
    idt::set_handler(V_ONESHOT, timer_handler);
    let expected_for = |ticks: u64| time::ticks_to_tsc(ticks);

    // Divide by 1, ~10 ms.
    let count = time::tsc_to_ticks(time::ms(10)).clamp(1, u32::MAX as u64) as u32;
    set_divide(0xB);
    apic::write(apic::LVT_TIMER, V_ONESHOT as u32);
    oneshot_once(count, expected_for(count as u64), "divide-by-1")?;

    // Re-arming by writing the initial count again.
    oneshot_once(count, expected_for(count as u64), "re-armed")?;

    // Divide by 4 (DCR=0b0001): a quarter of the ticks for the same time.
    // The divider is changed with the timer stopped (initial count 0).
    let count4 = (count / 4).max(1);
    set_divide(0x1);
    oneshot_once(count4, expected_for(count4 as u64 * 4), "divide-by-4")?;
    set_divide(0xB);

    // Masked: counts down to 0 without an interrupt.
    reset_fires();
    apic::write(apic::LVT_TIMER, LVT_MASKED | V_ONESHOT as u32);
    apic::write(apic::TIMER_ICR, count);
    time::settle(2 * expected_for(count as u64) + time::settle_time());
    ensure!(
        fires() == 0,
        "masked one-shot raised {} interrupts",
        fires()
    );
    let ccr = apic::read(apic::TIMER_CCR);
    ensure!(
        ccr == 0,
        "masked one-shot: current count {} (expected 0 after expiry)",
        ccr
    );
    Ok(())
}

pub fn periodic() -> Res {
    ensure!(
        time::tsc_per_tick_q16() != 0,
        "APIC timer did not count during calibration"
    );
    idt::set_handler(V_PERIODIC, timer_handler);
    // ~5 ms period: slow enough for hosts that emulate the guest.
    let count = time::tsc_to_ticks(time::ms(5)).clamp(1, u32::MAX as u64) as u32;
    let period = time::ticks_to_tsc(count as u64).max(1);

    reset_fires();
    set_divide(0xB);
    apic::write(apic::LVT_TIMER, LVT_TIMER_PERIODIC | V_PERIODIC as u32);
    let t0 = cpu::rdtsc();
    apic::write(apic::TIMER_ICR, count);
    // Time the host did not let this vCPU run is discounted from the lower
    // bound: ticks falling into it coalesce in IRR, legitimately.
    let stolen = time::settle_stolen(60 * period, period / 4);
    let n = fires() as u64;
    let elapsed = cpu::rdtsc() - t0;
    let expected = elapsed / period;
    let active = elapsed.saturating_sub(stolen) / period;
    ensure!(
        n <= expected + expected / 10 + 2,
        "{} ticks in {} periods: fires faster than programmed",
        n,
        expected
    );
    ensure!(
        n >= 3 && n * 2 + 2 >= active,
        "only {} ticks in {} periods ({} of them with the CPU running)",
        n,
        expected,
        active
    );
    let ccr = apic::read(apic::TIMER_CCR);
    ensure!(
        ccr <= count,
        "periodic: current count {} above initial count {}",
        ccr,
        count
    );

    // Masking stops the interrupts.
    apic::write(
        apic::LVT_TIMER,
        LVT_MASKED | LVT_TIMER_PERIODIC | V_PERIODIC as u32,
    );
    time::settle(3 * period + time::ms(2));
    time::wait_irq(time::timeout(), || !apic::irr_bit(V_PERIODIC));
    let m = fires();
    time::settle(10 * period + time::ms(5));
    ensure!(fires() == m, "{} ticks while masked", fires() - m);

    // Unmasking resumes them.
    apic::write(apic::LVT_TIMER, LVT_TIMER_PERIODIC | V_PERIODIC as u32);
    ensure!(
        time::wait_irq(time::timeout(), || fires() >= m + 3),
        "no ticks after unmasking"
    );

    // Initial count 0 stops the timer.
    apic::write(apic::TIMER_ICR, 0);
    time::settle(3 * period + time::ms(2));
    time::wait_irq(time::timeout(), || !apic::irr_bit(V_PERIODIC));
    let s = fires();
    time::settle(10 * period + time::ms(5));
    ensure!(
        fires() == s,
        "{} ticks after writing initial count 0",
        fires() - s
    );
    ensure!(
        apic::read(apic::TIMER_CCR) == 0,
        "current count {} after stopping",
        apic::read(apic::TIMER_CCR)
    );
    Ok(())
}

pub fn tsc_deadline() -> Res {
    if !cpu::has_tsc_deadline() {
        skip!("CPU lacks TSC-deadline mode (CPUID.1:ECX[24]=0)");
    }
    idt::set_handler(V_DEADLINE, timer_handler);
    apic::write(apic::LVT_TIMER, LVT_TIMER_TSC_DEADLINE | V_DEADLINE as u32);
    cpu::mfence(); // SDM: order the LVT write before the deadline MSR write

    // Fires once, not before the deadline; the MSR reads 0 afterwards.
    reset_fires();
    let delta = time::ms(5);
    let deadline = cpu::rdtsc() + delta;
    unsafe { cpu::wrmsr(cpu::MSR_TSC_DEADLINE, deadline) };
    ensure!(
        time::wait_irq(20 * delta + time::timeout(), || fires() >= 1),
        "deadline never fired"
    );
    let at = FIRST_TSC.load(SeqCst);
    ensure!(
        at >= deadline,
        "fired {} TSC cycles before the deadline",
        deadline - at
    );
    time::settle(time::settle_time());
    ensure!(fires() == 1, "fired {} times for one deadline", fires());
    let msr = unsafe { cpu::rdmsr(cpu::MSR_TSC_DEADLINE) };
    ensure!(
        msr == 0,
        "IA32_TSC_DEADLINE reads {:#x} after firing (expected 0)",
        msr
    );

    // A deadline in the past fires immediately.
    reset_fires();
    let t = cpu::rdtsc();
    unsafe { cpu::wrmsr(cpu::MSR_TSC_DEADLINE, t.saturating_sub(time::ms(1)).max(1)) };
    ensure!(
        time::wait_irq(time::ms(100), || fires() >= 1),
        "a deadline in the past did not fire within 100 ms"
    );
    time::settle(time::settle_time());
    ensure!(fires() == 1, "past deadline fired {} times", fires());

    // Writing 0 disarms. The check only counts when the guest's own TSC proves the
    // disarming write completed before the deadline: a vCPU can be descheduled (or a
    // VMM paused for a migration) between the two writes, and then the interrupt is
    // legitimately due. Such a round is inconclusive and retried.
    let mut conclusive = false;
    for _ in 0..8 {
        reset_fires();
        let deadline = cpu::rdtsc() + time::ms(20);
        unsafe {
            cpu::wrmsr(cpu::MSR_TSC_DEADLINE, deadline);
            cpu::wrmsr(cpu::MSR_TSC_DEADLINE, 0);
        }
        let after = cpu::rdtsc();
        time::settle(time::ms(40));
        if after >= deadline {
            continue;
        }
        conclusive = true;
        ensure!(
            fires() == 0,
            "fired after the deadline was disarmed (written 0)"
        );
        break;
    }
    ensure!(
        conclusive,
        "could not disarm within 20 ms of arming in 8 tries (host too loaded)"
    );

    // The initial-count register is ignored; the current count reads 0.
    apic::write(apic::TIMER_ICR, 1000);
    time::settle(time::ms(5));
    ensure!(
        fires() == 0,
        "initial-count write fired the timer in TSC-deadline mode"
    );
    let ccr = apic::read(apic::TIMER_CCR);
    ensure!(
        ccr == 0,
        "current count {} in TSC-deadline mode (expected 0)",
        ccr
    );
    Ok(())
}
