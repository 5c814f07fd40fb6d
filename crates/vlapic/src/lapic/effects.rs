//! What an APIC operation reports back: [`Effects`] to route, [`Events`] waiting
//! for the vCPU (NMI, SMI, INIT, SIPI, ExtINT) and the [`Stats`] counters.

use crate::icr::IpiMessage;

/// Side effects of one register access, returned to the embedder instead of being
/// performed by calls into other objects.
///
/// Non-exhaustive: start from `Default` and set fields.
#[must_use = "an IPI or an IOAPIC EOI may need routing"]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Effects {
    /// An interrupt message for the fabric to route (never a self-only IPI).
    pub ipi: Option<IpiMessage>,
    /// A level-triggered vector was EOI'd: broadcast it to the IOAPIC(s).
    pub eoi: Option<u8>,
    /// The timer was written: re-read [`LocalApic::next_timer_deadline`](crate::LocalApic::next_timer_deadline).
    pub timer_changed: bool,
    /// ID, LDR, DFR, software enable, mode or base changed: routing tables are stale.
    pub routing_changed: bool,
}

/// Non-vectored events waiting for the vCPU, taken with [`LocalApic::take_events`](crate::LocalApic::take_events).
///
/// Non-exhaustive: start from `Default` and set fields, or use the `with_*` methods.
///
/// ```
/// use vlapic::Events;
/// let e = Events::default().with_nmi(2).with_sipi(Some(0x9));
/// assert!(e.any() && e.nmi == 2 && !e.init);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
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

    /// The same events with `nmi` NMIs pending ([`Events::nmi`]).
    #[must_use]
    pub const fn with_nmi(mut self, nmi: u8) -> Self {
        self.nmi = nmi;
        self
    }

    /// The same events with the SMI flag ([`Events::smi`]).
    #[must_use]
    pub const fn with_smi(mut self, smi: bool) -> Self {
        self.smi = smi;
        self
    }

    /// The same events with the INIT flag ([`Events::init`]).
    #[must_use]
    pub const fn with_init(mut self, init: bool) -> Self {
        self.init = init;
        self
    }

    /// The same events with the SIPI start page ([`Events::sipi`]).
    #[must_use]
    pub const fn with_sipi(mut self, sipi: Option<u8>) -> Self {
        self.sipi = sipi;
        self
    }

    /// The same events with the ExtINT flag ([`Events::extint`]).
    #[must_use]
    pub const fn with_extint(mut self, extint: bool) -> Self {
        self.extint = extint;
        self
    }
}

/// Counters of unusual but legal guest behaviour; never load-bearing.
///
/// Non-exhaustive: start from `Default` and set fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
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
