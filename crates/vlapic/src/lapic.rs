//! One local APIC: interrupt arrival, acceptance and EOI, priority, LVTs, ESR,
//! IA32_APIC_BASE and resets. PPR and the EOI vector come from ISR0–7 alone.
//!
//! The xAPIC page (`mmio.rs`) and the x2APIC MSRs ([`crate::x2apic`]) are
//! two access paths onto the register semantics defined here.

use crate::delivery::{Delivery, DeliveryMode};
use crate::icr::{self, IcrCommand, IpiMessage};
use crate::lvt::{
    self, Lvt, TimerMode, LVT_DELIVERY_STATUS, LVT_LEVEL, LVT_MASKED, LVT_REMOTE_IRR,
};
use crate::priority;
use crate::regs::*;
use crate::timer::{Timer, TimerClock};
use crate::vector_set::{ClassSummarySet, WordSummarySet};
#[cfg(feature = "verify")]
use crate::verifier::Verifier;
use crate::VectorSet;
use core::fmt;

/// The APIC's operating mode, from IA32_APIC_BASE EN and EXTD (SDM §11.12.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ApicMode {
    /// EN = 0: globally disabled; the APIC is invisible.
    Disabled,
    /// EN = 1, EXTD = 0: xAPIC, registers in the MMIO page.
    XApic,
    /// EN = 1, EXTD = 1: x2APIC, registers in MSRs 0x800–0x8FF.
    X2Apic,
}

impl ApicMode {
    /// The mode an IA32_APIC_BASE value selects; EN = 0 with EXTD = 1 is invalid.
    pub const fn from_apic_base(base: u64) -> Option<Self> {
        match (base & APIC_BASE_EN != 0, base & APIC_BASE_EXTD != 0) {
            (false, false) => Some(ApicMode::Disabled),
            (true, false) => Some(ApicMode::XApic),
            (true, true) => Some(ApicMode::X2Apic),
            (false, true) => None,
        }
    }
}

/// Construction-time description of an APIC: what the virtual CPU offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LapicConfig {
    /// Initial APIC ID (the x2APIC ID; xAPIC mode shows its low 8 bits).
    pub apic_id: u32,
    /// Bootstrap processor (IA32_APIC_BASE bit 8).
    pub bsp: bool,
    /// Mode after power-up reset.
    pub mode: ApicMode,
    /// x2APIC mode is offered (CPUID.1:ECX bit 21); otherwise EXTD is reserved.
    pub x2apic: bool,
    /// TSC-deadline timer mode is offered (CPUID.1:ECX bit 24).
    pub tsc_deadline: bool,
    /// EOI-broadcast suppression is offered (version bit 24, SVR bit 12).
    pub eoi_broadcast_suppression: bool,
    /// LVT CMCI exists (max LVT entry 6 instead of 5).
    pub cmci: bool,
    /// Physical-address width: IA32_APIC_BASE bits at and above it are reserved.
    pub max_phys_addr: u8,
    /// Timer and TSC time base.
    pub clock: TimerClock,
    /// Minimum spacing of periodic timer expiries in microseconds (KVM's
    /// `min_timer_period_us`, default 200; 0 disables it). A guest programming a
    /// shorter period gets its interrupts this far apart; TMCCT still counts with the
    /// architectural period. One-shot and TSC-deadline modes are not limited.
    pub min_timer_period_us: u32,
    /// Run the nesting verifier from the start (feature `verify`).
    pub verify: bool,
}

impl Default for LapicConfig {
    fn default() -> Self {
        Self {
            apic_id: 0,
            bsp: true,
            mode: ApicMode::XApic,
            x2apic: true,
            tsc_deadline: true,
            eoi_broadcast_suppression: true,
            cmci: true,
            max_phys_addr: 46,
            clock: TimerClock::default(),
            min_timer_period_us: 200,
            verify: false,
        }
    }
}

impl LapicConfig {
    /// A configuration for the APIC with this initial ID, not the BSP unless ID 0.
    pub fn with_id(apic_id: u32) -> Self {
        Self {
            apic_id,
            bsp: apic_id == 0,
            ..Self::default()
        }
    }

    /// IA32_APIC_BASE after power-up: default base, EN (and EXTD) per `mode`, BSP.
    pub fn reset_apic_base(&self) -> u64 {
        let mut base = DEFAULT_APIC_BASE;
        if self.bsp {
            base |= APIC_BASE_BSP;
        }
        match self.mode {
            ApicMode::Disabled => {}
            ApicMode::XApic => base |= APIC_BASE_EN,
            ApicMode::X2Apic => base |= APIC_BASE_EN | if self.x2apic { APIC_BASE_EXTD } else { 0 },
        }
        base
    }

    /// The version register this configuration yields.
    pub fn version(&self) -> u32 {
        let max_lvt: u32 = if self.cmci { 6 } else { 5 };
        VERSION_NUMBER
            | max_lvt << 16
            | if self.eoi_broadcast_suppression {
                VERSION_EOI_SUPPRESSION
            } else {
                0
            }
    }

    /// Bits of SVR software may set: vector, APIC enable, focus disable, and EOI-broadcast
    /// suppression when offered.
    pub fn svr_writable(&self) -> u32 {
        let mut mask = 0xFF | SVR_ENABLE | SVR_FOCUS_DISABLE;
        if self.eoi_broadcast_suppression {
            mask |= SVR_SUPPRESS_EOI_BROADCAST;
        }
        mask
    }

    /// Bits of IA32_APIC_BASE a write may not set.
    pub fn apic_base_reserved(&self) -> u64 {
        let width = u32::from(self.max_phys_addr.clamp(12, 63));
        let addr = (1u64 << width).wrapping_sub(1) & !0xFFF;
        let ext = if self.x2apic { APIC_BASE_EXTD } else { 0 };
        !(addr | APIC_BASE_BSP | APIC_BASE_EN | ext)
    }
}

/// The #GP(0) a RDMSR/WRMSR (or MOV to CR8) must raise in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GpFault;

impl fmt::Display for GpFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("general-protection fault #GP(0)")
    }
}

#[cfg(feature = "std")]
#[cfg_attr(docsrs, doc(cfg(feature = "std")))]
impl std::error::Error for GpFault {}

/// Side effects of one register access, returned to the embedder instead of being
/// performed by calls into other objects.
#[must_use = "an IPI or an IOAPIC EOI may need routing"]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Effects {
    /// An interrupt message for the fabric to route (never a self-only IPI).
    pub ipi: Option<IpiMessage>,
    /// A level-triggered vector was EOI'd: broadcast it to the IOAPIC(s).
    pub eoi: Option<u8>,
    /// The timer was written: re-read [`LocalApic::next_timer_deadline`].
    pub timer_changed: bool,
    /// ID, LDR, DFR, software enable, mode or base changed: routing tables are stale.
    pub routing_changed: bool,
}

/// Non-vectored events waiting for the vCPU, taken with [`LocalApic::take_events`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Events {
    /// NMIs pending, 0 to 2: NMIs are edge events, and a core can be handed one while
    /// it latches a second that arrived before the first was taken (SDM Vol. 3A §6.7.1);
    /// more collapse. The VMM injects each (KVM queues up to two the same way).
    pub nmi: u8,
    /// An SMI is pending.
    pub smi: bool,
    /// An INIT arrived: the APIC was reset (keeping its mode and ID); the vCPU must
    /// enter wait-for-SIPI.
    pub init: bool,
    /// The start page of the last SIPI (the VMM honours it only in wait-for-SIPI).
    pub sipi: Option<u8>,
    /// An ExtINT is pending: the vector comes from the embedder's 8259.
    pub extint: bool,
}

impl Events {
    /// Whether any event is pending.
    pub fn any(&self) -> bool {
        self.nmi > 0 || self.smi || self.init || self.sipi.is_some() || self.extint
    }
}

/// Counters of unusual but legal guest behaviour; never load-bearing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Stats {
    /// EOIs with nothing in service.
    pub spurious_eoi: u64,
    /// Interrupts accepted into ISR.
    pub accepted: u64,
    /// Fixed interrupts refused because the APIC was software- or hardware-disabled.
    pub refused_disabled: u64,
    /// ICR writes that sent nothing (invalid combination, reserved mode, INIT de-assert).
    pub ipi_dropped: u64,
    /// Timer expiries processed: delivered, dropped by the mask, or re-setting a
    /// vector already in IRR.
    pub timer_expired: u64,
    /// Periodic expiries (at the period, or the minimum period if longer) that
    /// passed without being processed one by one: time was reported late, or no
    /// deadline was reported because the expiry would have changed nothing.
    pub timer_missed: u64,
    /// Accesses to reserved xAPIC offsets.
    pub reserved_access: u64,
    /// xAPIC accesses ignored for their size or alignment, or in the wrong mode.
    pub ignored_access: u64,
}

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
    delivering_error: bool,
    pub(crate) stats: Stats,
    #[cfg(feature = "verify")]
    pub(crate) verifier: Verifier,
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
    /// are O(1); see [`Verifier::audit`]). Returns whether it held; a violation is
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

    // ----- interrupt arrival, acceptance, EOI --------------------------------

    /// An interrupt message arrives for this APIC (from the fabric, an IOAPIC or an
    /// MSI). Returns whether it was taken, i.e. whether the vCPU may need a kick.
    ///
    /// Fixed and lowest-priority interrupts are refused by a software-disabled APIC
    /// and set ESR receive-illegal-vector for vectors 0–15 (SDM §11.5.3, §11.4.7.2).
    /// A hardware-disabled APIC takes nothing. INIT resets the APIC at once,
    /// keeping its mode and ID (SDM §11.4.7.3).
    #[inline]
    pub fn deliver(&mut self, d: Delivery, now: u64) -> bool {
        self.advance(now);
        if let DeliveryMode::Fixed | DeliveryMode::LowestPriority = d.mode {
            // accept_vector refuses (and counts) a hardware-disabled APIC too.
            return self.accept_vector(d.vector, d.level_triggered);
        }
        self.deliver_event(d)
    }

    /// [`LocalApic::deliver`] for the non-vectored modes.
    fn deliver_event(&mut self, d: Delivery) -> bool {
        if !self.is_hardware_enabled() {
            self.stats.refused_disabled = self.stats.refused_disabled.saturating_add(1);
            return false;
        }
        match d.mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                self.accept_vector(d.vector, d.level_triggered)
            }
            DeliveryMode::Nmi => {
                self.post_nmi();
                true
            }
            DeliveryMode::Smi => {
                self.events.smi = true;
                true
            }
            DeliveryMode::Init => {
                self.init_reset();
                true
            }
            DeliveryMode::StartUp => {
                self.events.sipi = Some(d.vector);
                true
            }
            DeliveryMode::ExtInt => {
                self.events.extint = true;
                true
            }
        }
    }

    /// Sets IRR for a fixed interrupt, TMR first (illumos 13007: the trigger mode is
    /// visible before the vector can be injected).
    #[inline]
    pub(crate) fn accept_vector(&mut self, vector: u8, level: bool) -> bool {
        if !self.is_enabled() {
            self.stats.refused_disabled = self.stats.refused_disabled.saturating_add(1);
            return false;
        }
        if vector < 16 {
            self.receive_illegal_vector();
            return false;
        }
        self.tmr.assign(vector, level);
        self.irr.insert(vector);
        true
    }

    #[cold]
    #[inline(never)]
    fn receive_illegal_vector(&mut self) {
        self.signal_error(ESR_RECEIVE_ILLEGAL_VECTOR);
    }

    /// The vector the APIC would hand to the core now: the highest IRR vector, if
    /// its class is above PPR's (SDM §11.8.3.1).
    #[inline]
    pub fn pending_vector(&self) -> Option<u8> {
        let v = self.irr.highest()?;
        (priority::class(v) > self.ppr_class()).then_some(v)
    }

    /// PPR[7:4] = max(TPR[7:4], ISRV[7:4]) (SDM §11.8.3.1), ISRV's class read from
    /// ISR's derived class summary: what [`LocalApic::ppr`] would give, shifted.
    #[inline(always)]
    fn ppr_class(&self) -> u8 {
        priority::class(self.tpr).max(self.isr.top_class())
    }

    /// Whether the vCPU has anything to take: a deliverable vector or an event.
    /// A halted vCPU wakes on this.
    pub fn has_work(&self) -> bool {
        self.pending_vector().is_some() || self.events.any()
    }

    /// The core takes the pending vector (INTA): IRR → ISR. PPR rises to the
    /// vector's class as a consequence of the ISR bit. Returns the vector.
    #[inline(always)]
    pub fn acknowledge(&mut self) -> Option<u8> {
        let v = self.pending_vector()?;
        self.irr.remove(v);
        self.isr.insert(v);
        // One per accepted interrupt: a u64 cannot wrap in any VM's lifetime (584
        // years at 10^9 a second), so the plain increment skips saturation's compare.
        self.stats.accepted = self.stats.accepted.wrapping_add(1);
        #[cfg(feature = "verify")]
        self.verifier.on_accept(v, &self.isr);
        Some(v)
    }

    /// EOI: retires the highest in-service vector (from ISR, SDM §11.8.5). Returns it
    /// if it was level-triggered and EOI broadcast is not suppressed, for the IOAPIC.
    #[inline]
    pub(crate) fn eoi(&mut self) -> Option<u8> {
        let Some(v) = self.isr.pop_highest() else {
            self.stats.spurious_eoi = self.stats.spurious_eoi.saturating_add(1);
            return None;
        };
        #[cfg(feature = "verify")]
        self.verifier.on_eoi(v, &self.isr);
        if !self.tmr.contains(v) {
            return None;
        }
        self.level_eoi(v)
    }

    /// The level-triggered half of an EOI: LINT0 remote IRR, and the broadcast.
    #[inline(never)]
    fn level_eoi(&mut self, v: u8) -> Option<u8> {
        self.lint_eoi(v);
        (self.svr & SVR_SUPPRESS_EOI_BROADCAST == 0).then_some(v)
    }

    /// Records one more NMI (at most two wait: one to take, one latched).
    fn post_nmi(&mut self) {
        self.events.nmi = self.events.nmi.saturating_add(1).min(2);
    }

    /// Non-vectored events, cleared by this call.
    pub fn take_events(&mut self) -> Events {
        core::mem::take(&mut self.events)
    }

    /// Non-vectored events, left pending.
    pub fn events(&self) -> &Events {
        &self.events
    }

    // ----- local interrupt sources -------------------------------------------

    /// Drives LINT0 (`pin` 0) or LINT1 (`pin` 1) to an electrical level. The LVT's
    /// polarity decides what "asserted" means. Edge-triggered entries fire on the
    /// inactive→active transition; a level-triggered fixed LINT0 sets remote IRR on
    /// acceptance and re-delivers after EOI while still asserted (SDM §11.5.1; LINT1
    /// is always edge). With the APIC hardware-disabled, LINT0 acts as INTR (ExtINT)
    /// and LINT1 as NMI (SDM §11.4.3). Returns whether something was delivered.
    pub fn set_lint(&mut self, pin: u8, level: bool, now: u64) -> bool {
        self.advance(now);
        let (entry, idx) = match pin {
            0 => (Lvt::Lint0, 0usize),
            1 => (Lvt::Lint1, 1usize),
            _ => return false,
        };
        let Some(prev_level) = self.lint.get(idx).copied() else {
            return false;
        };
        if let Some(l) = self.lint.get_mut(idx) {
            *l = level;
        }
        if !self.is_hardware_enabled() {
            if level && !prev_level {
                if entry == Lvt::Lint1 {
                    self.post_nmi();
                } else {
                    self.events.extint = true;
                }
                return true;
            }
            return false;
        }
        let value = self.lvt(entry);
        let active_low = value & lvt::LVT_POLARITY_LOW != 0;
        let active = level != active_low;
        let was_active = prev_level != active_low;
        if self.is_level_fixed_lint(entry, value) {
            return active && self.deliver_level_lint(entry);
        }
        if active && !was_active {
            return self.deliver_lvt(entry);
        }
        false
    }

    /// A thermal, performance-counter or CMCI event (the embedder's device model
    /// raises it). Delivered per the LVT entry; masked entries drop it.
    pub fn raise_local(&mut self, entry: Lvt, now: u64) -> bool {
        self.advance(now);
        match entry {
            Lvt::Thermal | Lvt::Perf => self.deliver_lvt(entry),
            Lvt::Cmci if self.cfg.cmci => self.deliver_lvt(entry),
            _ => false,
        }
    }

    fn is_level_fixed_lint(&self, entry: Lvt, value: u32) -> bool {
        entry == Lvt::Lint0
            && value & LVT_LEVEL != 0
            && entry.delivery_mode(value) == Some(DeliveryMode::Fixed)
    }

    fn deliver_level_lint(&mut self, entry: Lvt) -> bool {
        let value = self.lvt(entry);
        if lvt::is_masked(value) || value & LVT_REMOTE_IRR != 0 {
            return false;
        }
        if self.accept_vector(lvt::vector(value), true) {
            self.set_lvt_bits(entry, LVT_REMOTE_IRR, true);
            return true;
        }
        false
    }

    /// A level EOI of `vector`: clear a matching LINT remote IRR and re-deliver if
    /// the pin is still asserted.
    fn lint_eoi(&mut self, vector: u8) {
        let value = self.lvt(Lvt::Lint0);
        if value & LVT_REMOTE_IRR != 0 && lvt::vector(value) == vector {
            self.set_lvt_bits(Lvt::Lint0, LVT_REMOTE_IRR, false);
            let active = self.lint[0] != (value & lvt::LVT_POLARITY_LOW != 0);
            if active && self.is_level_fixed_lint(Lvt::Lint0, value) {
                self.deliver_level_lint(Lvt::Lint0);
            }
        }
    }

    fn set_lvt_bits(&mut self, entry: Lvt, bits: u32, on: bool) {
        if let Some(v) = self.lvt.get_mut(entry.index()) {
            if on {
                *v |= bits
            } else {
                *v &= !bits
            }
        }
    }

    /// Delivers an LVT entry's interrupt to this APIC (edge-triggered).
    pub(crate) fn deliver_lvt(&mut self, entry: Lvt) -> bool {
        let value = self.lvt(entry);
        if lvt::is_masked(value) {
            return false;
        }
        match entry.delivery_mode(value) {
            Some(DeliveryMode::Fixed) => self.accept_vector(lvt::vector(value), false),
            Some(DeliveryMode::Nmi) => {
                self.post_nmi();
                true
            }
            Some(DeliveryMode::Smi) => {
                self.events.smi = true;
                true
            }
            Some(DeliveryMode::ExtInt) => {
                self.events.extint = true;
                true
            }
            Some(DeliveryMode::Init) => {
                self.init_reset();
                true
            }
            _ => false,
        }
    }

    // ----- errors ------------------------------------------------------------

    /// Latches error bits; newly set bits fire the error LVT once. Delivering the
    /// error LVT can itself set receive-illegal-vector (vector < 16); the guard makes
    /// that a single nested latch, never a recursion (Xen XSA-462).
    pub(crate) fn signal_error(&mut self, bits: u32) {
        let new = bits & !self.esr_pending;
        self.esr_pending |= bits & ESR_VALID_MASK;
        if new != 0 && !self.delivering_error {
            self.delivering_error = true;
            self.deliver_lvt(Lvt::Error);
            self.delivering_error = false;
        }
    }

    // ----- IPIs --------------------------------------------------------------

    /// Acts on an ICR write: self-only IPIs are taken here (never looked up by the
    /// guest-writable ID), others are returned for routing.
    pub(crate) fn send_icr(&mut self, x2apic: bool) -> Option<IpiMessage> {
        match icr::decode(self.icr, x2apic) {
            IcrCommand::Send(msg) => Some(msg),
            IcrCommand::SelfInterrupt(v) => {
                self.accept_vector(v, false);
                None
            }
            IcrCommand::IllegalVector => {
                self.signal_error(ESR_SEND_ILLEGAL_VECTOR);
                None
            }
            IcrCommand::Dropped(_) => {
                self.stats.ipi_dropped = self.stats.ipi_dropped.saturating_add(1);
                None
            }
        }
    }

    /// SELF IPI register (x2APIC): a fixed edge interrupt to this APIC.
    pub(crate) fn self_ipi(&mut self, vector: u8) {
        if vector < 16 {
            self.signal_error(ESR_SEND_ILLEGAL_VECTOR);
        } else {
            self.accept_vector(vector, false);
        }
    }

    // ----- register semantics shared by MMIO and MSR access -------------------

    /// Reads a register with the meaning it has in the current mode. Write-only and
    /// reserved registers read 0 here; the access paths add #GP/ESR behaviour.
    pub(crate) fn read_reg(&mut self, reg: Reg) -> u64 {
        let x2 = self.mode() == ApicMode::X2Apic;
        let v: u32 = match reg {
            Reg::Id => {
                if x2 {
                    self.id
                } else {
                    (self.id & 0xFF) << 24
                }
            }
            Reg::Version => self.version(),
            Reg::Tpr => u32::from(self.tpr),
            Reg::Apr => u32::from(self.apr),
            Reg::Ppr => u32::from(self.ppr()),
            Reg::Eoi | Reg::Rrd | Reg::SelfIpi => 0,
            Reg::Ldr => self.ldr(),
            Reg::Dfr => self.dfr,
            Reg::Svr => self.svr,
            Reg::Isr(i) => self.isr.word(usize::from(i)),
            Reg::Tmr(i) => self.tmr.word(usize::from(i)),
            Reg::Irr(i) => self.irr.word(usize::from(i)),
            Reg::Esr => self.esr,
            Reg::IcrLow => {
                if x2 {
                    return self.icr & !icr::ICR_DELIVERY_STATUS;
                }
                (self.icr as u32) & !(icr::ICR_DELIVERY_STATUS as u32)
            }
            Reg::IcrHigh => (self.icr >> 32) as u32,
            Reg::TimerInitial => self.timer.initial_count(),
            Reg::TimerCurrent => {
                self.timer
                    .current_count(self.now, self.timer_mode(), &self.cfg.clock)
            }
            Reg::TimerDivide => self.timer.divide_config(),
            Reg::LvtCmci
            | Reg::LvtTimer
            | Reg::LvtThermal
            | Reg::LvtPerf
            | Reg::LvtLint0
            | Reg::LvtLint1
            | Reg::LvtError => match Lvt::from_reg(reg) {
                Some(entry) => self.read_lvt(entry),
                None => 0,
            },
        };
        u64::from(v)
    }

    /// LVT value with delivery status derived: "send pending" while the entry's
    /// fixed vector waits in IRR (SDM §11.5.1).
    fn read_lvt(&self, entry: Lvt) -> u32 {
        let value = self.lvt(entry);
        let pending = entry.delivery_mode(value) == Some(DeliveryMode::Fixed)
            && !lvt::is_masked(value)
            && self.irr.contains(lvt::vector(value));
        if pending {
            value | LVT_DELIVERY_STATUS
        } else {
            value
        }
    }

    /// Writes a register with its mode-independent meaning. Reserved bits are
    /// dropped; read-only registers ignore the write. The access paths reject what
    /// their mode forbids before calling this.
    pub(crate) fn write_reg(&mut self, reg: Reg, value: u64) -> Effects {
        let mut fx = Effects::default();
        let v32 = value as u32;
        match reg {
            Reg::Id => {
                if self.mode() == ApicMode::XApic {
                    let new = v32 >> 24;
                    fx.routing_changed = new != self.id & 0xFF;
                    self.id = new;
                }
            }
            Reg::Tpr => self.set_tpr(v32 as u8),
            Reg::Eoi => fx.eoi = self.eoi(),
            Reg::Ldr => {
                if self.mode() == ApicMode::XApic {
                    let new = v32 & LDR_MASK;
                    fx.routing_changed = new != self.ldr;
                    self.ldr = new;
                }
            }
            Reg::Dfr => {
                let new = (v32 & DFR_MODEL_MASK) | DFR_RESERVED_ONES;
                fx.routing_changed = new != self.dfr;
                self.dfr = new;
            }
            Reg::Svr => fx = self.write_svr(v32),
            Reg::Esr => {
                self.esr = self.esr_pending;
                self.esr_pending = 0;
            }
            Reg::IcrLow => {
                let x2 = self.mode() == ApicMode::X2Apic;
                self.icr = if x2 {
                    value & (icr::ICR_LOW_MASK | 0xFFFF_FFFF_0000_0000)
                } else {
                    (self.icr & 0xFFFF_FFFF_0000_0000) | (value & icr::ICR_LOW_MASK)
                };
                fx.ipi = self.send_icr(x2);
            }
            Reg::IcrHigh => {
                self.icr = (self.icr & 0xFFFF_FFFF) | (u64::from(v32 & icr::ICR_HIGH_MASK) << 32);
            }
            Reg::LvtCmci
            | Reg::LvtTimer
            | Reg::LvtThermal
            | Reg::LvtPerf
            | Reg::LvtLint0
            | Reg::LvtLint1
            | Reg::LvtError => {
                if let Some(entry) = Lvt::from_reg(reg) {
                    fx.timer_changed = self.write_lvt(entry, v32);
                }
            }
            Reg::TimerInitial => {
                self.timer
                    .write_initial(v32, self.now, self.timer_mode(), &self.cfg.clock);
                fx.timer_changed = true;
            }
            Reg::TimerDivide => {
                self.timer
                    .write_divide(v32, self.now, self.timer_mode(), &self.cfg.clock);
                fx.timer_changed = true;
            }
            Reg::SelfIpi => self.self_ipi(v32 as u8),
            Reg::Version
            | Reg::Apr
            | Reg::Ppr
            | Reg::Rrd
            | Reg::Isr(_)
            | Reg::Tmr(_)
            | Reg::Irr(_)
            | Reg::TimerCurrent => {}
        }
        fx
    }

    fn write_svr(&mut self, value: u32) -> Effects {
        let was = self.is_enabled();
        self.svr = value & self.cfg.svr_writable();
        let now_on = self.is_enabled();
        if was && !now_on {
            // SDM §11.4.7.2: software disable sets every LVT mask bit.
            for v in self.lvt.iter_mut() {
                *v |= LVT_MASKED;
            }
        }
        Effects {
            routing_changed: was != now_on,
            ..Effects::default()
        }
    }

    /// Stores an LVT write. Returns whether the timer configuration changed.
    fn write_lvt(&mut self, entry: Lvt, value: u32) -> bool {
        let td = self.cfg.tsc_deadline;
        let old = self.lvt(entry);
        let mut new = (value & entry.writable_mask(td)) | (old & LVT_REMOTE_IRR);
        if !self.is_enabled() {
            new |= LVT_MASKED;
        }
        if entry == Lvt::Timer && TimerMode::from_lvt(new).is_none() {
            // Reserved mode 11: stored as one-shot (x2APIC writes #GP before this).
            new &= !lvt::LVT_TIMER_MODE_MASK;
        }
        if let Some(slot) = self.lvt.get_mut(entry.index()) {
            *slot = new;
        }
        if entry == Lvt::Timer {
            let old_mode = TimerMode::from_lvt(old).unwrap_or(TimerMode::OneShot);
            let new_mode = TimerMode::from_lvt(new).unwrap_or(TimerMode::OneShot);
            self.timer
                .change_mode(old_mode, new_mode, self.now, &self.cfg.clock);
            return true;
        }
        false
    }

    // ----- IA32_APIC_BASE and resets -----------------------------------------

    /// A guest write to IA32_APIC_BASE (SDM §11.4.4, §11.12.5). #GP for reserved
    /// bits (including bits at and above MAXPHYADDR), EN = 0 with EXTD = 1,
    /// disabled → x2APIC and x2APIC → xAPIC. Disabling resets the APIC to its
    /// power-up state. The BSP flag is not guest-writable (changes are ignored).
    /// Base relocation is honoured: see [`LocalApic::mmio_base`].
    pub fn write_apic_base(&mut self, value: u64, now: u64) -> Result<Effects, GpFault> {
        self.advance(now);
        if value & self.cfg.apic_base_reserved() != 0 {
            return Err(GpFault);
        }
        let new_mode = ApicMode::from_apic_base(value).ok_or(GpFault)?;
        let old_mode = self.mode();
        match (old_mode, new_mode) {
            (ApicMode::Disabled, ApicMode::X2Apic) | (ApicMode::X2Apic, ApicMode::XApic) => {
                return Err(GpFault)
            }
            _ => {}
        }
        let new_base = (value & !APIC_BASE_BSP) | (self.apic_base & APIC_BASE_BSP);
        let moved = (new_base ^ self.apic_base) & !0xFFF != 0;
        self.apic_base = new_base;
        match (old_mode, new_mode) {
            (ApicMode::XApic | ApicMode::X2Apic, ApicMode::Disabled) => {
                self.reset_registers();
                self.id = self.cfg.apic_id;
            }
            (ApicMode::XApic, ApicMode::X2Apic) => {
                // SDM §11.12.5.1: the x2APIC ID is the initial APIC ID; LDR is derived.
                self.id = self.cfg.apic_id;
            }
            _ => {}
        }
        Ok(Effects {
            routing_changed: old_mode != new_mode || moved,
            timer_changed: new_mode == ApicMode::Disabled && old_mode != new_mode,
            ..Effects::default()
        })
    }

    /// Power-up state of every register except the ID and IA32_APIC_BASE
    /// (SDM §11.4.7.1): IRR/ISR/TMR/ICR/LDR/TPR/ESR 0, timer counts 0, DFR all
    /// ones, LVTs masked, SVR 0xFF.
    fn reset_registers(&mut self) {
        self.tpr = 0;
        self.apr = 0;
        self.ldr = 0;
        self.dfr = DFR_FLAT;
        self.svr = 0xFF;
        self.isr = ClassSummarySet::EMPTY;
        self.tmr = VectorSet::EMPTY;
        self.irr = WordSummarySet::EMPTY;
        self.esr = 0;
        self.esr_pending = 0;
        self.icr = 0;
        self.lvt = [lvt::LVT_RESET; 7];
        self.timer.reset();
        self.verify_rebuild();
    }

    /// INIT (SDM §11.4.7.3): the power-up register state, but the APIC ID,
    /// IA32_APIC_BASE and so the xAPIC/x2APIC mode survive (illumos O7, ACRN #4267).
    /// Raises the INIT event and drops a stale SIPI.
    pub fn init_reset(&mut self) {
        self.reset_registers();
        self.events.init = true;
        self.events.sipi = None;
    }

    /// Power-on / RESET: everything to the configuration's initial state.
    pub fn power_on_reset(&mut self) {
        self.reset_registers();
        self.id = self.cfg.apic_id;
        self.apic_base = self.cfg.reset_apic_base();
        self.events = Events::default();
        self.lint = [false; 2];
    }
}
