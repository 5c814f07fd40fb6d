//! Platform clock scenarios: the HPET at 0xFED00000 (IA-PC HPET spec 1.0a) and the
//! CMOS RTC at ports 0x70/0x71 (MC146818A), delivering through the IOAPIC.
//!
//! HPET: one-shot and periodic comparators routed to an IOAPIC pin their
//! INT_ROUTE_CAP allows (first one from 16 up), a level-triggered timer held until
//! its GINTR_STA bit is written 1, legacy replacement (timer 0 → IRQ0 = pin 2,
//! timer 1 → IRQ8 = pin 8). The periodic check is built to span several live
//! migrations: interrupt n may not come before n periods have passed (no doubles;
//! late ones may coalesce, as an edge-triggered line does), the comparator must stay on its grid and ahead of the last
//! interrupt (nothing lost or restarted), and the count must keep coming.
//! RTC: a consistent time read (UIP protocol), UIP toggling around one update,
//! the periodic interrupt on IRQ 8 (pin 8, edge), and IRQ 8 held by IRQF until
//! status C is read.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::*};

use super::{counts, expect_delivery, only};
use crate::idt::{self, Frame};
use crate::report::{Res, Verdict};
use crate::{apic, cpu, ioapic, percpu, time};

const HPET: u64 = 0xFED0_0000;
const GEN_CONF: u64 = 0x10;
const GINTR_STA: u64 = 0x20;
const MAIN_CNT: u64 = 0xF0;
const TN_LEVEL: u64 = 1 << 1;
const TN_ENB: u64 = 1 << 2;
const TN_PERIODIC: u64 = 1 << 3;
const TN_VAL_SET: u64 = 1 << 6;

const V_HPET: u8 = 0x78;
const V_HPET_LEVEL: u8 = 0x79;
const V_LEGACY0: u8 = 0x7A;
const V_LEGACY1: u8 = 0x7B;
const V_RTC: u8 = 0x7C;

fn conf(n: u64) -> u64 {
    0x100 + 0x20 * n
}

fn cmp(n: u64) -> u64 {
    0x108 + 0x20 * n
}

fn hr(off: u64) -> u64 {
    unsafe { core::ptr::read_volatile((HPET + off) as *const u64) }
}

fn hw(off: u64, v: u64) {
    unsafe { core::ptr::write_volatile((HPET + off) as *mut u64, v) }
}

/// (counter period in fs, timers) after checking GCAP_ID (spec §2.3.4).
fn hpet_caps() -> Result<(u64, u64), Verdict> {
    let cap = hr(0);
    ensure!(
        cap != 0 && cap != u64::MAX,
        "no HPET at {:#x} (GCAP_ID {:#x})",
        HPET,
        cap
    );
    let period = cap >> 32;
    ensure!(
        period > 0 && period <= 100_000_000,
        "COUNTER_CLK_PERIOD {} fs (the spec allows up to 100 ns)",
        period
    );
    let n = ((cap >> 8) & 0x1F) + 1;
    ensure!(n >= 3, "{} timers (the spec requires at least 3)", n);
    ensure!(cap & (1 << 15) != 0, "LEG_RT_CAP clear: {:#x}", cap);
    Ok((period, n))
}

/// Counter ticks in `us` microseconds.
fn ticks_us(period_fs: u64, us: u64) -> u64 {
    us * 1_000_000_000 / period_fs
}

/// Halts the counter, sets it to 0, starts it with `gen` extra GEN_CONF bits.
fn hpet_start(gen: u64) {
    hw(GEN_CONF, 0);
    hw(MAIN_CNT, 0);
    hw(GEN_CONF, 1 | gen);
}

/// The first IOAPIC pin from 16 up that timer `n` may use.
fn route_pin(n: u64) -> Result<u32, Verdict> {
    let cap = (hr(conf(n)) >> 32) as u32;
    let max = ioapic::max_entry();
    // A pin from 16 up (vlapic-vmm: 16–23), else any but the RTC's 8 (QEMU 7.2's
    // PC allows only 2, which the firmware's PIT also drives: channel 0 in mode 0
    // with a count of 1 raises its output once, at once, while the pin is still
    // masked, and then holds it: no more edges).
    let pick = (16..=max.min(31))
        .chain(0..16)
        .find(|p| *p != 8 && cap & (1 << p) != 0);
    match pick {
        Some(p) => {
            if p == 2 {
                cpu::outb(0x43, 0x30);
                cpu::outb(0x40, 1);
                cpu::outb(0x40, 0);
                time::delay(time::ms(20)); // let that edge pass (QEMU TCG may be late)
            }
            Ok(p)
        }
        None => fail!(
            "timer {} routes to no usable pin (INT_ROUTE_CAP {:#x})",
            n,
            cap
        ),
    }
}

/// Arms one-shot timer `n` `us` ahead with configuration `bits` and returns its
/// comparator. The comparator is written with the timer's interrupt disabled and
/// `bits` applied after it (QEMU fires a 64-bit timer at once when it is enabled
/// with its comparator behind the counter; the spec waits for a wrap). A comparator
/// that is behind the counter when read back (the host did not run this vCPU in
/// between: a loaded host, a live-migration pause) only matches after a wrap
/// (§2.3.9.2.1), so if `fired` says nothing came it is armed again (as Linux's
/// `hpet_next_event` retries).
fn arm_oneshot(n: u64, bits: u64, period_fs: u64, us: u64, fired: impl Fn() -> bool) -> u64 {
    let mut target = 0;
    for _ in 0..5 {
        hw(conf(n), bits & !TN_ENB);
        target = hr(MAIN_CNT) + ticks_us(period_fs, us);
        hw(cmp(n), target);
        hw(conf(n), bits);
        if hr(MAIN_CNT) < target {
            break;
        }
        time::settle(time::ms(50));
        if fired() {
            break;
        }
    }
    target
}

/// Quiet both devices (scenario cleanup): HPET halted, RTC interrupts off, C read.
pub fn quiet() {
    hw(GEN_CONF, 0);
    for n in 0..3 {
        hw(conf(n), 0);
    }
    hw(GINTR_STA, 0x7);
    let b = rtc_read(0x0B);
    rtc_write(0x0B, b & !0x70);
    rtc_read(0x0C);
}

static FIRES: AtomicU32 = AtomicU32::new(0);
static AT: AtomicU64 = AtomicU64::new(0);
static START: AtomicU64 = AtomicU64::new(0);
static PERIOD: AtomicU64 = AtomicU64::new(1);

fn oneshot_handler(_f: &mut Frame) {
    AT.store(hr(MAIN_CNT), SeqCst);
    FIRES.fetch_add(1, SeqCst);
    apic::eoi();
}

pub fn hpet_oneshot() -> Res {
    let (period, _) = hpet_caps()?;
    // The counter holds while halted and is writable then (§2.3.7).
    hw(GEN_CONF, 0);
    hw(MAIN_CNT, 0x1234);
    time::delay(time::us(200));
    let held = hr(MAIN_CNT);
    ensure!(held == 0x1234, "halted counter reads {:#x}", held);
    hpet_start(0);
    let a = hr(MAIN_CNT);
    time::delay(time::ms(1));
    let b = hr(MAIN_CNT);
    ensure!(b > a, "counter does not count: {:#x} then {:#x}", a, b);

    let pin = route_pin(2)?;
    idt::set_handler(V_HPET, oneshot_handler);
    ioapic::write_rte(pin, ioapic::rte(V_HPET, false, false, apic::id()));
    FIRES.store(0, SeqCst);
    let before = counts(V_HPET);
    let bits = TN_ENB | (u64::from(pin) << 9);
    let target = arm_oneshot(2, bits, period, 5000, || FIRES.load(SeqCst) > 0);
    ensure!(hr(cmp(2)) == target, "comparator reads {:#x}", hr(cmp(2)));
    expect_delivery(V_HPET, &before, only(percpu::bsp()), "one-shot comparator")?;
    let at = AT.load(SeqCst);
    ensure!(
        at >= target,
        "interrupt at counter {:#x}, before the comparator {:#x}",
        at,
        target
    );
    Ok(())
}

/// Waits (IF=1) until `FIRES` reaches `n`; gives up after two timeouts in a row
/// without a new interrupt (one may be eaten by a guest TSC that jumped forward
/// across a save and restore). Whether `n` was reached.
fn wait_count(n: u32) -> bool {
    let mut stalls = 0;
    while FIRES.load(SeqCst) < n && stalls < 2 {
        let seen = FIRES.load(SeqCst);
        time::wait_irq(time::timeout(), || FIRES.load(SeqCst) != seen);
        stalls = if FIRES.load(SeqCst) == seen {
            stalls + 1
        } else {
            0
        };
    }
    FIRES.load(SeqCst) >= n
}

fn periodic_handler(_f: &mut Frame) {
    let c = hr(MAIN_CNT);
    // Interrupt n cannot come before the n-th period boundary (late ones may
    // coalesce, none may be doubled or early).
    let periods = c.wrapping_sub(START.load(SeqCst)) / PERIOD.load(SeqCst);
    let n = FIRES.fetch_add(1, SeqCst) + 1;
    if u64::from(n) > periods {
        note!(
            "interrupt {} after only {} periods (counter {:#x}): a doubled tick",
            n,
            periods,
            c
        );
    }
    AT.store(c, SeqCst);
    apic::eoi();
}

pub fn hpet_periodic() -> Res {
    let (period_fs, _) = hpet_caps()?;
    // 100 ms: long enough for several live migrations (every 5 ms in the test
    // job) and for a save (the save/restore test aims at it) to land mid-count.
    const N: u32 = 100;
    let p = ticks_us(period_fs, 1000); // 1 ms
    hpet_start(0);
    let pin = route_pin(2)?;
    idt::set_handler(V_HPET, periodic_handler);
    ioapic::write_rte(pin, ioapic::rte(V_HPET, false, false, apic::id()));
    FIRES.store(0, SeqCst);
    PERIOD.store(p, SeqCst);
    let mut start = 0;
    let t0 = cpu::rdtsc();
    for _ in 0..5 {
        start = hr(MAIN_CNT);
        START.store(start, SeqCst);
        // §2.3.9.2.2: VAL_SET, then the first write sets the accumulator, the second
        // the increment. The first expiry 5 periods ahead; if the counter passed it
        // before the write landed (see arm_oneshot), the comparator would wait for a
        // wrap: program it again. Interrupts are enabled last (see arm_oneshot).
        let route = u64::from(pin) << 9;
        hw(conf(2), TN_PERIODIC | TN_VAL_SET | route);
        hw(cmp(2), start + 5 * p);
        hw(cmp(2), p);
        hw(conf(2), TN_ENB | TN_PERIODIC | route);
        if hr(MAIN_CNT) < start + 5 * p {
            break;
        }
        time::settle(time::ms(20));
        if FIRES.load(SeqCst) > 0 {
            break;
        }
    }
    let done = wait_count(N);
    let c = hr(cmp(2));
    let now = hr(MAIN_CNT);
    let t1 = cpu::rdtsc();
    cpu::cli();
    hw(conf(2), 0);
    let fires = FIRES.load(SeqCst);
    ensure!(
        done,
        "{} of {} periodic interrupts in time (comparator {:#x}, counter {:#x})",
        fires,
        N,
        c,
        now
    );
    ensure!(
        c.wrapping_sub(start) % p == 0,
        "comparator {:#x} left its grid (start {:#x} + k * {:#x})",
        c,
        start,
        p
    );
    let last = AT.load(SeqCst);
    ensure!(
        c > last && c <= now + p,
        "comparator {:#x} not the next period after the last interrupt (counter {:#x} then, {:#x} now)",
        c,
        last,
        now
    );
    let periods = now.wrapping_sub(start) / p;
    ensure!(
        u64::from(fires) <= periods + 1,
        "{} interrupts in {} periods",
        fires,
        periods
    );
    // The counter runs no faster than its advertised rate against the TSC (loosely:
    // a factor 2). Only an upper bound: across a save and restore the guest TSC on
    // some hosts jumps by the time between the two while the HPET continues from its
    // saved count (a counter that is too slow or stops is caught by the count above).
    let hpet_us = now.wrapping_sub(start) * period_fs / 1_000_000_000;
    let tsc_us = (t1 - t0) * 1000 / time::tsc_khz().max(1);
    ensure!(
        hpet_us <= tsc_us * 2 + 1000,
        "HPET counted {} us while the TSC counted {} us",
        hpet_us,
        tsc_us
    );
    Ok(())
}

fn level_handler(_f: &mut Frame) {
    let sta = hr(GINTR_STA);
    if sta & (1 << 2) == 0 {
        note!("level interrupt with GINTR_STA {:#x}", sta);
    }
    hw(GINTR_STA, 1 << 2); // write 1 to clear: the line drops
    FIRES.fetch_add(1, SeqCst);
    apic::eoi();
}

pub fn hpet_level() -> Res {
    let (period, _) = hpet_caps()?;
    hpet_start(0);
    let pin = route_pin(2)?;
    idt::set_handler(V_HPET_LEVEL, level_handler);
    ioapic::write_rte(pin, ioapic::rte(V_HPET_LEVEL, true, false, apic::id()));
    let before = counts(V_HPET_LEVEL);
    FIRES.store(0, SeqCst);
    let bits = TN_LEVEL | TN_ENB | (u64::from(pin) << 9);
    arm_oneshot(2, bits, period, 5000, || FIRES.load(SeqCst) > 0);
    // One entry: the status bit cleared in the handler releases the line, so the
    // EOI does not bring the interrupt back.
    expect_delivery(V_HPET_LEVEL, &before, only(percpu::bsp()), "level timer")?;
    ensure!(hr(GINTR_STA) & 4 == 0, "GINTR_STA {:#x}", hr(GINTR_STA));
    Ok(())
}

/// A level-triggered timer with INT_ENB clear still sets its GINTR_STA bit on a
/// match, without an interrupt (spec §2.3.8 bit 2: "the timer will still operate
/// and generate appropriate status bits"); writing 1 clears it.
pub fn hpet_level_masked() -> Res {
    let (period, _) = hpet_caps()?;
    hpet_start(0);
    let pin = route_pin(2)?;
    idt::set_handler(V_HPET_LEVEL, level_handler);
    ioapic::write_rte(pin, ioapic::rte(V_HPET_LEVEL, true, false, apic::id()));
    let before = counts(V_HPET_LEVEL);
    let bits = TN_LEVEL | (u64::from(pin) << 9);
    arm_oneshot(2, bits, period, 5000, || hr(GINTR_STA) & 4 != 0);
    ensure!(
        time::wait_until(time::timeout(), || hr(GINTR_STA) & 4 != 0),
        "status bit not set with INT_ENB clear"
    );
    hw(GINTR_STA, 4);
    ensure!(
        hr(GINTR_STA) & 4 == 0,
        "status bit not cleared by writing 1"
    );
    expect_delivery(V_HPET_LEVEL, &before, |_| Some(0), "INT_ENB clear")?;
    Ok(())
}

pub fn hpet_legacy() -> Res {
    let (period, _) = hpet_caps()?;
    hpet_start(2); // LEG_RT_CNF
    ensure!(hr(GEN_CONF) & 3 == 3, "GEN_CONF {:#x}", hr(GEN_CONF));
    idt::set_handler(V_LEGACY0, oneshot_handler);
    idt::set_handler(V_LEGACY1, oneshot_handler);
    ioapic::write_rte(2, ioapic::rte(V_LEGACY0, false, false, apic::id()));
    ioapic::write_rte(8, ioapic::rte(V_LEGACY1, false, false, apic::id()));
    let b0 = counts(V_LEGACY0);
    let b1 = counts(V_LEGACY1);
    let c0 = move || counts(V_LEGACY0)[percpu::bsp()] != b0[percpu::bsp()];
    let c1 = move || counts(V_LEGACY1)[percpu::bsp()] != b1[percpu::bsp()];
    arm_oneshot(0, TN_ENB, period, 5000, c0);
    arm_oneshot(1, TN_ENB, period, 10000, c1);
    expect_delivery(
        V_LEGACY0,
        &b0,
        only(percpu::bsp()),
        "timer 0 on IRQ0 (pin 2)",
    )?;
    expect_delivery(
        V_LEGACY1,
        &b1,
        only(percpu::bsp()),
        "timer 1 on IRQ8 (pin 8)",
    )?;
    Ok(())
}

// --- RTC -------------------------------------------------------------------------

fn rtc_read(reg: u8) -> u8 {
    let _g = cpu::IrqGuard::new();
    cpu::outb(0x70, reg);
    cpu::inb(0x71)
}

fn rtc_write(reg: u8, v: u8) {
    let _g = cpu::IrqGuard::new();
    cpu::outb(0x70, reg);
    cpu::outb(0x71, v);
}

/// Seconds, minutes, hours, day, month, year, century as binary values.
fn rtc_time() -> Result<[u8; 7], Verdict> {
    let regs = [0u8, 2, 4, 7, 8, 9, 0x32];
    let read_all = || regs.map(rtc_read);
    for _ in 0..10 {
        ensure!(
            time::wait_until(time::ms(10), || rtc_read(0x0A) & 0x80 == 0),
            "UIP stuck"
        );
        let a = read_all();
        if a == read_all() {
            let b = rtc_read(0x0B);
            let dec = |v: u8| {
                if b & 4 != 0 {
                    v
                } else {
                    (v >> 4) * 10 + (v & 0xF)
                }
            };
            let mut t = a.map(dec);
            if b & 2 == 0 {
                t[2] = dec(a[2] & 0x7F) % 12 + if a[2] & 0x80 != 0 { 12 } else { 0 };
            }
            return Ok(t);
        }
    }
    fail!("the time never read the same twice")
}

pub fn rtc_time_read() -> Res {
    ensure!(rtc_read(0x0D) & 0x80 != 0, "register D: VRT clear");
    let t = rtc_time()?;
    ensure!(
        t[0] < 60 && t[1] < 60 && t[2] < 24 && (1..=31).contains(&t[3]) && (1..=12).contains(&t[4]),
        "time out of range: {:?}",
        t
    );
    ensure!(
        t[6] == 20 && t[5] >= 24,
        "year {}{:02}: not the host clock's",
        t[6],
        t[5]
    );
    // UIP rises in the 244 us before an update, and the seconds move by one after
    // it. The window is short and a vCPU the host does not run (a loaded host, a
    // live migration) misses some: look across up to ten updates.
    let mut seen = false;
    for _ in 0..10 {
        let before = rtc_read(0);
        let start = cpu::rdtsc();
        while rtc_read(0) == before && cpu::rdtsc() - start < time::ms(1500) {
            if rtc_read(0x0A) & 0x80 != 0 {
                seen = true;
                break;
            }
        }
        if seen {
            // The update follows UIP (here within 244 µs; QEMU's comes later).
            time::wait_until(time::ms(1100), || rtc_read(0) != before);
            let s0 = rtc_time()?[0];
            let b0 = if rtc_read(0x0B) & 4 != 0 {
                before
            } else {
                (before >> 4) * 10 + (before & 0xF)
            };
            ensure!(
                s0 == (b0 + 1) % 60 || s0 == (b0 + 2) % 60,
                "seconds went from {} to {} across one update",
                b0,
                s0
            );
            break;
        }
    }
    ensure!(seen, "UIP never read as set across ten updates");
    // Bit 7 of the index is the NMI mask, not part of the register number.
    ensure!(rtc_read(0x8D) & 0x80 != 0, "register D through index 0x8D");
    rtc_read(0x0D);
    Ok(())
}

fn rtc_handler(_f: &mut Frame) {
    // As a shared-IRQ driver does: an interrupt with IRQF clear is not the RTC's
    // (QEMU delivers some, see rtc-status-c) and is not counted.
    let c = rtc_read(0x0C);
    if c & 0x80 != 0 {
        if c & 0x40 == 0 {
            note!("RTC interrupt with status C {:#x} (PF expected)", c);
        }
        FIRES.fetch_add(1, SeqCst);
    }
    apic::eoi();
}

fn rtc_handler_no_ack(_f: &mut Frame) {
    FIRES.fetch_add(1, SeqCst);
    apic::eoi();
}

pub fn rtc_periodic() -> Res {
    const N: u32 = 20;
    ioapic::write_rte(8, ioapic::rte(V_RTC, false, false, apic::id()));
    idt::set_handler(V_RTC, rtc_handler);
    let a = rtc_read(0x0A);
    rtc_write(0x0A, (a & 0xF0) | 6); // 1024 Hz
    rtc_read(0x0C);
    FIRES.store(0, SeqCst);
    let t0 = cpu::rdtsc();
    let b = rtc_read(0x0B);
    rtc_write(0x0B, b | 0x40); // PIE
    let done = wait_count(N);
    let t1 = cpu::rdtsc();
    rtc_write(0x0B, b & !0x70);
    rtc_read(0x0C);
    ensure!(done, "{} of {} periodic interrupts", FIRES.load(SeqCst), N);
    ensure!(
        (t1 - t0) * 1_000_000 >= time::tsc_khz() * 976 * u64::from(N - 1) * 9 / 10,
        "{} interrupts at 1024 Hz in {} TSC cycles: too fast",
        N,
        t1 - t0
    );
    rtc_write(0x0A, a);
    Ok(())
}

/// IRQ 8 held by IRQF until status C is read: one interrupt, then none however many
/// periods pass, then the next one once C is read (MC146818A register C; on a PC
/// IRQ 8 is an edge-triggered input, so a line that stays high brings nothing new).
pub fn rtc_status_c() -> Res {
    ioapic::write_rte(8, ioapic::rte(V_RTC, false, false, apic::id()));
    let a = rtc_read(0x0A);
    let b = rtc_read(0x0B);
    rtc_write(0x0A, (a & 0xF0) | 6); // 1024 Hz
    rtc_read(0x0C);
    idt::set_handler(V_RTC, rtc_handler_no_ack);
    FIRES.store(0, SeqCst);
    rtc_write(0x0B, (b & !0x70) | 0x40);
    ensure!(
        time::wait_irq(time::timeout(), || FIRES.load(SeqCst) >= 1),
        "no periodic interrupt"
    );
    time::settle(time::ms(20));
    ensure!(
        FIRES.load(SeqCst) == 1,
        "{} interrupts without reading status C",
        FIRES.load(SeqCst)
    );
    let c = rtc_read(0x0C);
    ensure!(c & 0xC0 == 0xC0, "status C {:#x} (IRQF and PF expected)", c);
    ensure!(
        time::wait_irq(time::timeout(), || FIRES.load(SeqCst) >= 2),
        "no interrupt after status C was read"
    );
    rtc_write(0x0B, b & !0x70);
    rtc_read(0x0C);
    rtc_write(0x0A, a);
    Ok(())
}
