//! One local APIC ([`LocalApic`]): its state, identity, priority and time; the rest
//! of its behaviour lives in the submodules, one concept each. PPR and the EOI vector
//! come from ISR0–7 alone.
//!
//! * `config`: [`LapicConfig`], [`ApicMode`], [`GpFault`];
//! * `effects`: what operations report back ([`Effects`], [`Events`], [`Stats`]);
//! * `accept`: interrupt arrival, acceptance and EOI, LINT/LVT sources, ESR, IPIs;
//! * `registers`: register semantics, shared by the xAPIC page (`mmio.rs`) and the
//!   x2APIC MSRs ([`crate::x2apic`]);
//! * `apic_base`: IA32_APIC_BASE and the resets.

mod accept;
mod apic_base;
mod config;
mod effects;
mod registers;

pub use config::{ApicMode, GpFault, LapicConfig};
pub use effects::{Effects, Events, Stats};

use crate::lvt::{self, Lvt, TimerMode, LVT_MASKED};
use crate::priority;
use crate::regs::*;
use crate::timer::Timer;
use crate::vector_set::{ClassSummarySet, WordSummarySet};
#[cfg(feature = "verify")]
use crate::verifier::Verifier;
use crate::VectorSet;

/// One emulated local APIC. See the crate docs for the model.
///
/// ```
/// use vlapic::{LocalApic, LapicConfig, Delivery};
/// let mut apic = LocalApic::new(LapicConfig::default());
/// apic.write_register(0xF0, 0x1FF, 0); // software-enable (SVR)
/// apic.deliver(Delivery::fixed(0x41), 0);
/// apic.deliver(Delivery::fixed(0x61), 0);
/// assert_eq!(apic.acknowledge(), Some(0x61));
/// assert_eq!(apic.ppr(), 0x60);
/// assert_eq!(apic.pending_vector(), None); // 0x41 is below PPR's class
/// let _ = apic.write_register(0xB0, 0, 0); // EOI
/// assert_eq!(apic.acknowledge(), Some(0x41));
/// ```
#[derive(Clone, Debug)]
pub struct LocalApic {
    pub(crate) cfg: LapicConfig,
    pub(crate) apic_base: u64,
    /// Current APIC ID: the initial ID in x2APIC mode; guest-writable 8 bits in xAPIC.
    pub(crate) id: u32,
    pub(crate) tpr: u8,
    pub(crate) apr: u8,
    /// xAPIC LDR; in x2APIC mode LDR is derived from the ID and this is unused.
    pub(crate) ldr: u32,
    pub(crate) dfr: u32,
    pub(crate) svr: u32,
    /// ISR0–7, with a derived per-class summary for the highest-vector lookup.
    pub(crate) isr: ClassSummarySet,
    pub(crate) tmr: VectorSet,
    /// IRR0–7, with a derived per-word summary for the highest-vector lookup.
    pub(crate) irr: WordSummarySet,
    pub(crate) esr: u32,
    pub(crate) esr_pending: u32,
    pub(crate) icr: u64,
    pub(crate) lvt: [u32; 7],
    pub(crate) timer: Timer,
    /// Latest VM time seen (time never runs backwards here).
    pub(crate) now: u64,
    /// Electrical level of LINT0/LINT1.
    pub(crate) lint: [bool; 2],
    pub(crate) events: Events,
    /// True only while the error LVT is being delivered (XSA-462 recursion guard).
    pub(crate) delivering_error: bool,
    pub(crate) stats: Stats,
    #[cfg(feature = "verify")]
    pub(crate) verifier: Verifier,
    /// Interrupt trace events waiting for the embedder (not architectural state).
    #[cfg(feature = "trace")]
    pub(crate) trace: crate::trace::TraceRing,
}

impl LocalApic {
    /// A local APIC in its power-up state.
    pub fn new(cfg: LapicConfig) -> Self {
        let mut apic = Self {
            cfg,
            apic_base: cfg.reset_apic_base(),
            id: cfg.apic_id,
            tpr: 0,
            apr: 0,
            ldr: 0,
            dfr: DFR_FLAT,
            svr: 0xFF,
            isr: ClassSummarySet::EMPTY,
            tmr: VectorSet::EMPTY,
            irr: WordSummarySet::EMPTY,
            esr: 0,
            esr_pending: 0,
            icr: 0,
            lvt: [lvt::LVT_RESET; 7],
            timer: Timer::default(),
            now: 0,
            lint: [false; 2],
            events: Events::default(),
            delivering_error: false,
            stats: Stats::default(),
            #[cfg(feature = "verify")]
            verifier: Verifier::new(cfg.verify),
            #[cfg(feature = "trace")]
            trace: crate::trace::TraceRing::default(),
        };
        apic.reset_registers();
        apic
    }

    // ----- identity and mode -------------------------------------------------

    /// The configuration this APIC was built with.
    pub fn config(&self) -> &LapicConfig {
        &self.cfg
    }

    /// Current mode.
    #[inline]
    pub fn mode(&self) -> ApicMode {
        // apic_base is only ever set to values with a valid EN/EXTD pair.
        ApicMode::from_apic_base(self.apic_base).unwrap_or(ApicMode::Disabled)
    }

    /// IA32_APIC_BASE.
    pub fn apic_base(&self) -> u64 {
        self.apic_base
    }

    /// Physical address of the xAPIC page while in xAPIC mode (relocation is
    /// supported: route MMIO by this address).
    pub fn mmio_base(&self) -> Option<u64> {
        (self.mode() == ApicMode::XApic).then_some(self.apic_base & !0xFFF & !(1u64 << 63))
    }

    /// The APIC ID as routing sees it: 32 bits in x2APIC mode, 8 in xAPIC mode.
    pub fn id(&self) -> u32 {
        match self.mode() {
            ApicMode::X2Apic => self.id,
            _ => self.id & 0xFF,
        }
    }

    /// The logical destination register as routing sees it (derived in x2APIC mode).
    pub fn ldr(&self) -> u32 {
        match self.mode() {
            ApicMode::X2Apic => x2apic_ldr(self.id),
            _ => self.ldr,
        }
    }

    /// The destination format register (xAPIC meaning; all ones in x2APIC mode).
    pub fn dfr(&self) -> u32 {
        self.dfr
    }

    /// Whether the APIC is hardware-enabled (IA32_APIC_BASE.EN).
    #[inline]
    pub fn is_hardware_enabled(&self) -> bool {
        self.apic_base & APIC_BASE_EN != 0
    }

    /// Whether the APIC is software-enabled (SVR bit 8) and hardware-enabled.
    #[inline]
    pub fn is_enabled(&self) -> bool {
        self.is_hardware_enabled() && self.svr & SVR_ENABLE != 0
    }

    /// The version register.
    pub fn version(&self) -> u32 {
        self.cfg.version()
    }

    // ----- priority ----------------------------------------------------------

    /// Task priority register.
    pub fn tpr(&self) -> u8 {
        self.tpr
    }

    /// Processor priority, derived from TPR and ISR0–7 (SDM §11.8.3.1) on every call.
    /// ISR's highest vector is found through its derived class summary (issue 14).
    #[inline]
    pub fn ppr(&self) -> u8 {
        priority::priority_from_isrv(self.tpr, self.isr.highest().unwrap_or(0))
    }

    /// CR8 as the guest reads it: `TPR[7:4]` (SDM §10.8.6.1 / §11.8.6.1).
    pub fn cr8(&self) -> u64 {
        u64::from(self.tpr >> 4)
    }

    /// MOV to CR8: TPR = `CR8[3:0]` << 4. Bits 63:4 set is #GP.
    pub fn set_cr8(&mut self, cr8: u64) -> Result<(), GpFault> {
        if cr8 > 0xF {
            return Err(GpFault);
        }
        self.set_tpr((cr8 as u8) << 4);
        Ok(())
    }

    pub(crate) fn set_tpr(&mut self, tpr: u8) {
        #[cfg(feature = "trace")]
        if tpr != self.tpr {
            trace_event!(self, crate::trace::TraceKind::Tpr { tpr });
        }
        self.tpr = tpr;
        #[cfg(feature = "verify")]
        self.verifier.on_tpr_change(&self.isr);
    }

    // ----- registers as state ------------------------------------------------

    /// In-service register.
    pub fn isr(&self) -> &VectorSet {
        &self.isr
    }

    /// Interrupt-request register.
    pub fn irr(&self) -> &VectorSet {
        &self.irr
    }

    /// Trigger-mode register.
    pub fn tmr(&self) -> &VectorSet {
        &self.tmr
    }

    /// An LVT entry as stored (delivery status not included).
    pub fn lvt(&self, entry: Lvt) -> u32 {
        self.lvt.get(entry.index()).copied().unwrap_or(LVT_MASKED)
    }

    /// The visible error status register.
    pub fn esr(&self) -> u32 {
        self.esr
    }

    /// Errors latched since the last ESR write, not yet visible.
    pub fn esr_pending(&self) -> u32 {
        self.esr_pending
    }

    /// The timer.
    pub fn timer(&self) -> &Timer {
        &self.timer
    }

    /// The timer mode selected by LVT timer (reserved mode 11 never stored).
    pub fn timer_mode(&self) -> TimerMode {
        TimerMode::from_lvt(self.lvt(Lvt::Timer)).unwrap_or(TimerMode::OneShot)
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Latest VM time the APIC has seen.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Whether every derived cache equals a fresh derivation from the architectural
    /// registers: the summaries of ISR and IRR (which `ppr`, `pending_vector`,
    /// `acknowledge` and EOI read) and, with the `verify` feature, the verifier's
    /// shadow set. Always true unless this crate has a bug; the property tests assert
    /// it after every operation, and a fuzzer may too.
    pub fn caches_consistent(&self) -> bool {
        let sets = self.isr.is_consistent() && self.irr.is_consistent();
        #[cfg(feature = "verify")]
        let sets = sets && self.verifier.is_consistent();
        sets
    }

    // ----- verifier ----------------------------------------------------------

    /// The nesting verifier.
    #[cfg(feature = "verify")]
    #[cfg_attr(docsrs, doc(cfg(feature = "verify")))]
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// Turns the nesting verifier on (rebuilt from ISR) or off.
    #[cfg(feature = "verify")]
    #[cfg_attr(docsrs, doc(cfg(feature = "verify")))]
    pub fn set_verifier_enabled(&mut self, on: bool) {
        self.verifier.set_enabled(on, &self.isr);
    }

    /// Resets the verifier's counters (the shadow is rebuilt from ISR).
    #[cfg(feature = "verify")]
    #[cfg_attr(docsrs, doc(cfg(feature = "verify")))]
    pub fn clear_verifier_counters(&mut self) {
        self.verifier.clear_counters(&self.isr);
    }

    /// Checks the verifier's whole shadow stack against ISR now (the per-step checks
    /// are O(1); see the [`verifier`](crate::verifier) module). Returns whether it held; a violation is
    /// recorded as usual. Does nothing (and returns true) while the verifier is off.
    #[cfg(feature = "verify")]
    pub fn audit_verifier(&mut self) -> bool {
        self.verifier.audit(&self.isr)
    }

    #[inline(always)]
    fn verify_rebuild(&mut self) {
        #[cfg(feature = "verify")]
        self.verifier.rebuild(&self.isr);
    }

    // ----- trace (feature `trace`) --------------------------------------------

    /// Starts or stops recording [`trace`](crate::trace) events (off at creation).
    #[cfg(feature = "trace")]
    #[cfg_attr(docsrs, doc(cfg(feature = "trace")))]
    pub fn set_trace_enabled(&mut self, on: bool) {
        self.trace.set_enabled(on);
    }

    /// The trace ring: whether it records, how many events wait, how many were lost.
    #[cfg(feature = "trace")]
    #[cfg_attr(docsrs, doc(cfg(feature = "trace")))]
    pub fn trace(&self) -> &crate::trace::TraceRing {
        &self.trace
    }

    /// Hands every recorded trace event to `f`, oldest first, and empties the ring.
    #[cfg(feature = "trace")]
    #[cfg_attr(docsrs, doc(cfg(feature = "trace")))]
    pub fn drain_trace(&mut self, f: impl FnMut(crate::trace::TraceEvent)) {
        self.trace.drain(f);
    }

    /// Notes where the next delivery to this APIC comes from (the fabric calls this
    /// under the same lock, just before [`LocalApic::deliver`]).
    #[cfg(feature = "trace")]
    #[cfg_attr(docsrs, doc(cfg(feature = "trace")))]
    pub fn set_trace_source(&mut self, source: crate::trace::Source) {
        self.trace.set_source(source);
    }

    // ----- time --------------------------------------------------------------

    /// Brings the APIC to VM time `now` (never backwards) and delivers a timer
    /// expiry that is due. Returns whether the timer expired.
    #[inline]
    pub fn advance(&mut self, now: u64) -> bool {
        if now > self.now {
            self.now = now;
        }
        // Cheap check first (issue 14): nothing to do unless armed and due.
        match self.timer.deadline() {
            Some(deadline) if deadline <= self.now => self.expire_timer(),
            _ => false,
        }
    }

    /// The timer is due: reload or disarm it and deliver the LVT timer interrupt.
    #[cold]
    #[inline(never)]
    fn expire_timer(&mut self) -> bool {
        let min_period_ns = u64::from(self.cfg.min_timer_period_us).saturating_mul(1_000);
        let exp = self
            .timer
            .expire(self.now, self.timer_mode(), &self.cfg.clock, min_period_ns);
        if exp.fired {
            self.stats.timer_expired = self.stats.timer_expired.saturating_add(1);
            self.stats.timer_missed = self.stats.timer_missed.saturating_add(exp.missed);
            self.deliver_lvt(Lvt::Timer);
        }
        exp.fired
    }

    /// Absolute VM time at which the timer next needs [`LocalApic::advance`]; `None`
    /// when no timer runs or when its expiry would change nothing: the LVT timer is
    /// masked, or its vector already waits in IRR as an edge interrupt (a TPR- or
    /// IF-blocked guest), so another expiry would only set the same bit. The timer
    /// still counts: TMCCT, IA32_TSC_DEADLINE and the periodic phase are brought up to
    /// date by every call that takes `now`. The answer changes with the LVT timer
    /// (reported as `timer_changed`) and when the vector leaves IRR
    /// ([`LocalApic::acknowledge`], [`LocalApic::plan_entry`]), so re-read it before
    /// every guest entry ([`crate::EntryPlan::timer_deadline`] is this after the
    /// acknowledge), and advance to the current time before acknowledging.
    pub fn next_timer_deadline(&self) -> Option<u64> {
        let deadline = self.timer.deadline()?;
        let lvt = self.lvt(Lvt::Timer);
        let vector = lvt::vector(lvt);
        let idle = lvt::is_masked(lvt) || (self.irr.contains(vector) && !self.tmr.contains(vector));
        (!idle).then_some(deadline)
    }
}
