//! Time keeping with the TSC, and APIC-timer calibration.
//!
//! The platform offers no absolute time reference (no PIT/HPET in the
//! contract), so:
//! * timeouts and settle delays are TSC cycle counts derived from a TSC
//!   frequency *estimate* (CPUID 0x15/0x16, the hypervisor leaf 0x40000010,
//!   else 2 GHz). They only have to be generous, never precise;
//! * the APIC timer is calibrated *against the TSC* ([`calibrate_apic_timer`]:
//!   TSC cycles per timer tick at divide-by-1), which is all the timer
//!   scenarios need ("fires no earlier than count x tick").
//!
//! Waiting: [`wait_until`] polls with IF unchanged; [`wait_irq`] and
//! [`settle`] poll/spin with IF=1 (interrupts are taken inside the loop, the
//! guest never relies on delivery exactly at STI) and restore IF after.

use core::sync::atomic::{AtomicU64, Ordering::*};

use crate::apic;
use crate::cpu::{self, IrqGuard};

static TSC_KHZ: AtomicU64 = AtomicU64::new(2_000_000);
/// Like [`settle`], but also returns the TSC cycles this CPU evidently did
/// not spend in the loop: gaps longer than `gap` between consecutive TSC
/// reads (the vCPU was descheduled by the host, or ran a long interrupt
/// handler). Used to discount host noise from rate measurements.
pub fn settle_stolen(cycles: u64, gap: u64) -> u64 {
    let was = cpu::interrupts_enabled();
    cpu::sti();
    let start = cpu::rdtsc();
    let mut last = start;
    let mut stolen = 0;
    loop {
        let now = cpu::rdtsc();
        let d = now.wrapping_sub(last);
        if d > gap {
            stolen += d;
        }
        last = now;
        if now.wrapping_sub(start) >= cycles {
            break;
        }
        cpu::pause();
    }
    if !was {
        cpu::cli();
    }
    stolen
}

/// TSC cycles per APIC timer tick at divide-by-1, 16.16 fixed point.
static TSC_PER_TICK_Q16: AtomicU64 = AtomicU64::new(0);

/// Estimate the TSC frequency; returns a short description of the source.
pub fn init_tsc_estimate() -> &'static str {
    let max = cpu::cpuid(0, 0).0;
    if max >= 0x15 {
        let (den, num, crystal, _) = cpu::cpuid(0x15, 0);
        if den != 0 && num != 0 && crystal != 0 {
            TSC_KHZ.store(crystal as u64 * num as u64 / den as u64 / 1000, Relaxed);
            return "cpuid-0x15";
        }
    }
    if max >= 0x16 {
        let mhz = cpu::cpuid(0x16, 0).0 & 0xFFFF;
        if mhz != 0 {
            TSC_KHZ.store(mhz as u64 * 1000, Relaxed);
            return "cpuid-0x16";
        }
    }
    if cpu::cpuid(1, 0).2 & (1 << 31) != 0 {
        let hmax = cpu::cpuid(0x4000_0000, 0).0;
        if (0x4000_0010..0x4001_0000).contains(&hmax) {
            let khz = cpu::cpuid(0x4000_0010, 0).0;
            if khz != 0 {
                TSC_KHZ.store(khz as u64, Relaxed);
                return "cpuid-0x40000010";
            }
        }
    }
    "assumed"
}

pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Relaxed)
}

/// Approximate TSC cycles in `n` milliseconds.
pub fn ms(n: u64) -> u64 {
    n * tsc_khz()
}

/// Approximate TSC cycles in `n` microseconds.
pub fn us(n: u64) -> u64 {
    n * tsc_khz() / 1000
}

/// Default timeout for things that must happen "soon".
pub fn timeout() -> u64 {
    ms(3000)
}

/// Default time to wait for things that must *not* happen.
pub fn settle_time() -> u64 {
    ms(20)
}

/// Busy-wait `cycles` TSC cycles (IF unchanged).
pub fn delay(cycles: u64) {
    let end = cpu::rdtsc().wrapping_add(cycles);
    while (cpu::rdtsc() as i64).wrapping_sub(end as i64) < 0 {
        cpu::pause();
    }
}

/// Poll `cond` until true or `cycles` elapsed (IF unchanged).
///
/// `cycles` counts time this vCPU ran: a gap of more than [`PAUSE_GAP_MS`] between
/// two polls is a pause (a save restored in a new process, a migration, the host
/// descheduling the vCPU) and does not count. On hosts whose KVM ignores a restored
/// IA32_TSC (kvm_pvm) the TSC runs on between `--save` and `--restore`, and a wait
/// caught by the save would otherwise time out in the restored guest although
/// nothing was late. Discounting pauses only ever lengthens a wait.
pub fn wait_until(cycles: u64, mut cond: impl FnMut() -> bool) -> bool {
    let pause_gap = ms(PAUSE_GAP_MS);
    let mut last = cpu::rdtsc();
    let mut ran = 0u64;
    loop {
        if cond() {
            return true;
        }
        let now = cpu::rdtsc();
        let d = now.wrapping_sub(last);
        last = now;
        if d <= pause_gap {
            ran = ran.saturating_add(d);
        }
        if ran > cycles {
            return cond();
        }
        cpu::pause();
    }
}

/// A gap between two polls of [`wait_until`] longer than this (in ms) is a pause of
/// the vCPU, not time spent waiting.
pub const PAUSE_GAP_MS: u64 = 50;

/// Like [`wait_until`] but with interrupts enabled while waiting.
pub fn wait_irq(cycles: u64, cond: impl FnMut() -> bool) -> bool {
    let was = cpu::interrupts_enabled();
    cpu::sti();
    let r = wait_until(cycles, cond);
    if !was {
        cpu::cli();
    }
    r
}

/// Spin `cycles` with interrupts enabled (lets pending interrupts arrive).
pub fn settle(cycles: u64) {
    let was = cpu::interrupts_enabled();
    cpu::sti();
    delay(cycles);
    if !was {
        cpu::cli();
    }
}

/// TSC cycles per APIC timer tick at divide-by-1 (16.16), 0 if uncalibrated.
pub fn tsc_per_tick_q16() -> u64 {
    TSC_PER_TICK_Q16.load(Relaxed)
}

/// APIC timer ticks (divide-by-1) for `cycles` TSC cycles.
pub fn tsc_to_ticks(cycles: u64) -> u64 {
    (cycles << 16).checked_div(tsc_per_tick_q16()).unwrap_or(0)
}

/// TSC cycles for `ticks` APIC timer ticks (divide-by-1).
pub fn ticks_to_tsc(ticks: u64) -> u64 {
    (ticks * tsc_per_tick_q16()) >> 16
}

/// Sample (TSC midpoint, current count): of a few reads of the current count,
/// the one whose exit took the least TSC time. The count is taken somewhere
/// inside [a, b], so the midpoint is off by at most (b - a) / 2; a host that
/// deschedules the vCPU thread during one read (milliseconds under load) would
/// otherwise skew a 30 ms calibration by several per cent.
fn sample() -> (u64, u32) {
    let mut best = (u64::MAX, 0, 0);
    for _ in 0..8 {
        let a = cpu::rdtsc();
        let c = apic::read(apic::TIMER_CCR);
        let b = cpu::rdtsc();
        let spread = b.wrapping_sub(a);
        if spread < best.0 {
            best = (spread, a / 2 + b / 2, c);
        }
    }
    (best.1, best.2)
}

/// Measure the APIC timer rate against the TSC over ~30 ms (masked
/// one-shot, divide-by-1). Must run on the BSP with its timer idle.
/// Returns the number of timer ticks observed (0 = timer does not count).
pub fn calibrate_apic_timer() -> u64 {
    let _irq = IrqGuard::new();
    apic::write(apic::LVT_TIMER, apic::LVT_MASKED | 0x30);
    apic::write(apic::TIMER_DCR, 0xB);
    apic::write(apic::TIMER_ICR, 0xFFFF_FFFF);
    let (t0, c0) = sample();
    delay(ms(30));
    let (t1, c1) = sample();
    apic::write(apic::TIMER_ICR, 0);
    let ticks = c0.wrapping_sub(c1) as u64;
    if ticks != 0 && c1 < c0 {
        TSC_PER_TICK_Q16.store(((t1 - t0) << 16) / ticks, Relaxed);
        ticks
    } else {
        0
    }
}
