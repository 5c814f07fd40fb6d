//! The HPET (IA-PC HPET specification 1.0a) as pure register and timer logic on
//! VM time supplied by the caller: MMIO reads and writes, expiries, IRQ line changes.
//!
//! Model: a 64-bit main counter at [`PERIOD_FS`] (10 ns, as QEMU's), [`TIMERS`]
//! comparators, each periodic- and 64-bit-capable, legacy-replacement capable
//! (timer 0 → IOAPIC pin 2, timer 1 → pin 8), routable to the pins in
//! [`ROUTE_CAP`]; no FSB (MSI) delivery. The counter is derived from VM time while
//! enabled, so nothing ticks on the host: work happens only at a register access (which
//! first handles the expiries due by then, so reads never show a stale comparator) or
//! at an expiry. Catch-up when expiries are handled late (the host was busy, the VM
//! was paused for migration): one interrupt, however many periods were missed (an
//! edge-triggered line cannot carry more), and a periodic comparator moves to the
//! first point of its grid (`start + k × period`) after the counter, so the phase
//! never drifts. Minimum spacing: periodic expiries are delivered at least
//! [`MIN_PERIOD_NS`] apart (the comparator itself stays architectural), so a guest
//! programming a 10 ns period costs the host at most 10 000 interrupts a second.
//! An edge-triggered timer with interrupts disabled is not armed (a match would have
//! no visible effect but for a periodic comparator's advance, which then waits
//! until the timer is enabled again).

use crate::wire::{Reader, Writer};

/// Number of comparators.
pub const TIMERS: usize = 3;
/// The MMIO base address the platform puts the HPET at.
pub const BASE: u64 = 0xFED0_0000;
/// Size of the register block.
pub const SIZE: u64 = 0x400;
/// Main counter tick in femtoseconds (GCAP_ID bits 63:32): 10 ns, a 100 MHz counter.
pub const PERIOD_FS: u32 = 10_000_000;
/// Main counter tick in nanoseconds.
pub const TICK_NS: u64 = 10;
/// IOAPIC pins a timer may be routed to (INT_ROUTE_CAP): pin 2 and pins 16–23,
/// as QEMU's PC (pin 8 is the RTC's and left out).
pub const ROUTE_CAP: u32 = 0x00FF_0004;
/// Shortest spacing of delivered periodic interrupts (VM ns).
pub const MIN_PERIOD_NS: u64 = 100_000;
/// IOAPIC pin of timer 0 with legacy replacement (IRQ0 through the usual ISO).
pub const LEGACY_PIN_T0: u32 = 2;
/// IOAPIC pin of timer 1 with legacy replacement (IRQ8).
pub const LEGACY_PIN_T1: u32 = 8;

const GEN_ENABLE: u64 = 1;
const GEN_LEGACY: u64 = 2;
const TN_LEVEL: u64 = 1 << 1;
const TN_ENABLE: u64 = 1 << 2;
const TN_PERIODIC: u64 = 1 << 3;
const TN_PER_CAP: u64 = 1 << 4;
const TN_SIZE_CAP: u64 = 1 << 5;
const TN_VAL_SET: u64 = 1 << 6;
const TN_32BIT: u64 = 1 << 8;
const TN_ROUTE_SHIFT: u32 = 9;
const TN_ROUTE_MASK: u64 = 0x1F << TN_ROUTE_SHIFT;
/// Timer configuration bits a guest can write.
const TN_WRITABLE: u64 = TN_LEVEL | TN_ENABLE | TN_PERIODIC | TN_VAL_SET | TN_32BIT | TN_ROUTE_MASK;

/// One comparator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HpetTimer {
    /// Tn_CONF (writable bits only).
    pub config: u64,
    /// The comparator (the accumulator in periodic mode).
    pub comparator: u64,
    /// The period last written in periodic mode.
    pub period: u64,
    /// VM ns at which the next expiry is due (`None`: none armed).
    pub due_ns: Option<u64>,
    /// VM ns of the last delivered periodic interrupt (minimum spacing).
    pub last_fire_ns: u64,
}

/// The whole device state (what a save file holds).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HpetState {
    /// GEN_CONF (ENABLE, LEG_RT).
    pub config: u64,
    /// GINTR_STA (level-triggered status bits).
    pub isr: u64,
    /// The main counter at `anchor_ns` (while enabled), or its frozen value.
    pub counter: u64,
    /// VM ns at which the counter had the value `counter` (meaningful while enabled).
    pub anchor_ns: u64,
    /// IOAPIC pins this device holds asserted (level-triggered timers), bit per pin.
    pub asserted: u32,
    /// The comparators.
    pub timers: [HpetTimer; TIMERS],
    /// Expiries that coalesced into an earlier interrupt (diagnostic, carried).
    pub missed: u64,
}

/// An IOAPIC input change the caller must apply, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line {
    /// Drive the pin to this level (level-triggered timers).
    Set(u32, bool),
    /// A rising and a falling edge (edge-triggered timers).
    Pulse(u32),
}

/// The HPET.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hpet {
    s: HpetState,
}

fn width_mask(t: &HpetTimer) -> u64 {
    if t.config & TN_32BIT != 0 {
        0xFFFF_FFFF
    } else {
        u64::MAX
    }
}

/// Merges a 4- or 8-byte write at byte `off` (0 or 4) of a 64-bit register.
fn merge(old: u64, off: u64, size: usize, value: u64) -> u64 {
    match (size, off) {
        (8, 0) => value,
        (4, 0) => (old & !0xFFFF_FFFF) | (value & 0xFFFF_FFFF),
        (4, 4) => (old & 0xFFFF_FFFF) | (value << 32),
        _ => old,
    }
}

impl Hpet {
    /// A device at reset: counter 0 and halted, every timer disabled.
    pub fn new() -> Self {
        Self::default()
    }

    /// The device continuing saved state (see [`Hpet::state`]).
    pub fn from_state(s: HpetState) -> Self {
        Self { s }
    }

    /// The state to save.
    pub fn state(&self) -> HpetState {
        self.s.clone()
    }

    fn enabled(&self) -> bool {
        self.s.config & GEN_ENABLE != 0
    }

    /// The main counter at VM time `now`.
    pub fn counter(&self, now: u64) -> u64 {
        if self.enabled() {
            let ticks = now.saturating_sub(self.s.anchor_ns) / TICK_NS;
            self.s.counter.wrapping_add(ticks)
        } else {
            self.s.counter
        }
    }

    /// VM ns at which the counter reaches `counter + ticks` (counting from `now`).
    fn ns_after(&self, now: u64, ticks: u64) -> u64 {
        // The counter ticks at anchor + k × TICK_NS; the tick `ticks` ahead of the
        // current one.
        let since = now.saturating_sub(self.s.anchor_ns);
        let cur_tick_ns = self.s.anchor_ns.saturating_add(since / TICK_NS * TICK_NS);
        cur_tick_ns.saturating_add(ticks.saturating_mul(TICK_NS))
    }

    /// IOAPIC pin of timer `n`, if it may deliver there.
    fn pin(&self, n: usize) -> Option<u32> {
        let t = self.s.timers.get(n)?;
        if self.s.config & GEN_LEGACY != 0 {
            match n {
                0 => return Some(LEGACY_PIN_T0),
                1 => return Some(LEGACY_PIN_T1),
                _ => {}
            }
        }
        let route = ((t.config & TN_ROUTE_MASK) >> TN_ROUTE_SHIFT) as u32;
        (ROUTE_CAP & (1 << route) != 0).then_some(route)
    }

    /// Whether legacy replacement is on (the RTC's own IRQ 8 is then disconnected).
    pub fn legacy(&self) -> bool {
        self.s.config & GEN_LEGACY != 0
    }

    /// Expiries that coalesced into an earlier interrupt so far.
    pub fn missed(&self) -> u64 {
        self.s.missed
    }

    /// Recomputes timer `n`'s due time from its comparator and the counter now.
    fn rearm(&mut self, n: usize, now: u64) {
        let enabled = self.enabled();
        let cur = self.counter(now);
        let at = self.s.timers.get(n).map(|t| {
            let m = width_mask(t);
            let ticks = t.comparator.wrapping_sub(cur) & m;
            let observable = t.config & (TN_ENABLE | TN_LEVEL) != 0;
            let periodic = t.config & TN_PERIODIC != 0;
            (ticks, periodic, t.period & m, t.last_fire_ns, observable)
        });
        let due = match at {
            Some((ticks, periodic, period, last, true)) if enabled => {
                let mut due = self.ns_after(now, ticks);
                if periodic && period != 0 {
                    due = due.max(last.saturating_add(MIN_PERIOD_NS));
                }
                Some(due)
            }
            _ => None,
        };
        if let Some(t) = self.s.timers.get_mut(n) {
            t.due_ns = due;
        }
    }

    fn rearm_all(&mut self, now: u64) {
        for n in 0..TIMERS {
            self.rearm(n, now);
        }
    }

    /// The earliest VM time at which [`Hpet::tick`] has work, if any.
    pub fn next_deadline(&self) -> Option<u64> {
        self.s.timers.iter().filter_map(|t| t.due_ns).min()
    }

    /// The level the pins of level-triggered timers should have now; returns the
    /// changes against what is asserted.
    fn levels(&mut self, out: &mut Vec<Line>) {
        let mut want = 0u32;
        if self.enabled() {
            for n in 0..TIMERS {
                let Some(t) = self.s.timers.get(n) else {
                    continue;
                };
                let active = t.config & TN_LEVEL != 0
                    && t.config & TN_ENABLE != 0
                    && self.s.isr & (1 << n) != 0;
                if let (true, Some(pin)) = (active, self.pin(n)) {
                    want |= 1 << pin;
                }
            }
        }
        let change = want ^ self.s.asserted;
        for pin in 0..32 {
            if change & (1 << pin) != 0 {
                out.push(Line::Set(pin, want & (1 << pin) != 0));
            }
        }
        self.s.asserted = want;
    }

    /// Handles every expiry due at VM time `now`; returns the line changes.
    pub fn tick(&mut self, now: u64) -> Vec<Line> {
        let mut out = Vec::new();
        if !self.enabled() {
            for t in &mut self.s.timers {
                t.due_ns = None;
            }
            return out;
        }
        let cur = self.counter(now);
        for n in 0..TIMERS {
            let pin = self.pin(n);
            let Some(t) = self.s.timers.get_mut(n) else {
                continue;
            };
            if t.due_ns.is_none_or(|d| d > now) {
                continue;
            }
            let m = width_mask(t);
            let period = t.period & m;
            if t.config & TN_PERIODIC != 0 && period != 0 {
                // Next grid point strictly after the counter: comparator + k × period.
                let behind = cur.wrapping_sub(t.comparator) & m;
                let k = (behind / period).saturating_add(1);
                t.comparator = t.comparator.wrapping_add(k.wrapping_mul(period)) & m;
                self.s.missed = self.s.missed.saturating_add(k - 1);
                t.last_fire_ns = now;
            }
            let level = t.config & TN_LEVEL != 0;
            let enabled = t.config & TN_ENABLE != 0;
            if level {
                // Level mode: the status bit is set even with interrupts disabled
                // (spec §2.3.9.2.1, Tn_INT_ENB_CNF).
                self.s.isr |= 1 << n;
            } else if let (true, Some(pin)) = (enabled, pin) {
                out.push(Line::Pulse(pin));
            }
            self.rearm_after_fire(n, now);
        }
        self.levels(&mut out);
        out
    }

    /// After an expiry: periodic timers re-arm on their grid; a one-shot timer
    /// next matches when the counter wraps (2^32 or 2^64 ticks later).
    fn rearm_after_fire(&mut self, n: usize, now: u64) {
        let cur = self.counter(now);
        let Some(t) = self.s.timers.get(n) else {
            return;
        };
        let m = width_mask(t);
        let ticks = match t.comparator.wrapping_sub(cur) & m {
            0 => m, // exactly now: the next match is a full wrap away
            x => x,
        };
        let mut due = self.ns_after(now, ticks);
        if t.config & TN_PERIODIC != 0 && t.period & m != 0 {
            due = due.max(t.last_fire_ns.saturating_add(MIN_PERIOD_NS));
        }
        if let Some(t) = self.s.timers.get_mut(n) {
            t.due_ns = Some(due);
        }
    }

    /// A guest read of `data.len()` bytes at `offset` in the register block:
    /// 4-byte accesses at 4-byte alignment and 8-byte ones at 8; anything else
    /// (and unknown registers) reads 0. Expiries due by `now` are handled first (a
    /// periodic comparator reads as already advanced, a level status bit as set, as
    /// on hardware, however late the caller's own expiry handling runs); returns the
    /// line changes they cause.
    pub fn read(&mut self, offset: u64, data: &mut [u8], now: u64) -> Vec<Line> {
        let out = self.tick(now);
        data.fill(0);
        let size = data.len();
        if !matches!(size, 4 | 8) || offset % size as u64 != 0 {
            return out;
        }
        let reg = offset & !7;
        let v = self.reg64(reg, now);
        let v = if offset & 4 != 0 { v >> 32 } else { v };
        let bytes = v.to_le_bytes();
        for (d, s) in data.iter_mut().zip(bytes) {
            *d = s;
        }
        out
    }

    fn reg64(&self, reg: u64, now: u64) -> u64 {
        match reg {
            0x000 => {
                u64::from(PERIOD_FS) << 32
                    | 0x8086 << 16
                    | 1 << 15 // LEG_RT_CAP
                    | 1 << 13 // COUNT_SIZE_CAP: 64-bit counter
                    | ((TIMERS as u64 - 1) << 8)
                    | 1 // REV_ID
            }
            0x010 => self.s.config,
            0x020 => self.s.isr,
            0x0F0 => self.counter(now),
            r if (0x100..0x100 + 0x20 * TIMERS as u64).contains(&r) => {
                let n = ((r - 0x100) / 0x20) as usize;
                let Some(t) = self.s.timers.get(n) else {
                    return 0;
                };
                match (r - 0x100) % 0x20 {
                    0x00 => {
                        u64::from(ROUTE_CAP) << 32
                            | (t.config & !TN_VAL_SET)
                            | TN_PER_CAP
                            | TN_SIZE_CAP
                    }
                    0x08 => t.comparator & width_mask(t),
                    _ => 0, // FSB route: no FSB delivery
                }
            }
            _ => 0,
        }
    }

    /// A guest write (same access rules as [`Hpet::read`]; others are ignored),
    /// after the expiries due by `now`; returns the line changes both cause.
    pub fn write(&mut self, offset: u64, data: &[u8], now: u64) -> Vec<Line> {
        let mut out = self.tick(now);
        let size = data.len();
        if !matches!(size, 4 | 8) || offset % size as u64 != 0 {
            return out;
        }
        let mut b = [0u8; 8];
        for (d, s) in b.iter_mut().zip(data) {
            *d = *s;
        }
        let value = u64::from_le_bytes(b);
        let reg = offset & !7;
        let off = offset & 4;
        match reg {
            0x010 => {
                let old = self.s.config;
                let new = merge(old, off, size, value) & (GEN_ENABLE | GEN_LEGACY);
                if old & GEN_ENABLE != 0 && new & GEN_ENABLE == 0 {
                    self.s.counter = self.counter(now); // halts
                }
                if old & GEN_ENABLE == 0 && new & GEN_ENABLE != 0 {
                    self.s.anchor_ns = now; // starts counting from its value
                }
                self.s.config = new;
                self.rearm_all(now);
            }
            0x020 => {
                // Write 1 to clear (level-triggered status bits).
                let clear = merge(0, off, size, value);
                self.s.isr &= !clear;
            }
            // Writable while halted; ignored while counting (spec §2.3.7: software
            // must halt the counter first), as QEMU.
            0x0F0 if !self.enabled() => {
                self.s.counter = merge(self.s.counter, off, size, value);
            }
            r if (0x100..0x100 + 0x20 * TIMERS as u64).contains(&r) => {
                let n = ((r - 0x100) / 0x20) as usize;
                match (r - 0x100) % 0x20 {
                    0x00 => self.write_config(n, off, size, value, now),
                    0x08 => self.write_comparator(n, off, size, value, now),
                    _ => {} // FSB route: no FSB delivery
                }
            }
            _ => {} // read-only or reserved
        }
        self.levels(&mut out);
        out
    }

    fn write_config(&mut self, n: usize, off: u64, size: usize, value: u64, now: u64) {
        let Some(t) = self.s.timers.get_mut(n) else {
            return;
        };
        let new = merge(t.config, off, size, value) & TN_WRITABLE;
        if new & TN_32BIT != 0 {
            // Entering 32-bit mode truncates the comparator and period.
            t.comparator &= 0xFFFF_FFFF;
            t.period &= 0xFFFF_FFFF;
        }
        if new & TN_LEVEL == 0 {
            // Edge mode: the status bit has no meaning; clear it.
            self.s.isr &= !(1 << n);
        }
        t.config = new;
        self.rearm(n, now);
    }

    fn write_comparator(&mut self, n: usize, off: u64, size: usize, value: u64, now: u64) {
        let Some(t) = self.s.timers.get_mut(n) else {
            return;
        };
        let m = width_mask(t);
        if m == 0xFFFF_FFFF && off == 4 {
            return; // the upper half of a 32-bit comparator is read-only 0
        }
        let periodic = t.config & TN_PERIODIC != 0;
        // One-shot, or periodic with VAL_SET: the comparator itself; periodic: the
        // increment is "the last value written" (spec §2.3.9.2.2).
        if !periodic || t.config & TN_VAL_SET != 0 {
            t.comparator = merge(t.comparator, off, size, value) & m;
        }
        if periodic {
            t.period = merge(t.period, off, size, value) & m;
        }
        t.config &= !TN_VAL_SET;
        t.last_fire_ns = 0;
        self.rearm(n, now);
    }

    /// Moves the device from VM time `from` to VM time `to` as if no time passed in
    /// between (a restore into a process whose VM time differs): the counter keeps
    /// its value, armed expiries stay as far ahead.
    pub fn rebase(&mut self, from: u64, to: u64) {
        let shift = |t: u64| {
            let v = i128::from(t) + i128::from(to) - i128::from(from);
            u64::try_from(v.max(0)).unwrap_or(u64::MAX)
        };
        if self.enabled() {
            self.s.counter = self.counter(from);
            self.s.anchor_ns = to;
        }
        for t in &mut self.s.timers {
            t.due_ns = t.due_ns.map(shift);
            t.last_fire_ns = shift(t.last_fire_ns);
        }
    }

    /// Encodes the state (save-file section `HPET`).
    pub fn encode(&self, w: &mut Writer) {
        let s = &self.s;
        for v in [s.config, s.isr, s.counter, s.anchor_ns, s.missed] {
            w.u64(v);
        }
        w.u32(s.asserted);
        w.u8(TIMERS as u8);
        for t in &s.timers {
            for v in [t.config, t.comparator, t.period, t.last_fire_ns] {
                w.u64(v);
            }
            w.u8(u8::from(t.due_ns.is_some()));
            w.u64(t.due_ns.unwrap_or(0));
        }
    }

    /// Decodes what [`Hpet::encode`] wrote, checking every field a guest cannot set.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, String> {
        let mut s = HpetState {
            config: r.u64()?,
            isr: r.u64()?,
            counter: r.u64()?,
            anchor_ns: r.u64()?,
            missed: r.u64()?,
            asserted: r.u32()?,
            ..HpetState::default()
        };
        if s.config & !(GEN_ENABLE | GEN_LEGACY) != 0 {
            return Err(r.err(format!(
                "HPET configuration {:#x} has unknown bits",
                s.config
            )));
        }
        if s.isr >> TIMERS != 0 {
            return Err(r.err(format!("HPET status {:#x} names absent timers", s.isr)));
        }
        let n = r.u8()?;
        if usize::from(n) != TIMERS {
            return Err(r.err(format!("{n} HPET timers (this build has {TIMERS})")));
        }
        for (i, t) in s.timers.iter_mut().enumerate() {
            t.config = r.u64()?;
            t.comparator = r.u64()?;
            t.period = r.u64()?;
            t.last_fire_ns = r.u64()?;
            let armed = r.u8()?;
            let due = r.u64()?;
            t.due_ns = match armed {
                0 => None,
                1 => Some(due),
                x => return Err(r.err(format!("HPET timer {i}: armed flag {x}"))),
            };
            if t.config & !TN_WRITABLE != 0 {
                return Err(r.err(format!("HPET timer {i}: configuration {:#x}", t.config)));
            }
            if t.config & TN_32BIT != 0 && (t.comparator | t.period) >> 32 != 0 {
                return Err(r.err(format!("HPET timer {i}: 32-bit mode with a 64-bit value")));
            }
        }
        Ok(Self { s })
    }
}
