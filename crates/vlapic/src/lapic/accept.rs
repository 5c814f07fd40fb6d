//! Interrupt arrival, acceptance and EOI; local sources (LINT, LVT), ESR errors
//! and IPIs sent through the ICR.

use super::*;
use crate::delivery::{Delivery, DeliveryMode};
use crate::icr::{self, IcrCommand, IpiMessage};
use crate::lvt::{self, Lvt, LVT_LEVEL, LVT_REMOTE_IRR};
use crate::regs::*;
use crate::vector_set::{slot_vector, Slot};

impl LocalApic {
    // ----- interrupt arrival, acceptance, EOI --------------------------------

    /// An interrupt message arrives for this APIC (from the fabric, an IOAPIC or an
    /// MSI). Returns whether it was taken, i.e. whether the vCPU may need a kick.
    ///
    /// Fixed and lowest-priority interrupts are refused by a software-disabled APIC
    /// and set ESR receive-illegal-vector for vectors 0–15 (SDM §11.5.3, §11.4.7.2).
    /// A hardware-disabled APIC takes nothing. INIT resets the APIC at once,
    /// keeping its mode and ID (SDM §11.4.7.3).
    #[cfg_attr(not(feature = "trace"), inline)]
    #[cfg_attr(feature = "trace", inline(always))] // keeps the "off" cost to its flag tests
    pub fn deliver(&mut self, d: Delivery, now: u64) -> bool {
        self.advance(now);
        if let DeliveryMode::Fixed | DeliveryMode::LowestPriority = d.mode {
            // accept_vector refuses (and counts) a hardware-disabled APIC too.
            return self.accept_vector(d.vector, d.level_triggered);
        }
        self.deliver_event(d)
    }

    /// [`LocalApic::deliver`] for the non-vectored modes.
    pub(super) fn deliver_event(&mut self, d: Delivery) -> bool {
        if !self.is_hardware_enabled() {
            self.stats.refused_disabled = self.stats.refused_disabled.saturating_add(1);
            return false;
        }
        #[cfg(feature = "trace")]
        if self.trace.enabled()
            && !matches!(d.mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority)
        {
            let source = self.trace.take_source();
            let vector = if d.mode == DeliveryMode::StartUp {
                d.vector
            } else {
                0
            };
            let mode = d.mode;
            trace_event!(
                self,
                crate::trace::TraceKind::Event {
                    mode,
                    vector,
                    source
                }
            );
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
        #[cfg(feature = "trace")]
        if self.trace.enabled() {
            self.trace_accepted(vector, level);
        }
        true
    }

    /// Records an acceptance (out of line: the accept path stays small when off).
    #[cfg(feature = "trace")]
    #[cold]
    #[inline(never)]
    fn trace_accepted(&mut self, vector: u8, level: bool) {
        let source = self.trace.take_source();
        trace_event!(
            self,
            crate::trace::TraceKind::Accepted {
                vector,
                level,
                source
            }
        );
    }

    #[cold]
    #[inline(never)]
    pub(super) fn receive_illegal_vector(&mut self) {
        self.signal_error(ESR_RECEIVE_ILLEGAL_VECTOR);
    }

    /// The vector the APIC would hand to the core now: the highest IRR vector, if
    /// its class is above PPR's (SDM §11.8.3.1).
    #[inline]
    pub fn pending_vector(&self) -> Option<u8> {
        self.pending_slot().map(|(at, _)| slot_vector(at))
    }

    /// [`LocalApic::pending_vector`] as a slot of IRR, with the vector's class. The
    /// test `class(v) > max(TPR[7:4], ISRV[7:4])` is done on ISR's class summary: it
    /// holds exactly when neither an ISR class nor TPR's class is at or above
    /// `class(v)`, i.e. when `(ISR classes | 1 << TPR[7:4]) >> class(v)` is 0 (an
    /// empty ISR has no class bit, as ISRV = 0 is class 0).
    #[inline(always)]
    fn pending_slot(&self) -> Option<(Slot, u32)> {
        let (i, bit) = self.irr.highest_slot()?;
        let class = ((i as u32) << 1 | bit >> 4) & 15;
        let blocking = u32::from(self.isr.summary()) | 1 << (self.tpr >> 4);
        (blocking >> class == 0).then_some(((i, bit), class))
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
        // The slot found by the lookup serves IRR's removal and ISR's insertion.
        let (at, class) = self.pending_slot()?;
        self.irr.remove_highest_at(at);
        self.isr.insert_at(at, class);
        let v = slot_vector(at);
        // One per accepted interrupt: a u64 cannot wrap in any VM's lifetime (584
        // years at 10^9 a second), so the plain increment skips saturation's compare.
        self.stats.accepted = self.stats.accepted.wrapping_add(1);
        trace_event!(self, crate::trace::TraceKind::Acknowledged { vector: v });
        #[cfg(feature = "verify")]
        self.verifier.on_accept(v, &self.isr);
        Some(v)
    }

    /// EOI: retires the highest in-service vector (from ISR, SDM §11.8.5). Returns it
    /// if it was level-triggered and EOI broadcast is not suppressed, for the IOAPIC.
    #[inline]
    pub(crate) fn eoi(&mut self) -> Option<u8> {
        let Some(at) = self.isr.pop_highest_slot() else {
            return self.spurious_eoi();
        };
        #[cfg(feature = "verify")]
        self.verifier.on_eoi_at(at, &self.isr);
        trace_event!(
            self,
            crate::trace::TraceKind::Eoi {
                vector: slot_vector(at)
            }
        );
        if !self.tmr.contains_slot(at) {
            return None;
        }
        self.level_eoi(slot_vector(at))
    }

    /// An EOI with nothing in service: counted; nothing else changes.
    #[cold]
    #[inline(never)]
    fn spurious_eoi(&mut self) -> Option<u8> {
        self.stats.spurious_eoi = self.stats.spurious_eoi.saturating_add(1);
        None
    }

    /// The level-triggered half of an EOI: LINT0 remote IRR, and the broadcast.
    #[inline(never)]
    pub(super) fn level_eoi(&mut self, v: u8) -> Option<u8> {
        self.lint_eoi(v);
        (self.svr & SVR_SUPPRESS_EOI_BROADCAST == 0).then_some(v)
    }

    /// Records one more NMI (at most two wait: one to take, one latched).
    pub(super) fn post_nmi(&mut self) {
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

    pub(super) fn is_level_fixed_lint(&self, entry: Lvt, value: u32) -> bool {
        entry == Lvt::Lint0
            && value & LVT_LEVEL != 0
            && entry.delivery_mode(value) == Some(DeliveryMode::Fixed)
    }

    pub(super) fn deliver_level_lint(&mut self, entry: Lvt) -> bool {
        let value = self.lvt(entry);
        if lvt::is_masked(value) || value & LVT_REMOTE_IRR != 0 {
            return false;
        }
        trace_source!(self, crate::trace::Source::Local(entry));
        if self.accept_vector(lvt::vector(value), true) {
            self.set_lvt_bits(entry, LVT_REMOTE_IRR, true);
            return true;
        }
        false
    }

    /// A level EOI of `vector`: clear a matching LINT remote IRR and re-deliver if
    /// the pin is still asserted.
    pub(super) fn lint_eoi(&mut self, vector: u8) {
        let value = self.lvt(Lvt::Lint0);
        if value & LVT_REMOTE_IRR != 0 && lvt::vector(value) == vector {
            self.set_lvt_bits(Lvt::Lint0, LVT_REMOTE_IRR, false);
            let active = self.lint[0] != (value & lvt::LVT_POLARITY_LOW != 0);
            if active && self.is_level_fixed_lint(Lvt::Lint0, value) {
                self.deliver_level_lint(Lvt::Lint0);
            }
        }
    }

    pub(super) fn set_lvt_bits(&mut self, entry: Lvt, bits: u32, on: bool) {
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
        trace_source!(self, crate::trace::Source::Local(entry));
        match entry.delivery_mode(value) {
            Some(DeliveryMode::Fixed) => self.accept_vector(lvt::vector(value), false),
            Some(DeliveryMode::Nmi) => {
                trace_event!(
                    self,
                    crate::trace::TraceKind::Event {
                        mode: DeliveryMode::Nmi,
                        vector: 0,
                        source: self.trace.take_source(),
                    }
                );
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
                trace_source!(self, crate::trace::Source::SelfIpi);
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
            trace_source!(self, crate::trace::Source::SelfIpi);
            self.accept_vector(vector, false);
        }
    }
}
