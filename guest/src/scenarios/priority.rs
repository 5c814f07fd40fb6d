//! Priority scenarios: nested interrupts (`nested-priorities`), the
//! illumos-style "raise TPR, EOI at once" scheme (`tpr-immediate-eoi`) and
//! the Linux-style "one interrupt at a time" scheme (`one-pending`).
//!
//! SDM rules checked here: an interrupt is dispatched only if its priority
//! class (vector[7:4]) is above PPR[7:4]; PPR = TPR if TPR[7:4] >= ISRV[7:4]
//! else ISRV & 0xF0 (ISRV = highest in-service vector); EOI clears the
//! highest in-service vector; a vector can be pending in IRR while the same
//! vector is in service, further requests collapse into the IRR bit.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering::*};

use super::{ensure_isr_empty, expect_isr, expect_ppr, Log, Seq, ENTER, EXIT};
use crate::idt::{self, Frame};
use crate::report::Res;
use crate::{apic, cpu, percpu, time};

static LOG: Log = Log::new();

// ---------------------------------------------------------------------------
// nested-priorities
// ---------------------------------------------------------------------------

/// Each handler re-enables interrupts and sends the next, higher-class vector.
const CHAIN: [u8; 4] = [0x41, 0x61, 0x81, 0xA1];
/// Same class as the deepest: must stay pending until that one's EOI.
const SAME: u8 = 0xA5;

static DONE: [AtomicBool; 5] = [const { AtomicBool::new(false) }; 5];
static SAME_ENTERED: AtomicBool = AtomicBool::new(false);
static MAX_DEPTH: AtomicU32 = AtomicU32::new(0);

fn chain_pos(v: u8) -> usize {
    CHAIN.iter().position(|&c| c == v).unwrap_or(0)
}

fn in_service_chain() -> u32 {
    let isr = apic::isr();
    CHAIN.iter().filter(|&&c| apic::bit(&isr, c)).count() as u32
}

fn nested_handler(f: &mut Frame) {
    let v = f.vector();
    let i = chain_pos(v);
    LOG.push(ENTER, v);
    expect_isr("entry of", v, &CHAIN[..=i]);
    expect_ppr("entry of", v, (v & 0xF0) as u32);
    MAX_DEPTH.fetch_max(in_service_chain(), SeqCst);

    if i + 1 < CHAIN.len() {
        // Let a higher class preempt us.
        let next = CHAIN[i + 1];
        cpu::sti();
        apic::self_ipi(next);
        let ok = time::wait_until(time::timeout(), || {
            DONE[i + 1].load(SeqCst) && (i + 1 < CHAIN.len() - 1 || DONE[4].load(SeqCst))
        });
        cpu::cli();
        if !ok {
            note!(
                "in {:#x} (IF=1): {:#x} did not preempt/complete; IRR {}",
                v,
                next,
                apic::Vectors(apic::irr())
            );
        }
    } else {
        // Deepest: a same-class vector must not preempt.
        cpu::sti();
        apic::self_ipi(SAME);
        let arrived = time::wait_until(time::timeout(), || {
            apic::irr_bit(SAME) || SAME_ENTERED.load(SeqCst)
        });
        time::delay(time::settle_time());
        cpu::cli();
        if SAME_ENTERED.load(SeqCst) {
            note!(
                "{:#x} preempted {:#x} although its class is not higher",
                SAME,
                v
            );
        } else if !arrived || !apic::irr_bit(SAME) {
            note!(
                "{:#x} not pending in IRR while {:#x} in service: IRR {}",
                SAME,
                v,
                apic::Vectors(apic::irr())
            );
        }
    }

    apic::eoi();
    expect_isr("after EOI of", v, &CHAIN[..i]);
    expect_ppr(
        "after EOI of",
        v,
        if i > 0 {
            (CHAIN[i - 1] & 0xF0) as u32
        } else {
            0
        },
    );
    LOG.push(EXIT, v);
    DONE[i].store(true, SeqCst);
}

fn same_handler(f: &mut Frame) {
    let v = f.vector();
    SAME_ENTERED.store(true, SeqCst);
    LOG.push(ENTER, v);
    expect_isr("entry of", v, &[CHAIN[0], CHAIN[1], CHAIN[2], SAME]);
    expect_ppr("entry of", v, (SAME & 0xF0) as u32);
    apic::eoi();
    expect_isr("after EOI of", v, &CHAIN[..3]);
    expect_ppr("after EOI of", v, (CHAIN[2] & 0xF0) as u32);
    LOG.push(EXIT, v);
    DONE[4].store(true, SeqCst);
}

pub fn nested_priorities() -> Res {
    LOG.clear();
    for d in DONE.iter() {
        d.store(false, SeqCst);
    }
    SAME_ENTERED.store(false, SeqCst);
    MAX_DEPTH.store(0, SeqCst);
    for v in CHAIN {
        idt::set_handler(v, nested_handler);
    }
    idt::set_handler(SAME, same_handler);

    apic::self_ipi(CHAIN[0]);
    let ok = time::wait_irq(8 * time::timeout(), || DONE[0].load(SeqCst));
    time::settle(time::settle_time());
    ensure!(ok, "handler {:#x} did not complete; log {}", CHAIN[0], LOG);

    let depth = MAX_DEPTH.load(SeqCst);
    ensure!(
        depth >= 3,
        "at most {} interrupts were in service at once",
        depth
    );
    let want = [
        ENTER | 0x41,
        ENTER | 0x61,
        ENTER | 0x81,
        ENTER | 0xA1,
        EXIT | 0xA1,
        ENTER | SAME as u16,
        EXIT | SAME as u16,
        EXIT | 0x81,
        EXIT | 0x61,
        EXIT | 0x41,
    ];
    ensure!(LOG.matches(&want), "order {} expected {}", LOG, Seq(&want));
    ensure_isr_empty("at the end")?;
    let irr = apic::irr();
    ensure!(
        !CHAIN
            .iter()
            .chain([SAME].iter())
            .any(|&v| apic::bit(&irr, v)),
        "vectors still pending at the end: IRR {}",
        apic::Vectors(irr)
    );
    ensure!(
        apic::read(apic::PPR) & 0xFF == 0,
        "PPR {:#x} at the end",
        apic::read(apic::PPR)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// tpr-immediate-eoi (illumos style)
// ---------------------------------------------------------------------------

const T_MAIN: u8 = 0x62;
const T_LOW: u8 = 0x52; // class 5: held by TPR 0x65 and 0x50
const T_SAMECLASS: u8 = 0x64; // class 6: held by TPR 0x65, passes TPR 0x50
const T_HIGH: u8 = 0x72; // class 7: passes TPR 0x65
const T_TPR: u32 = 0x65;

static T_DONE: AtomicBool = AtomicBool::new(false);

fn tpr_main_handler(f: &mut Frame) {
    let v = f.vector();
    let me = percpu::this();
    LOG.push(ENTER, v);
    expect_isr("entry of", v, &[v]);

    // Raise TPR to this interrupt's level and EOI at once.
    apic::write(apic::TPR, T_TPR);
    apic::eoi();
    expect_isr("after immediate EOI of", v, &[]);
    expect_ppr("with TPR=0x65 after EOI of", v, T_TPR);

    let (c_low, c_same, c_high) = (me.count(T_LOW), me.count(T_SAMECLASS), me.count(T_HIGH));
    cpu::sti();
    apic::self_ipi(T_LOW);
    apic::self_ipi(T_SAMECLASS);
    let pending = time::wait_until(time::timeout(), || {
        apic::irr_bit(T_LOW) && apic::irr_bit(T_SAMECLASS)
    });
    time::delay(time::settle_time());
    if me.count(T_LOW) != c_low || me.count(T_SAMECLASS) != c_same {
        note!(
            "{:#x}/{:#x} delivered although TPR=0x65",
            T_LOW,
            T_SAMECLASS
        );
    } else if !pending {
        note!(
            "{:#x}/{:#x} not held in IRR with TPR=0x65: IRR {}",
            T_LOW,
            T_SAMECLASS,
            apic::Vectors(apic::irr())
        );
    }
    expect_ppr("with TPR=0x65 and pending IRR, in", v, T_TPR);

    // A higher class gets through.
    apic::self_ipi(T_HIGH);
    if !time::wait_until(time::timeout(), || me.count(T_HIGH) != c_high) {
        note!("{:#x} not delivered with TPR=0x65", T_HIGH);
    }

    // Lower TPR to 0x50: class 6 is delivered, class 5 still held.
    apic::write(apic::TPR, 0x50);
    if !time::wait_until(time::timeout(), || me.count(T_SAMECLASS) != c_same) {
        note!(
            "{:#x} not delivered after lowering TPR to 0x50",
            T_SAMECLASS
        );
    }
    time::delay(time::settle_time());
    if me.count(T_LOW) != c_low {
        note!("{:#x} delivered with TPR=0x50", T_LOW);
    } else if !apic::irr_bit(T_LOW) {
        note!(
            "{:#x} no longer pending with TPR=0x50: IRR {}",
            T_LOW,
            apic::Vectors(apic::irr())
        );
    }

    // Drop TPR: the last one arrives.
    apic::write(apic::TPR, 0);
    if !time::wait_until(time::timeout(), || me.count(T_LOW) != c_low) {
        note!("{:#x} not delivered after lowering TPR to 0", T_LOW);
    }
    cpu::cli();
    LOG.push(EXIT, v);
    T_DONE.store(true, SeqCst);
}

fn tpr_sub_handler(f: &mut Frame) {
    let v = f.vector();
    LOG.push(ENTER, v);
    expect_isr("entry of", v, &[v]);
    let tpr = apic::read(apic::TPR) & 0xFF;
    let want = if (tpr >> 4) >= (v >> 4) as u32 {
        tpr
    } else {
        (v & 0xF0) as u32
    };
    expect_ppr("entry of", v, want);
    if v == T_SAMECLASS {
        // TPR class == ISRV class: PPR = TPR (incl. the low nibble).
        apic::write(apic::TPR, 0x6A);
        expect_ppr("TPR=0x6A in", v, 0x6A);
        apic::write(apic::TPR, tpr);
    }
    apic::eoi();
    expect_isr("after EOI of", v, &[]);
    expect_ppr("after EOI of", v, tpr);
    LOG.push(EXIT, v);
}

pub fn tpr_immediate_eoi() -> Res {
    LOG.clear();
    T_DONE.store(false, SeqCst);
    idt::set_handler(T_MAIN, tpr_main_handler);
    for v in [T_LOW, T_SAMECLASS, T_HIGH] {
        idt::set_handler(v, tpr_sub_handler);
    }
    apic::self_ipi(T_MAIN);
    let ok = time::wait_irq(8 * time::timeout(), || T_DONE.load(SeqCst));
    time::settle(time::settle_time());
    ensure!(ok, "handler {:#x} did not complete; log {}", T_MAIN, LOG);
    let want = [
        ENTER | T_MAIN as u16,
        ENTER | T_HIGH as u16,
        EXIT | T_HIGH as u16,
        ENTER | T_SAMECLASS as u16,
        EXIT | T_SAMECLASS as u16,
        ENTER | T_LOW as u16,
        EXIT | T_LOW as u16,
        EXIT | T_MAIN as u16,
    ];
    ensure!(LOG.matches(&want), "order {} expected {}", LOG, Seq(&want));
    ensure!(
        apic::read(apic::TPR) & 0xFF == 0,
        "TPR {:#x} at the end",
        apic::read(apic::TPR)
    );
    ensure_isr_empty("at the end")?;
    Ok(())
}

// ---------------------------------------------------------------------------
// one-pending (Linux style)
// ---------------------------------------------------------------------------

const O_LOW: u8 = 0x43;
const O_MID: u8 = 0x53;
const O_HIGH: u8 = 0x93;
static O_REPEAT_SENT: AtomicBool = AtomicBool::new(false);

/// Runs with IF=0 throughout and EOIs at the end.
fn one_handler(f: &mut Frame) {
    let v = f.vector();
    LOG.push(ENTER, v);
    expect_isr("entry of", v, &[v]);
    expect_ppr("entry of", v, (v & 0xF0) as u32);
    if v == O_HIGH && !O_REPEAT_SENT.swap(true, SeqCst) {
        let irr = apic::irr();
        if !apic::bit(&irr, O_LOW) || !apic::bit(&irr, O_MID) {
            note!(
                "in {:#x}: lower vectors not pending: IRR {}",
                v,
                apic::Vectors(irr)
            );
        }
        // Same vector again while in service: pends in IRR (twice -> collapses).
        apic::self_ipi(O_HIGH);
        apic::self_ipi(O_HIGH);
        if !time::wait_until(time::timeout(), || apic::irr_bit(O_HIGH)) {
            note!("in {:#x}: re-sent {:#x} not pending in IRR", v, O_HIGH);
        }
        if !apic::isr_bit(O_HIGH) {
            note!("in {:#x}: ISR bit lost after re-sending the same vector", v);
        }
    }
    apic::eoi();
    expect_isr("after EOI of", v, &[]);
    LOG.push(EXIT, v);
}

pub fn one_pending() -> Res {
    LOG.clear();
    O_REPEAT_SENT.store(false, SeqCst);
    for v in [O_LOW, O_MID, O_HIGH] {
        idt::set_handler(v, one_handler);
    }
    // IF=0: queue three vectors (one of them twice).
    apic::self_ipi(O_LOW);
    apic::self_ipi(O_LOW);
    apic::self_ipi(O_HIGH);
    apic::self_ipi(O_MID);
    let queued = time::wait_until(time::timeout(), || {
        let irr = apic::irr();
        apic::bit(&irr, O_LOW) && apic::bit(&irr, O_MID) && apic::bit(&irr, O_HIGH)
    });
    ensure!(
        queued,
        "IRR {} after sending with IF=0",
        apic::Vectors(apic::irr())
    );
    ensure_isr_empty("with IF=0")?;
    ensure!(LOG.len() == 0, "delivered with IF=0: {}", LOG);

    let done = time::wait_irq(time::timeout(), || LOG.len() >= 8);
    time::settle(time::settle_time());
    let want = [
        ENTER | O_HIGH as u16,
        EXIT | O_HIGH as u16,
        ENTER | O_HIGH as u16,
        EXIT | O_HIGH as u16,
        ENTER | O_MID as u16,
        EXIT | O_MID as u16,
        ENTER | O_LOW as u16,
        EXIT | O_LOW as u16,
    ];
    ensure!(
        done && LOG.matches(&want),
        "order {} expected {}",
        LOG,
        Seq(&want)
    );
    ensure_isr_empty("at the end")?;
    Ok(())
}

fn write_cr8(v: u64) {
    // SAFETY: CR8 writes only change the task priority (CPL 0 here).
    unsafe { core::arch::asm!("mov cr8, {}", in(reg) v, options(nomem, nostack)) };
}

fn read_cr8() -> u64 {
    let v: u64;
    // SAFETY: reading CR8 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr8", out(reg) v, options(nomem, nostack)) };
    v
}

/// CR8 is TPR[7:4] (SDM §11.8.6.1), both ways and at once: a TPR read right after
/// `mov cr8` sees the new class, and a TPR write right after `mov cr8` is not undone
/// by it. (A VMM that folds CR8 into TPR late fails both.)
pub fn tpr_cr8() -> Res {
    let (mut stale, mut lost) = (0u32, 0u32);
    for i in 0..50u64 {
        let c = i % 15 + 1;
        write_cr8(c);
        if u64::from(apic::read(apic::TPR)) != c << 4 {
            stale += 1;
        }
        write_cr8(c ^ 0xF);
        apic::write(apic::TPR, 0x30);
        if read_cr8() != 3 || apic::read(apic::TPR) != 0x30 {
            lost += 1;
        }
    }
    apic::write(apic::TPR, 0);
    crate::ensure!(
        stale == 0 && lost == 0,
        "of 50 rounds: {} TPR reads stale right after mov cr8, {} TPR writes undone by an earlier mov cr8",
        stale,
        lost
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// self-ipi-cr8 (kvm-unit-tests vmexit x2apic_self_ipi_tpr)
// ---------------------------------------------------------------------------

static CR8_HITS: AtomicU32 = AtomicU32::new(0);

fn cr8_handler(_f: &mut Frame) {
    CR8_HITS.fetch_add(1, SeqCst);
    apic::eoi();
}

/// `mov cr8, 15; wrmsr SELF_IPI 0xB0; mov cr8, 0`: the self IPI waits in IRR while
/// TPR[7:4] = 15 and is taken as soon as `mov cr8, 0` drops TPR (SDM §11.8.6.1: a CR8
/// write changes TPR at once; §11.8.3.1: IRR above PPR is dispatched) — checked by the
/// very next instruction (all but a few rounds) and never lost. A VMM that gets no exit
/// on CR8 lowering must still deliver it (vlapic-kvm single-steps after the exit that
/// left it held back).
pub fn self_ipi_cr8() -> Res {
    const ROUNDS: u32 = 200;
    idt::set_handler(0xB0, cr8_handler);
    let (mut late, mut lost) = (0u32, 0u32);
    cpu::sti();
    for _ in 0..ROUNDS {
        let before = CR8_HITS.load(SeqCst);
        let seen: u32;
        // SAFETY: CPL 0, x2APIC mode (the runner switched): SELF IPI is MSR 0x83F; CR8
        // writes only change the task priority; the load reads a static.
        unsafe {
            core::arch::asm!(
                "mov cr8, {hi}",
                "wrmsr",
                "mov cr8, {lo}",
                "mov {seen:e}, dword ptr [{hits}]",
                hi = in(reg) 15u64,
                lo = in(reg) 0u64,
                hits = in(reg) CR8_HITS.as_ptr(),
                seen = out(reg) seen,
                in("ecx") 0x83Fu32,
                in("eax") 0xB0u32,
                in("edx") 0u32,
                options(nostack),
            );
        }
        if seen == before {
            late += 1;
            if !time::wait_until(time::us(10_000), || CR8_HITS.load(SeqCst) != before) {
                lost += 1;
            }
        }
    }
    cpu::cli();
    write_cr8(0);
    // Every round must take its interrupt; "right after" may slip in a few rounds where
    // a live migration or a host kick lands between the exit and the `mov cr8` (under
    // 2%); a VMM that waits for its TPR poll is late in every round.
    ensure!(
        late <= ROUNDS / 50 && lost == 0,
        "of {} rounds: {} took 0xB0 late (not right after mov cr8, 0), {} never",
        ROUNDS,
        late,
        lost
    );
    Ok(())
}
