//! The CMOS RTC (Motorola MC146818A) at ports 0x70/0x71 as pure register logic on
//! VM time supplied by the caller: time/date, status A–D, CMOS RAM, IRQ 8 level.
//!
//! Model: the clock is "seconds since the Unix epoch shown at `anchor_ns`", where
//! `anchor_ns` is a VM time on the divider's phase (updates at `anchor_ns + k s`);
//! the time registers are derived from it while the clock runs and are plain bytes
//! while SET is on. Flags (PF, AF, UF) are brought up to date at each access and at
//! the deadlines [`Rtc::next_deadline`] gives, so nothing ticks on the host while no
//! interrupt is enabled. IRQ 8 follows IRQF (the chip's IRQ output stays asserted
//! until status C is read, so a guest that never reads C gets one interrupt).
//! Not modelled: daylight-saving adjustment (DSE is kept, no effect; QEMU ignores it
//! too), the square-wave output (SQWE kept), time bases other than 32.768 kHz
//! (divider values other than 010 stop the clock, as a divider reset would).

use crate::wire::{Reader, Writer};

/// Index port (bit 7: NMI mask).
pub const PORT_INDEX: u16 = 0x70;
/// Data port.
pub const PORT_DATA: u16 = 0x71;
/// IOAPIC pin of IRQ 8.
pub const PIN: u32 = 8;

const NS: u64 = 1_000_000_000;
/// Update-in-progress lead: 8 periods of the 32.768 kHz clock (244.14 µs).
pub const UIP_NS: u64 = 244_141;
const REG_A: usize = 0x0A;
const REG_B: usize = 0x0B;
const REG_C: usize = 0x0C;
const REG_D: usize = 0x0D;
/// Century byte, where QEMU and ACPI's FADT default put it.
pub const CENTURY: usize = 0x32;
const A_UIP: u8 = 0x80;
const A_DV_NORMAL: u8 = 0x20;
const B_SET: u8 = 0x80;
const B_UIE: u8 = 0x10;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;

/// The whole device state (what a save file holds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RtcState {
    /// Registers and CMOS RAM, 128 bytes (time registers hold the SET-mode values).
    pub ram: [u8; 128],
    /// The index register (bit 7: NMI mask).
    pub index: u8,
    /// Seconds since the Unix epoch the clock shows at `anchor_ns`.
    pub secs: i64,
    /// VM ns of an update (the divider phase).
    pub anchor_ns: u64,
    /// VM ns up to which PF/AF/UF are up to date.
    pub checked_ns: u64,
    /// IRQ 8 as this device drives it (IRQF).
    pub line: bool,
}

/// The RTC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rtc {
    s: RtcState,
}

fn bcd(v: u8) -> u8 {
    (v / 10) << 4 | (v % 10)
}

fn unbcd(v: u8) -> u8 {
    (v >> 4).saturating_mul(10).saturating_add(v & 0xF)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (month 1–12, day 1–31).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month 1–12, day 1–31) of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl Rtc {
    /// A chip showing `unix_secs` (the host clock, read once at boot) at VM time
    /// `now`, with the power-on status registers (A = 0x26: 32.768 kHz, 1024 Hz
    /// rate; B = 0x02: 24-hour BCD; D = VRT) and the memory-size bytes a PC BIOS
    /// leaves for `ram` bytes of RAM.
    pub fn new(unix_secs: i64, now: u64, ram: u64) -> Self {
        let mut s = RtcState {
            ram: [0; 128],
            index: 0,
            secs: unix_secs,
            anchor_ns: now,
            checked_ns: now,
            line: false,
        };
        s.ram[REG_A] = 0x26;
        s.ram[REG_B] = B_24H;
        s.ram[REG_D] = 0x80;
        let kib = ram / 1024;
        // Base memory 640 KiB (0x15/0x16); extended memory above 1 MiB in KiB, at
        // most 0xFFFF (0x17/0x18, and 0x30/0x31); memory above 16 MiB below 4 GiB in
        // 64 KiB units (0x34/0x35); memory above 4 GiB in 64 KiB units (0x5B–0x5D).
        s.ram[0x15..0x17].copy_from_slice(&640u16.to_le_bytes());
        let ext = kib.saturating_sub(1024).min(0xFFFF) as u16;
        s.ram[0x17..0x19].copy_from_slice(&ext.to_le_bytes());
        s.ram[0x30..0x32].copy_from_slice(&ext.to_le_bytes());
        let low = ram.min(0xE000_0000);
        let above16 = (low.saturating_sub(16 << 20) >> 16).min(0xFFFF) as u16;
        s.ram[0x34..0x36].copy_from_slice(&above16.to_le_bytes());
        let high = (ram.saturating_sub(0xE000_0000) >> 16).min(0xFF_FFFF) as u32;
        s.ram[0x5B..0x5E].copy_from_slice(&high.to_le_bytes()[..3]);
        let mut r = Self { s };
        r.s.ram[CENTURY] = r.enc(((r.date().0 / 100).rem_euclid(100)) as u8);
        r
    }

    /// The device continuing saved state.
    pub fn from_state(s: RtcState) -> Self {
        Self { s }
    }

    /// The state to save.
    pub fn state(&self) -> RtcState {
        self.s.clone()
    }

    /// Whether the guest set the NMI-mask bit (port 0x70 bit 7) last.
    pub fn nmi_masked(&self) -> bool {
        self.s.index & 0x80 != 0
    }

    /// The IRQ 8 level this device drives.
    pub fn line(&self) -> bool {
        self.s.line
    }

    fn running(&self) -> bool {
        self.s.ram[REG_A] & 0x70 == A_DV_NORMAL && self.s.ram[REG_B] & B_SET == 0
    }

    /// SET mode: the time registers are plain bytes the guest writes.
    fn set(&self) -> bool {
        self.s.ram[REG_B] & B_SET != 0
    }

    fn divider_on(&self) -> bool {
        self.s.ram[REG_A] & 0x70 == A_DV_NORMAL
    }

    fn binary(&self) -> bool {
        self.s.ram[REG_B] & B_BINARY != 0
    }

    fn enc(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            bcd(v)
        }
    }

    fn dec(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            unbcd(v)
        }
    }

    /// Whole updates since the anchor at VM time `t`.
    fn updates_at(&self, t: u64) -> u64 {
        t.saturating_sub(self.s.anchor_ns) / NS
    }

    /// The seconds the clock shows at VM time `now`.
    pub fn secs(&self, now: u64) -> i64 {
        if self.running() {
            self.s
                .secs
                .saturating_add(i64::try_from(self.updates_at(now)).unwrap_or(i64::MAX))
        } else {
            self.s.secs
        }
    }

    fn date(&self) -> (i64, u32, u32) {
        civil_from_days(self.s.secs.div_euclid(86_400))
    }

    /// Time registers 0x00, 0x02, 0x04, 0x06–0x09 and the century for `secs`.
    fn encode_time(&self, secs: i64) -> [u8; 10] {
        let day = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400);
        let (y, m, d) = civil_from_days(day);
        let (h, mi, s) = ((sod / 3600) as u8, (sod / 60 % 60) as u8, (sod % 60) as u8);
        let hour = if self.s.ram[REG_B] & B_24H != 0 {
            self.enc(h)
        } else {
            let h12 = match h % 12 {
                0 => 12,
                x => x,
            };
            self.enc(h12) | if h >= 12 { 0x80 } else { 0 }
        };
        let dow = (day + 4).rem_euclid(7) as u8 + 1; // 1970-01-01 was a Thursday; Sunday = 1
        let mut r = [0u8; 10];
        r[0] = self.enc(s);
        r[2] = self.enc(mi);
        r[4] = hour;
        r[6] = self.enc(dow);
        r[7] = self.enc(d as u8);
        r[8] = self.enc(m as u8);
        r[9] = self.enc(y.rem_euclid(100) as u8);
        r[1] = self.enc((y.div_euclid(100)).rem_euclid(100) as u8); // century, see below
        r
    }

    /// The time the registers in CMOS RAM name (tolerant: out-of-range fields are
    /// clamped, never an error).
    fn decode_time(&self) -> i64 {
        let r = &self.s.ram;
        let s = i64::from(self.dec(r[0]).min(59));
        let mi = i64::from(self.dec(r[2]).min(59));
        let h = if self.s.ram[REG_B] & B_24H != 0 {
            self.dec(r[4]).min(23)
        } else {
            let h12 = self.dec(r[4] & 0x7F).clamp(1, 12) % 12;
            h12 + if r[4] & 0x80 != 0 { 12 } else { 0 }
        };
        let d = u32::from(self.dec(r[7]).clamp(1, 31));
        let m = u32::from(self.dec(r[8]).clamp(1, 12));
        let y = i64::from(self.dec(r[CENTURY]).min(99)) * 100 + i64::from(self.dec(r[9]).min(99));
        days_from_civil(y, m, d) * 86_400 + i64::from(h) * 3600 + mi * 60 + s
    }

    fn alarm_matches(&self, secs: i64) -> bool {
        let t = self.encode_time(secs);
        [(1, 0), (3, 2), (5, 4)]
            .iter()
            .all(|&(a, v)| self.s.ram[a] >= 0xC0 || self.s.ram[a] == t[v])
    }

    /// Periodic-interrupt period in VM ns from status A's rate bits (none for 0).
    fn period_ns(&self) -> Option<u64> {
        let rs = u32::from(self.s.ram[REG_A] & 0x0F);
        let shift = match rs {
            0 => return None,
            1 | 2 => rs + 7, // 256 Hz and 128 Hz at the 32.768 kHz time base
            x => x - 1,
        };
        Some(((1u64 << shift) * NS) / 32_768)
    }

    fn periods_at(&self, t: u64, p: u64) -> u64 {
        t.saturating_sub(self.s.anchor_ns) / p
    }

    /// Brings PF/AF/UF up to VM time `now`.
    fn sync(&mut self, now: u64) {
        let from = self.s.checked_ns;
        if now <= from {
            return;
        }
        if self.running() {
            let n = self.updates_at(now).saturating_sub(self.updates_at(from));
            if n > 0 {
                self.s.ram[REG_C] |= C_UF;
                // A daily alarm pattern that matched at all matched in the last day.
                let last = self.secs(now);
                let k = i64::try_from(n.min(86_400)).unwrap_or(86_400);
                if (0..k).any(|i| self.alarm_matches(last.saturating_sub(i))) {
                    self.s.ram[REG_C] |= C_AF;
                }
            }
        }
        if let (true, Some(p)) = (self.divider_on(), self.period_ns()) {
            if self.periods_at(now, p) > self.periods_at(from, p) {
                self.s.ram[REG_C] |= C_PF;
            }
        }
        self.s.checked_ns = now;
    }

    /// Recomputes IRQF and the line; returns the new level if it changed.
    fn irq(&mut self) -> Option<bool> {
        let c = self.s.ram[REG_C];
        let on = c & self.s.ram[REG_B] & (C_PF | C_AF | C_UF) != 0;
        self.s.ram[REG_C] = if on { c | C_IRQF } else { c & !C_IRQF };
        (on != self.s.line).then(|| {
            self.s.line = on;
            on
        })
    }

    /// Brings the flags up to `now`; returns the new IRQ 8 level if it changed.
    pub fn tick(&mut self, now: u64) -> Option<bool> {
        self.sync(now);
        self.irq()
    }

    /// The earliest VM time at which an enabled flag could raise IRQ 8 (none while it
    /// is already raised: nothing more can happen until status C is read).
    pub fn next_deadline(&self, now: u64) -> Option<u64> {
        if self.s.line {
            return None;
        }
        let b = self.s.ram[REG_B];
        let mut best: Option<u64> = None;
        let mut take = |t: u64| best = Some(best.map_or(t, |b: u64| b.min(t)));
        if let (true, true, Some(p)) = (b & C_PF != 0, self.divider_on(), self.period_ns()) {
            let k = self.periods_at(now, p) + 1;
            take(self.s.anchor_ns.saturating_add(k.saturating_mul(p)));
        }
        if self.running() {
            let next = |k: u64| self.s.anchor_ns.saturating_add(k.saturating_mul(NS));
            let k = self.updates_at(now) + 1;
            // The alarm is checked at each update while AIE is on (one wake-up a
            // second at most, only while IRQ 8 is low).
            if b & (C_UF | C_AF) != 0 {
                take(next(k));
            }
        }
        best
    }

    /// Re-anchors the clock at the last update before `now` showing `secs` (the
    /// divider phase is kept).
    fn set_time(&mut self, secs: i64, now: u64) {
        let k = self.updates_at(now);
        self.s.anchor_ns = self.s.anchor_ns.saturating_add(k.saturating_mul(NS));
        self.s.secs = secs;
    }

    /// A guest IN from port 0x70 or 0x71 (one byte; wider accesses get it in byte 0).
    pub fn port_in(&mut self, port: u16, now: u64) -> (u8, Option<bool>) {
        if port != PORT_DATA {
            return (0xFF, None); // the index register is write-only (QEMU reads 0xFF)
        }
        self.sync(now);
        let i = usize::from(self.s.index & 0x7F);
        let v = match i {
            0 | 2 | 4 | 6..=9 if !self.set() => self.encode_time(self.secs(now))[i],
            CENTURY if !self.set() => self.encode_time(self.secs(now))[1],
            REG_A => {
                let in_update =
                    self.running() && now.saturating_sub(self.s.anchor_ns) % NS >= NS - UIP_NS;
                (self.s.ram[REG_A] & !A_UIP) | if in_update { A_UIP } else { 0 }
            }
            REG_C => {
                // Read to clear: every flag and IRQF, and the line with them.
                let v = self.s.ram[REG_C] | if self.s.line { C_IRQF } else { 0 };
                self.s.ram[REG_C] = 0;
                return (v, self.irq());
            }
            _ => self.s.ram.get(i).copied().unwrap_or(0xFF),
        };
        (v, None)
    }

    /// A guest OUT to port 0x70 or 0x71; returns the new IRQ 8 level if it changed.
    pub fn port_out(&mut self, port: u16, v: u8, now: u64) -> Option<bool> {
        if port == PORT_INDEX {
            self.s.index = v;
            return None;
        }
        self.sync(now);
        let i = usize::from(self.s.index & 0x7F);
        match i {
            REG_A => {
                let was = self.divider_on();
                let cur = self.secs(now);
                self.s.ram[REG_A] = v & !A_UIP;
                if was && !self.divider_on() {
                    self.s.secs = cur; // divider stopped: the clock holds
                } else if !was && self.divider_on() {
                    // Out of divider reset, the first update comes 500 ms later.
                    self.s.anchor_ns = now.saturating_sub(NS / 2);
                    self.s.checked_ns = now;
                }
            }
            REG_B => {
                let old = self.s.ram[REG_B];
                let mut new = v;
                if new & B_SET != 0 {
                    new &= !B_UIE; // SET clears UIE (MC146818A data sheet, register B)
                }
                if old & B_SET == 0 && new & B_SET != 0 {
                    // Updates stop: the registers keep the time shown now.
                    let t = self.encode_time(self.secs(now));
                    for r in [0usize, 2, 4, 6, 7, 8, 9] {
                        self.s.ram[r] = t[r];
                    }
                    self.s.ram[CENTURY] = t[1];
                    self.s.secs = self.secs(now);
                    self.s.ram[REG_B] = new;
                } else if old & B_SET != 0 && new & B_SET == 0 {
                    // Updates resume from what the guest wrote, on the old phase.
                    self.s.ram[REG_B] = new;
                    let t = self.decode_time();
                    self.set_time(t, now);
                    self.s.checked_ns = now;
                } else {
                    self.s.ram[REG_B] = new;
                }
            }
            REG_C | REG_D => {} // read-only
            0 | 2 | 4 | 6..=9 | CENTURY => {
                if !self.set() {
                    let t = self.encode_time(self.secs(now));
                    for r in [0usize, 2, 4, 6, 7, 8, 9] {
                        self.s.ram[r] = t[r];
                    }
                    self.s.ram[CENTURY] = t[1];
                    self.s.ram[i] = v;
                    let secs = self.decode_time();
                    self.set_time(secs, now);
                } else {
                    self.s.ram[i] = v;
                }
            }
            _ => {
                if let Some(b) = self.s.ram.get_mut(i) {
                    *b = v;
                }
            }
        }
        self.irq()
    }

    /// Moves the chip from VM time `from` to VM time `to` as if no time passed in
    /// between (a restore into a process whose VM time differs): the clock shows the
    /// same time, the divider keeps its phase, the flags stay as they were.
    pub fn rebase(&mut self, from: u64, to: u64) {
        self.sync(from);
        if self.running() {
            self.s.secs = self.secs(from);
        }
        let phase = from.saturating_sub(self.s.anchor_ns) % NS;
        self.s.anchor_ns = to.saturating_sub(phase);
        self.s.checked_ns = to;
    }

    /// Encodes the state (save-file section `RTC0`).
    pub fn encode(&self, w: &mut Writer) {
        w.raw(&self.s.ram);
        w.u8(self.s.index);
        w.u64(self.s.secs as u64);
        w.u64(self.s.anchor_ns);
        w.u64(self.s.checked_ns);
        w.u8(u8::from(self.s.line));
    }

    /// Decodes what [`Rtc::encode`] wrote.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, String> {
        let mut ram = [0u8; 128];
        ram.copy_from_slice(r.take(128)?);
        let index = r.u8()?;
        let secs = r.u64()? as i64;
        let anchor_ns = r.u64()?;
        let checked_ns = r.u64()?;
        let line = match r.u8()? {
            0 => false,
            1 => true,
            x => return Err(r.err(format!("RTC line level {x}"))),
        };
        if ram[REG_C] & 0x0F != 0 || ram[REG_A] & A_UIP != 0 {
            return Err(r.err("RTC status A/C hold bits the chip never sets"));
        }
        Ok(Self {
            s: RtcState {
                ram,
                index,
                secs,
                anchor_ns,
                checked_ns,
                line,
            },
        })
    }
}
