//! The HPET and the CMOS RTC attached to a running VM: one lock for both, the IOAPIC
//! lines they drive, and one host thread that sleeps until their next deadline.
//!
//! Expiries cost host work in proportion to the interrupts they raise: the thread
//! wakes only at a deadline one of the devices gives (or after a guest access that
//! moved one), handles everything due, and sleeps again (at most 100 ms, a safety net).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use vlapic_kvm::VmClock;

use crate::hpet::{self, Hpet, Line};
use crate::lock;
use crate::rtc::{self, Rtc};
use crate::wire::{Reader, Writer};

/// Drives an IOAPIC input (pin, level) through the irqchip in use.
pub type IrqSink = Box<dyn Fn(u32, bool) + Send + Sync>;

/// The two devices behind the lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClockDevices {
    /// The HPET.
    pub hpet: Hpet,
    /// The CMOS RTC.
    pub rtc: Rtc,
}

impl ClockDevices {
    /// Both devices at power-on: the RTC shows `unix_secs` at VM time `now`.
    pub fn new(unix_secs: i64, now: u64, ram: u64) -> Self {
        Self {
            hpet: Hpet::new(),
            rtc: Rtc::new(unix_secs, now, ram),
        }
    }

    /// The devices through their save-file encoding (sections `HPET`, `RTC0`) and
    /// back, as in-process live migration moves them.
    pub fn round_trip(&self) -> Result<Self, String> {
        let (mut h, mut r) = (Writer::default(), Writer::default());
        self.hpet.encode(&mut h);
        self.rtc.encode(&mut r);
        let mut hr = Reader::new(&h.buf, "HPET");
        let hpet = Hpet::decode(&mut hr)?;
        hr.finish()?;
        let mut rr = Reader::new(&r.buf, "RTC0");
        let rtc = Rtc::decode(&mut rr)?;
        rr.finish()?;
        Ok(Self { hpet, rtc })
    }

    /// Moves both devices from VM time `from` (the save's) to `to` (the restoring
    /// VM's now), as the fabric's import re-arms its timers: the guest sees no time
    /// pass on them across a save and restore.
    pub fn rebase(&mut self, from: u64, to: u64) {
        self.hpet.rebase(from, to);
        self.rtc.rebase(from, to);
    }

    fn next_deadline(&self, now: u64) -> Option<u64> {
        match (self.hpet.next_deadline(), self.rtc.next_deadline(now)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The devices of one VM and their wake-up thread's state.
pub struct Clocks {
    dev: Mutex<ClockDevices>,
    cv: Condvar,
    stop: AtomicBool,
    clock: VmClock,
    irq: IrqSink,
}

impl Clocks {
    /// The devices `dev` on VM time `clock`, raising interrupts through `irq`.
    pub fn new(dev: ClockDevices, clock: VmClock, irq: IrqSink) -> Self {
        Self {
            dev: Mutex::new(dev),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            clock,
            irq,
        }
    }

    fn apply_hpet(&self, lines: &[Line]) {
        for l in lines {
            match *l {
                Line::Set(pin, level) => (self.irq)(pin, level),
                Line::Pulse(pin) => {
                    (self.irq)(pin, true);
                    (self.irq)(pin, false);
                }
            }
        }
    }

    /// RTC line changes reach IRQ 8 unless the HPET's legacy replacement owns it.
    fn apply_rtc(&self, d: &ClockDevices, level: Option<bool>) {
        if let (Some(l), false) = (level, d.hpet.legacy()) {
            (self.irq)(rtc::PIN, l);
        }
    }

    /// Serves an MMIO read if it falls in the HPET's block; `false` if not ours.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some(off) = addr.checked_sub(hpet::BASE).filter(|o| *o < hpet::SIZE) else {
            return false;
        };
        let mut d = lock(&self.dev);
        let lines = d.hpet.read(off, data, self.clock.now_ns());
        self.apply_hpet(&lines);
        drop(d);
        if !lines.is_empty() {
            self.cv.notify_all();
        }
        true
    }

    /// Serves an MMIO write if it falls in the HPET's block; `false` if not ours.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        let Some(off) = addr.checked_sub(hpet::BASE).filter(|o| *o < hpet::SIZE) else {
            return false;
        };
        let mut d = lock(&self.dev);
        let lines = d.hpet.write(off, data, self.clock.now_ns());
        self.apply_hpet(&lines);
        drop(d);
        self.cv.notify_all();
        true
    }

    /// Serves a port read of 0x70/0x71; `false` if not ours.
    pub fn port_in(&self, port: u16, data: &mut [u8]) -> bool {
        if port != rtc::PORT_INDEX && port != rtc::PORT_DATA {
            return false;
        }
        let mut d = lock(&self.dev);
        let (v, level) = d.rtc.port_in(port, self.clock.now_ns());
        self.apply_rtc(&d, level);
        drop(d);
        if level.is_some() {
            // Status C read: IRQ 8 is low again, the next flag can raise it.
            self.cv.notify_all();
        }
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
        true
    }

    /// Serves a port write of 0x70/0x71 (byte 0 of wider writes); `false` if not ours.
    pub fn port_out(&self, port: u16, data: &[u8]) -> bool {
        if port != rtc::PORT_INDEX && port != rtc::PORT_DATA {
            return false;
        }
        let v = data.first().copied().unwrap_or(0);
        let mut d = lock(&self.dev);
        let level = d.rtc.port_out(port, v, self.clock.now_ns());
        self.apply_rtc(&d, level);
        drop(d);
        self.cv.notify_all();
        true
    }

    /// Holds both devices still (no expiry is handled, no line moves) while a
    /// migration or a save exports the interrupt fabric; the state is read and
    /// replaced through the guard.
    pub fn hold(&self) -> MutexGuard<'_, ClockDevices> {
        lock(&self.dev)
    }

    /// Wakes the thread to recompute its deadline (after [`Clocks::hold`] replaced
    /// the state).
    pub fn poke(&self) {
        self.cv.notify_all();
    }

    /// Whether the guest last wrote port 0x70 with the NMI-mask bit set.
    pub fn nmi_masked(&self) -> bool {
        lock(&self.dev).rtc.nmi_masked()
    }

    /// HPET expiries that coalesced into an earlier interrupt.
    pub fn hpet_missed(&self) -> u64 {
        lock(&self.dev).hpet.missed()
    }

    /// Ends [`Clocks::run`].
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let _g = lock(&self.dev);
        self.cv.notify_all();
    }

    /// The wake-up loop (run it on its own thread until [`Clocks::stop`]).
    pub fn run(&self) {
        // SAFETY: PR_SET_TIMERSLACK takes an integer argument and only affects the
        // calling thread; a failure leaves the default (50 µs) slack.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
        let mut d = lock(&self.dev);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let now = self.clock.now_ns();
            let lines = d.hpet.tick(now);
            self.apply_hpet(&lines);
            let level = d.rtc.tick(now);
            self.apply_rtc(&d, level);
            let wait = d
                .next_deadline(now)
                .map_or(Duration::from_millis(100), |t| {
                    Duration::from_nanos(t.saturating_sub(now)).min(Duration::from_millis(100))
                });
            if wait.is_zero() {
                continue;
            }
            d = match self.cv.wait_timeout(d, wait) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }
}
