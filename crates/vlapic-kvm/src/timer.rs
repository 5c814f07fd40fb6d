//! The LAPIC timer service: one host thread that sleeps until the earliest armed
//! deadline (VM nanoseconds, from every APIC's `next_timer_deadline`) and kicks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::clock::VmClock;
use crate::kick::VcpuKick;
use crate::lock;

/// One host thread that sleeps until the earliest armed LAPIC timer deadline
/// (VM nanoseconds) and kicks the vCPUs whose deadlines passed.
pub struct TimerService {
    deadlines: Mutex<Deadlines>,
    cv: Condvar,
    stop: AtomicBool,
}

/// The armed deadlines, and the one the service thread sleeps toward.
struct Deadlines {
    /// Per vCPU, the VM time to kick it at.
    at: Vec<Option<u64>>,
    /// The earliest deadline the service thread saw before it went to sleep (`None`:
    /// none was armed). It wakes by then at the latest, so arming a later deadline,
    /// or disarming, needs no wake-up: it finds nothing due and sleeps again.
    wake_at: Option<u64>,
}

impl TimerService {
    /// A service for `n` vCPUs with nothing armed.
    pub fn new(n: usize) -> Self {
        Self {
            deadlines: Mutex::new(Deadlines {
                at: vec![None; n],
                wake_at: None,
            }),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
        }
    }

    /// Arms (or with `None` disarms) the timer of `vcpu` at VM time `deadline`.
    /// Wakes the service thread only for a deadline earlier than the one it sleeps
    /// toward (issue 14: a wake-up per vCPU exit costs the host a thread switch).
    pub fn arm(&self, vcpu: usize, deadline: Option<u64>) {
        let mut d = lock(&self.deadlines);
        if let Some(slot) = d.at.get_mut(vcpu) {
            *slot = deadline;
        }
        let wake = deadline.is_some_and(|t| d.wake_at.is_none_or(|w| t < w));
        if wake {
            // Until it has looked again, the thread counts as sleeping toward `t`.
            d.wake_at = deadline;
        }
        drop(d);
        if wake {
            self.cv.notify_all();
        }
    }

    /// Stops [`TimerService::run`].
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _g = lock(&self.deadlines);
        self.cv.notify_all();
    }

    /// The service loop (run it on its own thread).
    pub fn run(self: Arc<Self>, clock: VmClock, kicks: Vec<Arc<VcpuKick>>) {
        // Default timer slack (50 us) would dominate short deadlines; ask for 1 ns.
        // SAFETY: PR_SET_TIMERSLACK takes an integer argument and only affects the
        // calling thread; a failure leaves the default slack.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
        let mut due = Vec::new();
        let mut g = lock(&self.deadlines);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let now = clock.now_ns();
            let mut earliest: Option<u64> = None;
            for (i, slot) in g.at.iter_mut().enumerate() {
                match *slot {
                    Some(t) if t <= now => {
                        *slot = None;
                        due.push(i);
                    }
                    Some(t) => earliest = Some(earliest.map_or(t, |e| e.min(t))),
                    None => {}
                }
            }
            if !due.is_empty() {
                drop(g);
                for i in due.drain(..) {
                    if let Some(k) = kicks.get(i) {
                        k.kick();
                    }
                }
                g = lock(&self.deadlines);
                continue;
            }
            g.wake_at = earliest;
            let wait = earliest.map_or(Duration::from_millis(100), |t| {
                Duration::from_nanos(t.saturating_sub(now)).min(Duration::from_millis(100))
            });
            g = match self.cv.wait_timeout(g, wait) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A service thread on a clock of the host TSC, with one unregistered vCPU kick
    /// (a kick then only counts and unparks).
    fn service() -> (Arc<TimerService>, Arc<VcpuKick>, VmClock) {
        let clock = VmClock::new(VmClock::host_tsc(), 0, 2_000_000_000);
        let svc = Arc::new(TimerService::new(1));
        let kick = Arc::new(VcpuKick::new(0));
        let (s, c, k) = (svc.clone(), clock.clone(), vec![kick.clone()]);
        std::thread::spawn(move || s.run(c, k));
        (svc, kick, clock)
    }

    /// Waits (up to 10 s of wall time) for the first kick; returns the VM time seen
    /// just after it, or `None`.
    fn first_kick(kick: &VcpuKick, clock: &VmClock) -> Option<u64> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if kick.kicks.load(Ordering::SeqCst) > 0 {
                return Some(clock.now_ns());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        None
    }

    // The service thread is woken only for an earlier deadline (issue 14); a later
    // one replacing the deadline it sleeps toward must still be kicked, and not
    // before it is due.
    #[test]
    fn a_later_deadline_is_kicked_when_due() {
        let (svc, kick, clock) = service();
        let now = clock.now_ns();
        svc.arm(0, Some(now + 20_000_000));
        // Let the thread go to sleep toward the first deadline, then move it later.
        std::thread::sleep(Duration::from_millis(2));
        let later = clock.now_ns() + 60_000_000;
        svc.arm(0, Some(later));
        let at = first_kick(&kick, &clock).expect("the later deadline was never kicked");
        assert!(at >= later, "kicked at {at}, before the deadline {later}");
        assert_eq!(kick.kicks.load(Ordering::SeqCst), 1);
        svc.stop();
    }

    // An earlier deadline wakes the thread sleeping toward a far one.
    #[test]
    fn an_earlier_deadline_wakes_the_thread() {
        let (svc, kick, clock) = service();
        let far = clock.now_ns() + 3_600_000_000_000;
        svc.arm(0, Some(far));
        std::thread::sleep(Duration::from_millis(2));
        svc.arm(0, Some(clock.now_ns() + 1_000_000));
        let at = first_kick(&kick, &clock).expect("the earlier deadline was never kicked");
        assert!(at < far);
        svc.stop();
    }

    // A disarmed deadline is never kicked, though the thread was not woken for it.
    #[test]
    fn a_disarmed_deadline_is_not_kicked() {
        let (svc, kick, clock) = service();
        let due = clock.now_ns() + 5_000_000;
        svc.arm(0, Some(due));
        std::thread::sleep(Duration::from_millis(1));
        svc.arm(0, None);
        while clock.now_ns() < due + 20_000_000 {
            std::thread::sleep(Duration::from_millis(5));
        }
        // A new deadline shows the thread alive: one kick in all, for that one.
        svc.arm(0, Some(clock.now_ns() + 1_000_000));
        first_kick(&kick, &clock).expect("the service thread stopped");
        assert_eq!(kick.kicks.load(Ordering::SeqCst), 1);
        svc.stop();
    }
}
