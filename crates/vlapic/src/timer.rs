//! The APIC timer: one-shot, periodic and TSC-deadline modes on caller-supplied
//! VM time (SDM Vol. 3A §11.5.4). All arithmetic is checked or saturating.
//!
//! Time model: VM time is nanoseconds since an origin the embedder chooses. The
//! timer counts at `bus_cycle_ns × divisor` nanoseconds per tick. The guest TSC is
//! `vm_ns × tsc_hz / 10^9`. The only timer state is the initial count, the divide
//! configuration, the absolute VM time of the next expiry, and IA32_TSC_DEADLINE;
//! the current count is derived from the expiry time.
//!
//! Catch-up policy when the embedder reports time late: one interrupt per call,
//! however many expiries were missed (IRR holds one bit per vector anyway); a
//! periodic timer's next expiry is the first period boundary after `now`, so the
//! phase never drifts and there is no burst. Missed periods are counted.
//!
//! Minimum period (KVM's `min_timer_period_us`, see
//! [`crate::LapicConfig::min_timer_period_us`]): in periodic mode successive
//! expiries are at least that far apart. The count itself stays architectural: TMCCT
//! counts down from the initial count and reloads every period, in phase with the
//! first expiry after the timer was armed (the *anchor*), even when expiries are
//! spaced further apart than the period.

use crate::lvt::TimerMode;

/// How VM time maps to timer ticks and to the guest TSC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerClock {
    /// Nanoseconds per APIC bus cycle before the divider (KVM's default is 1).
    pub bus_cycle_ns: u32,
    /// Guest TSC frequency in Hz (the TSC-deadline mode's time base).
    pub tsc_hz: u64,
}

impl Default for TimerClock {
    fn default() -> Self {
        Self {
            bus_cycle_ns: 1,
            tsc_hz: 1_000_000_000,
        }
    }
}

impl TimerClock {
    /// Guest TSC value at VM time `ns` (saturating).
    pub fn ns_to_tsc(&self, ns: u64) -> u64 {
        let t = u128::from(ns).saturating_mul(u128::from(self.tsc_hz)) / NS_PER_SEC;
        u64::try_from(t).unwrap_or(u64::MAX)
    }

    /// The first VM time at which the guest TSC reaches `tsc`; `None` when it never
    /// does in 64-bit nanoseconds (or the TSC frequency is 0).
    pub fn tsc_to_ns(&self, tsc: u64) -> Option<u64> {
        let num = u128::from(tsc).saturating_mul(NS_PER_SEC);
        let hz = u128::from(self.tsc_hz);
        let q = num.checked_div(hz)?;
        let ns = if num.checked_rem(hz) == Some(0) {
            q
        } else {
            q.saturating_add(1)
        };
        u64::try_from(ns).ok()
    }
}

const NS_PER_SEC: u128 = 1_000_000_000;

/// Divisor selected by the divide configuration register (SDM Figure 11-10):
/// bits 1:0 and bit 3 form a 3-bit value d; the divisor is 2^((d + 1) mod 8).
///
/// ```
/// use vlapic::timer::divisor;
/// assert_eq!(divisor(0x0), 2);
/// assert_eq!(divisor(0xA), 128);
/// assert_eq!(divisor(0xB), 1);
/// ```
pub const fn divisor(dcr: u32) -> u64 {
    let d = (dcr & 3) | ((dcr >> 1) & 4);
    1u64 << (d.wrapping_add(1) & 7)
}

/// What an expiry check found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expiry {
    /// The timer reached zero (or the TSC deadline passed): deliver the LVT timer interrupt.
    pub fired: bool,
    /// Periodic expiries that passed unreported because the caller was late.
    pub missed: u64,
}

/// Timer state. See the module docs for the time model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Timer {
    initial: u32,
    dcr: u32,
    /// The next expiry to process (in periodic mode with a minimum period, possibly
    /// later than the next time the count reaches zero).
    deadline: Option<u64>,
    tsc_deadline: u64,
    /// A VM time at which the count reaches (or reached) zero: the periodic count runs
    /// in phase with it. Set whenever counting (re)starts.
    anchor: u64,
}

impl Timer {
    /// Timer initial count register.
    pub fn initial_count(&self) -> u32 {
        self.initial
    }

    /// Divide configuration register.
    pub fn divide_config(&self) -> u32 {
        self.dcr
    }

    /// Absolute VM time of the next expiry, if the timer is armed.
    pub fn deadline(&self) -> Option<u64> {
        self.deadline
    }

    /// Absolute VM time at which the count next reaches zero, as seen at `now`: the
    /// architectural expiry time (what the saved state records). It equals
    /// [`Timer::deadline`] except for a periodic timer whose expiries are spaced by a
    /// minimum period longer than its period; a deadline already due is returned as is.
    pub fn counting_deadline(&self, now: u64, mode: TimerMode, clock: &TimerClock) -> Option<u64> {
        let deadline = self.deadline?;
        if mode != TimerMode::Periodic || deadline <= now {
            return Some(deadline);
        }
        let left = self.periodic_remaining(now, clock).unwrap_or(0);
        Some(now.saturating_add(left).min(deadline))
    }

    /// Nanoseconds from `now` until a periodic count next reaches zero (in `1..=period`
    /// once the anchor has passed); `None` when the period is 0 or overflows.
    fn periodic_remaining(&self, now: u64, clock: &TimerClock) -> Option<u64> {
        let period = self.period_ns(clock).filter(|&p| p > 0)?;
        if now < self.anchor {
            return Some(self.anchor.saturating_sub(now));
        }
        let into = now.saturating_sub(self.anchor).checked_rem(period)?;
        Some(period.saturating_sub(into))
    }

    /// IA32_TSC_DEADLINE as stored (0 = disarmed). Reads through the MSR report 0
    /// outside TSC-deadline mode; see [`Timer::read_tsc_deadline`].
    pub fn tsc_deadline(&self) -> u64 {
        self.tsc_deadline
    }

    fn tick_ns(&self, clock: &TimerClock) -> u64 {
        divisor(self.dcr).saturating_mul(u64::from(clock.bus_cycle_ns.max(1)))
    }

    /// Length of one period in VM nanoseconds (`None` when the initial count is 0).
    pub fn period_ns(&self, clock: &TimerClock) -> Option<u64> {
        if self.initial == 0 {
            return None;
        }
        u64::from(self.initial).checked_mul(self.tick_ns(clock))
    }

    /// Current count register at VM time `now` (SDM §11.5.4): 0 in TSC-deadline mode
    /// or when not counting; otherwise the ticks left, clamped to the initial count
    /// (illumos 15251: an imported expiry further out than the initial count allows).
    /// A periodic count reloads every period in phase with the anchor, whatever the
    /// spacing of expiries (see the module docs on the minimum period).
    pub fn current_count(&self, now: u64, mode: TimerMode, clock: &TimerClock) -> u32 {
        if mode == TimerMode::TscDeadline {
            return 0;
        }
        let Some(deadline) = self.deadline else {
            return 0;
        };
        let remaining = if mode == TimerMode::Periodic {
            self.periodic_remaining(now, clock)
                .unwrap_or_else(|| deadline.saturating_sub(now))
        } else {
            deadline.saturating_sub(now)
        };
        let tick = self.tick_ns(clock).max(1);
        let ticks = remaining.div_ceil(tick);
        u32::try_from(ticks).unwrap_or(u32::MAX).min(self.initial)
    }

    /// A write to the initial count register. Ignored in TSC-deadline mode; 0 stops
    /// the timer; otherwise counting restarts from the new value.
    pub fn write_initial(&mut self, value: u32, now: u64, mode: TimerMode, clock: &TimerClock) {
        if mode == TimerMode::TscDeadline {
            return;
        }
        self.initial = value;
        self.deadline = self.period_ns(clock).and_then(|p| now.checked_add(p));
        self.anchor = self.deadline.unwrap_or(0);
    }

    /// A write to the divide configuration register. A running count keeps its
    /// current value and continues at the new rate (as KVM rescales).
    pub fn write_divide(&mut self, value: u32, now: u64, mode: TimerMode, clock: &TimerClock) {
        let left = self.current_count(now, mode, clock);
        self.dcr = value & crate::regs::DCR_MASK;
        if mode != TimerMode::TscDeadline && self.deadline.is_some() {
            self.deadline = u64::from(left)
                .checked_mul(self.tick_ns(clock))
                .and_then(|d| now.checked_add(d));
            self.anchor = self.deadline.unwrap_or(0);
        }
    }

    /// The LVT timer mode changed at `now`. Switching into or out of TSC-deadline mode
    /// disarms the timer (SDM §11.5.4.1); one-shot ↔ periodic keeps counting and the
    /// mode in force at expiry decides whether it reloads (leaving periodic mode, the
    /// next expiry is when the count reaches zero, whatever the minimum period).
    pub fn change_mode(&mut self, old: TimerMode, new: TimerMode, now: u64, clock: &TimerClock) {
        if old == new {
            return;
        }
        if old == TimerMode::TscDeadline || new == TimerMode::TscDeadline {
            self.deadline = None;
            self.tsc_deadline = 0;
        } else if old == TimerMode::Periodic {
            self.deadline = self.counting_deadline(now, old, clock);
            self.anchor = self.deadline.unwrap_or(0);
        }
    }

    /// IA32_TSC_DEADLINE as the guest reads it: 0 outside TSC-deadline mode.
    pub fn read_tsc_deadline(&self, mode: TimerMode) -> u64 {
        if mode == TimerMode::TscDeadline {
            self.tsc_deadline
        } else {
            0
        }
    }

    /// A write to IA32_TSC_DEADLINE: ignored outside TSC-deadline mode; 0 disarms;
    /// otherwise arms at the VM time the guest TSC reaches the value (a past value
    /// fires at the next expiry check).
    pub fn write_tsc_deadline(&mut self, value: u64, mode: TimerMode, clock: &TimerClock) {
        if mode != TimerMode::TscDeadline {
            return;
        }
        self.tsc_deadline = value;
        self.deadline = if value == 0 {
            None
        } else {
            // A deadline beyond 64-bit nanoseconds never arrives.
            Some(clock.tsc_to_ns(value).unwrap_or(u64::MAX))
        };
    }

    /// Checks for expiry at `now`, reloading a periodic timer (see the module docs
    /// for the catch-up policy). A periodic timer never re-arms with a zero period
    /// (illumos 16183); its expiries are `max(period, min_period_ns)` apart (0: no
    /// minimum), and `missed` counts in that spacing.
    pub fn expire(
        &mut self,
        now: u64,
        mode: TimerMode,
        clock: &TimerClock,
        min_period_ns: u64,
    ) -> Expiry {
        let Some(deadline) = self.deadline else {
            return Expiry::default();
        };
        if deadline > now {
            return Expiry::default();
        }
        let mut out = Expiry {
            fired: true,
            missed: 0,
        };
        self.deadline = None;
        match mode {
            TimerMode::TscDeadline => self.tsc_deadline = 0,
            TimerMode::OneShot => {}
            TimerMode::Periodic => {
                if let Some(period) = self.period_ns(clock).filter(|&p| p > 0) {
                    let period = period.max(min_period_ns);
                    let late = now.saturating_sub(deadline);
                    out.missed = late.checked_div(period).unwrap_or(0);
                    self.deadline = out
                        .missed
                        .checked_add(1)
                        .and_then(|k| k.checked_mul(period))
                        .and_then(|d| deadline.checked_add(d));
                }
            }
        }
        out
    }

    /// Resets to the power-up state: counts 0, divide by 2, disarmed.
    pub fn reset(&mut self) {
        *self = Timer::default();
    }

    /// Installs imported state: the expiry time is clamped so that the current count
    /// never exceeds the initial count (returns whether it had to be clamped).
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        &mut self,
        initial: u32,
        dcr: u32,
        deadline: Option<u64>,
        tsc_deadline: u64,
        now: u64,
        mode: TimerMode,
        clock: &TimerClock,
    ) -> bool {
        self.initial = initial;
        self.dcr = dcr & crate::regs::DCR_MASK;
        self.tsc_deadline = if mode == TimerMode::TscDeadline {
            tsc_deadline
        } else {
            0
        };
        let mut clamped = false;
        self.deadline = match mode {
            TimerMode::TscDeadline => {
                if self.tsc_deadline == 0 {
                    None
                } else {
                    Some(clock.tsc_to_ns(self.tsc_deadline).unwrap_or(u64::MAX))
                }
            }
            _ => match (deadline, self.period_ns(clock)) {
                (Some(d), Some(p)) => {
                    let latest = now.saturating_add(p);
                    clamped = d > latest;
                    Some(d.min(latest))
                }
                _ => None,
            },
        };
        self.anchor = self.deadline.unwrap_or(0);
        clamped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLK: TimerClock = TimerClock {
        bus_cycle_ns: 1,
        tsc_hz: 2_000_000_000,
    };

    // SDM Figure 11-10: all eight divide values.
    #[test]
    fn all_eight_divisors() {
        let got: Vec<u64> = [0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB]
            .iter()
            .map(|&d| divisor(d))
            .collect();
        assert_eq!(got, vec![2, 4, 8, 16, 32, 64, 128, 1]);
    }

    #[test]
    fn one_shot_counts_down_and_stops() {
        let mut t = Timer::default();
        t.write_divide(0xB, 0, TimerMode::OneShot, &CLK);
        t.write_initial(1000, 100, TimerMode::OneShot, &CLK);
        assert_eq!(t.current_count(100, TimerMode::OneShot, &CLK), 1000);
        assert_eq!(t.current_count(600, TimerMode::OneShot, &CLK), 500);
        assert_eq!(t.deadline(), Some(1100));
        assert!(!t.expire(1099, TimerMode::OneShot, &CLK, 0).fired);
        assert!(t.expire(1100, TimerMode::OneShot, &CLK, 0).fired);
        assert_eq!(t.deadline(), None);
        assert_eq!(t.current_count(2000, TimerMode::OneShot, &CLK), 0);
        assert!(
            !t.expire(5000, TimerMode::OneShot, &CLK, 0).fired,
            "fires once"
        );
    }

    #[test]
    fn periodic_catch_up_keeps_phase_and_counts_missed() {
        let mut t = Timer::default();
        t.write_divide(0xB, 0, TimerMode::Periodic, &CLK);
        t.write_initial(100, 0, TimerMode::Periodic, &CLK);
        let e = t.expire(350, TimerMode::Periodic, &CLK, 0);
        assert_eq!(
            e,
            Expiry {
                fired: true,
                missed: 2
            }
        );
        assert_eq!(t.deadline(), Some(400));
    }

    // CVE-2013-6367: current count with a zero period must not divide by zero.
    #[test]
    fn zero_initial_count_stops_and_reads_zero() {
        let mut t = Timer::default();
        t.write_initial(0, 10, TimerMode::Periodic, &CLK);
        assert_eq!(t.deadline(), None);
        assert_eq!(t.current_count(10, TimerMode::Periodic, &CLK), 0);
        let zero_bus = TimerClock {
            bus_cycle_ns: 0,
            tsc_hz: 0,
        };
        t.write_initial(5, 10, TimerMode::Periodic, &zero_bus);
        // bus_cycle_ns 0 is taken as 1; divide by 2: 9 ns left is 5 ticks (rounded up).
        assert_eq!(t.current_count(11, TimerMode::Periodic, &zero_bus), 5);
        assert_eq!(zero_bus.tsc_to_ns(100), None);
    }

    // illumos 16183: a periodic timer never re-arms with period 0.
    #[test]
    fn periodic_never_rearms_with_zero_period() {
        let mut t = Timer::default();
        t.restore(0, 0, Some(50), 0, 0, TimerMode::Periodic, &CLK);
        assert_eq!(
            t.deadline(),
            None,
            "import of an expiry with initial count 0 stays disarmed"
        );
    }

    #[test]
    fn divide_change_rescales_remaining_count() {
        let mut t = Timer::default();
        t.write_divide(0xB, 0, TimerMode::OneShot, &CLK); // /1
        t.write_initial(1000, 0, TimerMode::OneShot, &CLK);
        t.write_divide(0x0, 400, TimerMode::OneShot, &CLK); // /2, 600 left
        assert_eq!(t.current_count(400, TimerMode::OneShot, &CLK), 600);
        assert_eq!(t.deadline(), Some(400 + 1200));
    }

    #[test]
    fn tsc_deadline_mode() {
        let mut t = Timer::default();
        t.write_tsc_deadline(4000, TimerMode::OneShot, &CLK);
        assert_eq!(t.deadline(), None, "ignored outside TSC-deadline mode");
        t.write_tsc_deadline(4001, TimerMode::TscDeadline, &CLK);
        assert_eq!(t.deadline(), Some(2001), "ceil(4001 / 2 GHz)");
        assert_eq!(t.read_tsc_deadline(TimerMode::TscDeadline), 4001);
        t.write_initial(50, 0, TimerMode::TscDeadline, &CLK);
        assert_eq!(
            t.initial_count(),
            0,
            "initial count ignored in TSC-deadline mode"
        );
        assert!(t.expire(2001, TimerMode::TscDeadline, &CLK, 0).fired);
        assert_eq!(
            t.read_tsc_deadline(TimerMode::TscDeadline),
            0,
            "cleared on expiry"
        );
        let one_hz = TimerClock {
            bus_cycle_ns: 1,
            tsc_hz: 1,
        };
        t.write_tsc_deadline(u64::MAX, TimerMode::TscDeadline, &one_hz);
        assert_eq!(
            t.deadline(),
            Some(u64::MAX),
            "beyond 64-bit ns: never arrives"
        );
        assert!(
            !t.expire(u64::MAX - 1, TimerMode::TscDeadline, &one_hz, 0)
                .fired
        );
    }

    #[test]
    fn mode_switch_to_tsc_deadline_disarms() {
        let mut t = Timer::default();
        t.write_initial(10, 0, TimerMode::OneShot, &CLK);
        t.change_mode(TimerMode::OneShot, TimerMode::Periodic, 0, &CLK);
        assert!(
            t.deadline().is_some(),
            "one-shot -> periodic keeps counting"
        );
        t.change_mode(TimerMode::Periodic, TimerMode::TscDeadline, 0, &CLK);
        assert_eq!(t.deadline(), None);
    }

    // illumos 15251: an imported expiry beyond the initial count is clamped.
    #[test]
    fn restore_clamps_to_initial_count() {
        let mut t = Timer::default();
        let clamped = t.restore(100, 0xB, Some(1_000_000), 0, 10, TimerMode::OneShot, &CLK);
        assert!(clamped);
        assert_eq!(t.current_count(10, TimerMode::OneShot, &CLK), 100);
    }

    #[test]
    fn huge_values_saturate() {
        let mut t = Timer::default();
        let slow = TimerClock {
            bus_cycle_ns: u32::MAX,
            tsc_hz: 1,
        };
        t.write_divide(0xA, 0, TimerMode::OneShot, &slow);
        t.write_initial(u32::MAX, u64::MAX - 5, TimerMode::OneShot, &slow);
        assert_eq!(
            t.deadline(),
            None,
            "an expiry past the end of time never arms"
        );
        assert_eq!(slow.ns_to_tsc(u64::MAX), u64::MAX / 1_000_000_000);
    }
}
