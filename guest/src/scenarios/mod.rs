//! Scenario list, runner and helpers shared by the scenarios.
//!
//! Every scenario is a function returning [`Res`] (`Ok` = PASS, or a FAIL /
//! SKIP verdict). The runner checks the CPU-count and APIC-mode
//! requirements, runs the scenario on the BSP, then [`cleanup`] restores a
//! known state on every CPU (handlers removed, APICs reset, timer and
//! IOAPIC pins quiet) so one failure does not cascade into the next
//! scenario.
//!
//! Order: everything that runs in the boot APIC mode (normally xAPIC) comes
//! first; `x2apic-switch` then moves all CPUs to x2APIC and the `*-x2apic`
//! scenarios run last (there is no way back without disabling the APIC).
//! With `only=`, scenarios still run in this order, and an x2APIC-mode
//! scenario switches the CPUs itself.

use core::fmt;
use core::sync::atomic::{AtomicU16, AtomicUsize, Ordering::*};

use crate::apic;
use crate::cpu;
use crate::percpu::{self, CPUS, MAX_CPUS};
use crate::platform::Selection;
use crate::report::{self, Res, Verdict};
use crate::{idt, ioapic, smp, time, BootInfo};

mod io;
mod ipi;
mod priority;
mod softint;
mod state;
mod timer;

/// APIC mode a scenario needs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Runs in whatever mode the CPUs are in.
    Any,
    /// Needs xAPIC mode (SKIP if the guest runs in x2APIC mode).
    Xapic,
    /// Needs x2APIC mode on every CPU (switches if possible, else SKIP).
    X2apic,
}

pub struct Scenario {
    pub name: &'static str,
    /// Minimum number of online CPUs (else SKIP).
    pub min_cpus: usize,
    pub mode: Mode,
    pub run: fn() -> Res,
}

const fn sc(name: &'static str, min_cpus: usize, mode: Mode, run: fn() -> Res) -> Scenario {
    Scenario {
        name,
        min_cpus,
        mode,
        run,
    }
}

use Mode::*;

/// All scenarios, in execution order. Names are stable (parsed by CI).
pub const SCENARIOS: &[Scenario] = &[
    sc("smp-boot", 1, Any, state::smp_boot),
    sc("nested-priorities", 1, Any, priority::nested_priorities),
    sc("tpr-immediate-eoi", 1, Any, priority::tpr_immediate_eoi),
    sc("tpr-cr8", 1, Any, priority::tpr_cr8),
    sc("one-pending", 1, Any, priority::one_pending),
    sc("self-ipi-xapic", 1, Xapic, ipi::self_ipi_xapic),
    sc("ipi-fixed", 2, Any, ipi::ipi_fixed),
    sc("ipi-broadcast", 1, Any, ipi::ipi_broadcast),
    sc("ipi-all-but-self", 1, Any, ipi::ipi_all_but_self),
    sc("ipi-logical-flat", 1, Xapic, ipi::logical_flat),
    sc("ipi-logical-cluster", 1, Xapic, ipi::logical_cluster),
    sc(
        "ipi-logical-cluster-broadcast",
        1,
        Xapic,
        ipi::logical_cluster_broadcast,
    ),
    sc("ipi-lowest-priority", 2, Xapic, ipi::lowest_priority),
    sc("ipi-nmi", 2, Any, ipi::ipi_nmi),
    sc("nmi-race", 2, Any, ipi::nmi_race),
    sc("timer-oneshot", 1, Any, timer::oneshot),
    sc("timer-periodic", 1, Any, timer::periodic),
    sc("timer-tsc-deadline", 1, Any, timer::tsc_deadline),
    sc("ioapic-edge", 1, Any, io::edge),
    sc("ioapic-level", 1, Any, io::level),
    sc("ioapic-level-retrigger", 1, Any, io::level_retrigger),
    sc("ioapic-mask", 1, Any, io::mask),
    sc("ioapic-eoi-register", 1, Any, io::eoi_register),
    sc("sw-disable", 1, Any, state::sw_disable),
    sc("esr", 1, Any, state::esr),
    sc("soft-int", 1, Any, softint::soft_int),
    // ---- x2APIC phase ----
    sc("x2apic-switch", 1, Any, state::x2apic_switch),
    sc("self-ipi-x2apic", 1, X2apic, ipi::self_ipi_x2apic),
    sc(
        "nested-priorities-x2apic",
        1,
        X2apic,
        priority::nested_priorities,
    ),
    sc(
        "tpr-immediate-eoi-x2apic",
        1,
        X2apic,
        priority::tpr_immediate_eoi,
    ),
    sc("tpr-cr8-x2apic", 1, X2apic, priority::tpr_cr8),
    sc("self-ipi-cr8-x2apic", 1, X2apic, priority::self_ipi_cr8),
    sc("ipi-fixed-x2apic", 2, X2apic, ipi::ipi_fixed),
    sc("ipi-broadcast-x2apic", 1, X2apic, ipi::ipi_broadcast),
    sc("ipi-all-but-self-x2apic", 1, X2apic, ipi::ipi_all_but_self),
    sc(
        "ipi-logical-cluster-x2apic",
        1,
        X2apic,
        ipi::logical_cluster_x2apic,
    ),
    sc("ipi-nmi-x2apic", 2, X2apic, ipi::ipi_nmi),
    sc("timer-tsc-deadline-x2apic", 1, X2apic, timer::tsc_deadline),
    sc("ioapic-level-x2apic", 1, X2apic, io::level),
    sc("sw-disable-x2apic", 1, X2apic, state::sw_disable),
    sc("esr-x2apic", 1, X2apic, state::esr),
];

static CPUS_EXPECTED: AtomicUsize = AtomicUsize::new(1);

pub fn cpus_expected() -> usize {
    CPUS_EXPECTED.load(Relaxed)
}

/// Run the selected scenarios and finish (prints `DONE`, exits).
pub fn run(info: &BootInfo, sel: Selection) -> ! {
    CPUS_EXPECTED.store(info.cpus_expected, Relaxed);
    cpu::cli();
    if let Selection::Only(list) = sel {
        for n in list.split(',') {
            if !n.is_empty() && !SCENARIOS.iter().any(|s| s.name == n) {
                report::fail("cmdline", format_args!("unknown scenario \"{}\"", n));
            }
        }
    }
    for s in SCENARIOS {
        if sel.wants(s.name) {
            report::begin(s.name);
            let r = precheck(s).and_then(|()| (s.run)());
            cleanup();
            report::outcome(s.name, r);
        }
    }
    report::finish()
}

fn precheck(s: &Scenario) -> Res {
    let n = percpu::online_count();
    if n < s.min_cpus {
        skip!("needs {} CPUs, {} online", s.min_cpus, n);
    }
    match s.mode {
        Any => Ok(()),
        Xapic => {
            if apic::is_x2apic() {
                skip!("APIC is in x2APIC mode");
            }
            Ok(())
        }
        X2apic => ensure_x2apic_all(),
    }
}

/// Put every online CPU into x2APIC mode (SKIP if the CPU lacks x2APIC).
pub fn ensure_x2apic_all() -> Res {
    if !cpu::has_x2apic() {
        skip!("CPU lacks x2APIC (CPUID.1:ECX[21]=0)");
    }
    if !apic::is_x2apic() {
        apic::enable_x2apic();
    }
    for ap in percpu::aps() {
        if !CPUS[ap].x2apic.load(SeqCst) && smp::run_on(ap, smp::ap_enable_x2apic, 0).is_none() {
            fail!("cpu {} did not switch to x2APIC (no answer)", ap);
        }
    }
    Ok(())
}

/// Fixed interrupt lines used by the IOAPIC scenarios (pc-testdev).
pub const EDGE_LINE: u32 = 14;
pub const LEVEL_LINE: u32 = 15;

/// Restore a quiet, known state on all CPUs after a scenario.
pub fn cleanup() {
    cpu::cli();
    ioapic::set_line(EDGE_LINE, false);
    ioapic::set_line(LEVEL_LINE, false);
    ioapic::mask_all();
    apic::write(apic::LVT_TIMER, apic::LVT_MASKED | 0x30);
    apic::write(apic::TIMER_ICR, 0);
    if cpu::has_tsc_deadline() {
        cpu::wrmsr_safe(cpu::MSR_TSC_DEADLINE, 0);
    }
    idt::clear_handlers();
    time::settle(time::ms(2));
    apic::reset_local();
    for ap in percpu::aps() {
        smp::run_on(ap, smp::ap_reset, 0);
    }
    time::settle(time::ms(1));
    apic::drain_isr();
}

// ---------------------------------------------------------------------------
// Delivery accounting helpers
// ---------------------------------------------------------------------------

/// Per-CPU counts of `v` right now.
pub fn counts(v: u8) -> [u32; MAX_CPUS] {
    core::array::from_fn(|i| CPUS[i].count(v))
}

/// Expect exactly `want(cpu)` deliveries of `v` since `before` on every
/// online CPU (`None` = don't care). Waits (BSP IF=1) until the expected
/// deliveries arrived, then lets the system settle and checks for extras.
pub fn expect_delivery(
    v: u8,
    before: &[u32; MAX_CPUS],
    want: impl Fn(usize) -> Option<u32>,
    what: &str,
) -> Res {
    let got = |c: usize| CPUS[c].count(v).wrapping_sub(before[c]);
    time::wait_irq(time::timeout(), || {
        percpu::online().all(|c| want(c).is_none_or(|w| got(c) >= w))
    });
    time::settle(time::settle_time());
    for c in percpu::online() {
        if let Some(w) = want(c) {
            let g = got(c);
            ensure!(
                g == w,
                "{}: cpu {} got vector {:#x} {} times, expected {}",
                what,
                c,
                v,
                g,
                w
            );
        }
    }
    Ok(())
}

/// Run `send`, then [`expect_delivery`].
pub fn deliver(
    v: u8,
    want: impl Fn(usize) -> Option<u32>,
    what: &str,
    send: impl FnOnce() -> Res,
) -> Res {
    let before = counts(v);
    send()?;
    expect_delivery(v, &before, want, what)
}

/// `want` closure: exactly one delivery on `cpu`, none elsewhere.
pub fn only(cpu: usize) -> impl Fn(usize) -> Option<u32> {
    move |c| Some((c == cpu) as u32)
}

/// Make AP `cpu` send an IPI.
pub fn remote_ipi(cpu: usize, dest: u32, lo: u32) -> Res {
    match smp::run_on(cpu, smp::ap_send_ipi, ((dest as u64) << 32) | lo as u64) {
        Some(_) => Ok(()),
        None => fail!("cpu {} did not answer its mailbox", cpu),
    }
}

/// Run `f(arg)` on `cpu` (directly if it is the BSP).
pub fn on_cpu(cpu: usize, f: smp::ApFn, arg: u64) -> Result<u64, Verdict> {
    if cpu == percpu::bsp() {
        return Ok(f(arg));
    }
    match smp::run_on(cpu, f, arg) {
        Some(r) => Ok(r),
        None => fail!("cpu {} did not answer its mailbox", cpu),
    }
}

// ---------------------------------------------------------------------------
// Event log (ordering checks)
// ---------------------------------------------------------------------------

pub const ENTER: u16 = 0x100;
pub const EXIT: u16 = 0x200;

/// Fixed-size log of handler entries/exits (`ENTER|v`, `EXIT|v`).
pub struct Log {
    n: AtomicUsize,
    e: [AtomicU16; 64],
}

impl Log {
    pub const fn new() -> Self {
        Log {
            n: AtomicUsize::new(0),
            e: [const { AtomicU16::new(0) }; 64],
        }
    }

    pub fn clear(&self) {
        self.n.store(0, SeqCst);
    }

    pub fn push(&self, kind: u16, v: u8) {
        let i = self.n.fetch_add(1, SeqCst);
        if i < self.e.len() {
            self.e[i].store(kind | v as u16, SeqCst);
        }
    }

    pub fn len(&self) -> usize {
        self.n.load(SeqCst)
    }

    pub fn matches(&self, want: &[u16]) -> bool {
        self.len() == want.len()
            && want
                .iter()
                .enumerate()
                .all(|(i, &w)| self.e[i].load(SeqCst) == w)
    }
}

impl fmt::Display for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.len().min(self.e.len());
        for i in 0..n {
            let x = self.e[i].load(SeqCst);
            let k = if x & ENTER != 0 { '+' } else { '-' };
            write!(f, "{}{}{:02x}", if i > 0 { " " } else { "" }, k, x & 0xFF)?;
        }
        Ok(())
    }
}

/// Formats an expected log sequence like [`Log`] does.
pub struct Seq<'a>(pub &'a [u16]);

impl fmt::Display for Seq<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &x) in self.0.iter().enumerate() {
            let k = if x & ENTER != 0 { '+' } else { '-' };
            write!(f, "{}{}{:02x}", if i > 0 { " " } else { "" }, k, x & 0xFF)?;
        }
        Ok(())
    }
}

/// Record (as a note) a mismatch between the ISR and the expected set.
pub fn expect_isr(at: &str, v: u8, want: &[u8]) {
    let isr = apic::isr();
    let w = apic::bitmap_of(want);
    if isr != w {
        note!(
            "{} {:#x}: ISR {} expected {}",
            at,
            v,
            apic::Vectors(isr),
            apic::Vectors(w)
        );
    }
}

/// Record (as a note) a PPR mismatch.
pub fn expect_ppr(at: &str, v: u8, want: u32) {
    let p = apic::read(apic::PPR) & 0xFF;
    if p != want {
        note!("{} {:#x}: PPR {:#x} expected {:#x}", at, v, p, want);
    }
}

/// FAIL if the BSP's ISR is not empty.
pub fn ensure_isr_empty(at: &str) -> Res {
    let isr = apic::isr();
    ensure!(
        isr.iter().all(|&w| w == 0),
        "{}: ISR not empty: {}",
        at,
        apic::Vectors(isr)
    );
    Ok(())
}
