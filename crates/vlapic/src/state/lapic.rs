//! The local APIC's architectural state and `LocalApic::export`/`import`.
//! Import validates first, then applies, then rebuilds everything derived.

use crate::lapic::{ApicMode, LapicConfig, LocalApic};
use crate::lvt::{Lvt, TimerMode};
use crate::state::error::ImportError;
use crate::vector_set::{ClassSummarySet, WordSummarySet};
use crate::VectorSet;

/// Architectural state of one local APIC: the registers of SDM Table 11-1 that
/// hold state, IA32_APIC_BASE, IA32_TSC_DEADLINE, and two latches — ESR bits not
/// yet made visible, and the timer's absolute expiry.
///
/// Nothing derived is kept: no PPR (from TPR and ISR), no current count (from the
/// expiry), no verifier stack (from ISR), no caches.
///
/// Representation choices: `id` is the APIC ID as a number (x2APIC: 32 bits;
/// xAPIC and disabled: 8 bits), not the register encoding; `tpr` and `apr` are 32
/// bits wide so a foreign value above 0xFF can be reported; `ldr` is the register
/// as read (derived in x2APIC mode); `icr` is `(high << 32) | low` in xAPIC mode
/// and the 64-bit x2APIC ICR otherwise; `timer_deadline` is absolute VM time in
/// nanoseconds, 0 meaning "not armed".
///
/// With the `serde` feature it implements `Serialize` and `Deserialize`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct LapicState {
    /// IA32_APIC_BASE (mode, BSP flag, base address).
    pub apic_base: u64,
    /// APIC ID.
    pub id: u32,
    /// Version register.
    pub version: u32,
    /// Task priority register.
    pub tpr: u32,
    /// Arbitration priority register.
    pub apr: u32,
    /// Logical destination register.
    pub ldr: u32,
    /// Destination format register.
    pub dfr: u32,
    /// Spurious-interrupt vector register.
    pub svr: u32,
    /// ISR0–7 (word 0 = vectors 0–31). Human-readable serde formats (JSON) show
    /// ISR, TMR and IRR as ascending vector lists; binary ones as the eight words.
    #[cfg_attr(feature = "serde", serde(with = "vector_words"))]
    pub isr: [u32; 8],
    /// TMR0–7.
    #[cfg_attr(feature = "serde", serde(with = "vector_words"))]
    pub tmr: [u32; 8],
    /// IRR0–7.
    #[cfg_attr(feature = "serde", serde(with = "vector_words"))]
    pub irr: [u32; 8],
    /// Error status register as visible.
    pub esr: u32,
    /// Errors latched since the last ESR write, shown by the next one.
    pub esr_pending: u32,
    /// Interrupt command register.
    pub icr: u64,
    /// LVT entries in [`Lvt::ALL`] order: CMCI, timer, thermal, performance
    /// counters, LINT0, LINT1, error. Delivery status is never stored.
    pub lvt: [u32; 7],
    /// Timer initial count.
    pub timer_initial: u32,
    /// Timer divide configuration.
    pub timer_divide: u32,
    /// Absolute VM time (ns) of the next timer expiry; 0 = not armed.
    pub timer_deadline: u64,
    /// IA32_TSC_DEADLINE (0 = disarmed; 0 outside TSC-deadline mode).
    pub tsc_deadline: u64,
}

impl LapicState {
    /// The mode IA32_APIC_BASE selects (`None` for the illegal EN = 0, EXTD = 1).
    pub fn mode(&self) -> Option<ApicMode> {
        ApicMode::from_apic_base(self.apic_base)
    }

    /// One LVT entry.
    pub fn lvt(&self, entry: Lvt) -> u32 {
        self.lvt
            .get(entry.index())
            .copied()
            .unwrap_or(crate::lvt::LVT_MASKED)
    }

    /// The timer mode LVT timer selects (`None` for the reserved mode 11).
    pub fn timer_mode(&self) -> Option<TimerMode> {
        TimerMode::from_lvt(self.lvt(Lvt::Timer))
    }

    /// ISR as a vector set.
    pub fn isr_set(&self) -> VectorSet {
        VectorSet::from_words(self.isr)
    }

    /// TMR as a vector set.
    pub fn tmr_set(&self) -> VectorSet {
        VectorSet::from_words(self.tmr)
    }

    /// IRR as a vector set.
    pub fn irr_set(&self) -> VectorSet {
        VectorSet::from_words(self.irr)
    }

    /// Processor priority this state implies (SDM §11.8.3.1); TPR bits above 7
    /// are ignored.
    pub fn ppr(&self) -> u8 {
        crate::priority::processor_priority(self.tpr as u8, &self.isr_set())
    }

    /// The state of a freshly reset APIC with this configuration.
    pub fn power_on(cfg: &LapicConfig) -> Self {
        LocalApic::new(*cfg).export()
    }

    /// A configuration that this state would be valid against as far as identity
    /// goes: its ID, BSP flag, and the CMCI and EOI-suppression features its version
    /// announces; everything else from [`LapicConfig::default`]. For tools that
    /// inspect a state without a destination APIC.
    pub fn implied_config(&self) -> LapicConfig {
        LapicConfig {
            apic_id: self.id,
            bsp: self.apic_base & crate::regs::APIC_BASE_BSP != 0,
            mode: self.mode().unwrap_or(ApicMode::XApic),
            cmci: (self.version >> 16) & 0xFF == 6,
            eoi_broadcast_suppression: self.version & crate::regs::VERSION_EOI_SUPPRESSION != 0,
            x2apic: true,
            ..LapicConfig::default()
        }
    }
}

impl LocalApic {
    /// The APIC's architectural state. Timer expiries are exported as absolute VM
    /// time; an expiry at time 0 is exported as 1 (0 means "not armed"), and one
    /// beyond `i64::MAX` ns (a TSC deadline past the end of 64-bit time) as
    /// `i64::MAX`, so that every export passes [`LapicState::validate`].
    pub fn export(&self) -> LapicState {
        // Every field is named (none skipped with `..`): a new field does not compile
        // until someone decides whether and how it migrates.
        let LocalApic {
            cfg,
            apic_base,
            id: _, // exported as the mode's view, LocalApic::id
            tpr,
            apr,
            ldr: _, // exported as the mode's view (derived in x2APIC mode)
            dfr,
            svr,
            isr,
            tmr,
            irr,
            esr,
            esr_pending,
            icr,
            lvt,
            timer,
            now,
            lint: _,             // wire levels: the devices' state, driven again by them
            events: _,           // non-vectored events in flight: the VMM's vCPU state
            delivering_error: _, // transient guard, false between calls
            stats: _,            // counters, never load-bearing
            #[cfg(feature = "verify")]
                verifier: _, // derived: rebuilt from ISR on import
            #[cfg(feature = "trace")]
                trace: _, // observations for the embedder, not state
        } = self;
        let deadline = timer
            .counting_deadline(*now, self.timer_mode(), &cfg.clock)
            .map(|d| d.clamp(1, i64::MAX as u64))
            .unwrap_or(0);
        LapicState {
            apic_base: *apic_base,
            id: self.id(),
            version: self.version(),
            tpr: u32::from(*tpr),
            apr: u32::from(*apr),
            ldr: self.ldr(),
            dfr: *dfr,
            svr: *svr,
            isr: isr.words(),
            tmr: tmr.words(),
            irr: irr.words(),
            esr: *esr,
            esr_pending: *esr_pending,
            icr: *icr,
            lvt: *lvt,
            timer_initial: timer.initial_count(),
            timer_divide: timer.divide_config(),
            timer_deadline: deadline,
            tsc_deadline: timer.tsc_deadline(),
        }
    }

    /// Replaces the APIC's architectural state by `state` at VM time `now`.
    ///
    /// Every rule of [`LapicState::validate`] is checked against this APIC's
    /// configuration first; on the first broken rule nothing changes and the error
    /// names the field. Then the registers are installed, PPR follows from TPR and
    /// ISR, the software-enable state and LVT masks come from SVR and the LVTs, the
    /// timer is re-armed against `now` (a one-shot or periodic expiry further away
    /// than the initial count allows is clamped to it, illumos 15251; TSC-deadline
    /// mode re-derives the expiry from IA32_TSC_DEADLINE and this APIC's clock), and
    /// the verifier is rebuilt from ISR. Pending non-vectored events, LINT levels and
    /// statistics are not APIC state and are kept.
    ///
    /// Afterwards the embedder must re-read [`LocalApic::next_timer_deadline`] and
    /// rebuild routing (ID, LDR, DFR, mode and enable state may all have changed).
    pub fn import(&mut self, state: &LapicState, now: u64) -> Result<(), ImportError> {
        state.check(&self.cfg)?;
        let mode = state.mode().unwrap_or(ApicMode::Disabled);
        let timer_mode = state.timer_mode().unwrap_or(TimerMode::OneShot);
        // Every field is named (none skipped with `..`): a new field does not compile
        // until someone decides how it is installed.
        let LapicState {
            apic_base,
            id,
            version: _, // checked against the configuration, never installed
            tpr,
            apr,
            ldr,
            dfr,
            svr,
            isr,
            tmr,
            irr,
            esr,
            esr_pending,
            icr,
            lvt,
            timer_initial,
            timer_divide,
            timer_deadline,
            tsc_deadline,
        } = *state;
        self.apic_base = apic_base;
        // x2APIC and disabled: the ID rule guarantees the configured ID. xAPIC: the
        // guest may have rewritten the 8-bit ID; keep the full initial ID otherwise.
        self.id = if mode == ApicMode::XApic && id != self.cfg.apic_id & 0xFF {
            id
        } else {
            self.cfg.apic_id
        };
        self.tpr = tpr as u8;
        self.apr = apr as u8;
        self.ldr = if mode == ApicMode::X2Apic { 0 } else { ldr };
        self.dfr = dfr;
        self.svr = svr;
        // The word summaries are derived afresh from the imported words.
        self.isr = ClassSummarySet::from_set(VectorSet::from_words(isr));
        self.tmr = VectorSet::from_words(tmr);
        self.irr = WordSummarySet::from_set(VectorSet::from_words(irr));
        self.esr = esr;
        self.esr_pending = esr_pending;
        self.icr = icr;
        self.lvt = lvt;
        if now > self.now {
            self.now = now;
        }
        let deadline = (timer_deadline != 0).then_some(timer_deadline);
        self.timer.restore(
            timer_initial,
            timer_divide,
            deadline,
            tsc_deadline,
            self.now,
            timer_mode,
            &self.cfg.clock,
        );
        #[cfg(feature = "verify")]
        self.verifier.rebuild(&self.isr);
        Ok(())
    }
}

/// Serde for ISR/TMR/IRR: a list of vectors in human-readable formats, the eight
/// register words (a postcard tuple) otherwise.
#[cfg(feature = "serde")]
mod vector_words {
    use crate::VectorSet;
    use alloc::vec::Vec;
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(words: &[u32; 8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            let v: Vec<u8> = VectorSet::from_words(*words).iter().collect();
            v.serialize(s)
        } else {
            words.serialize(s)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u32; 8], D::Error> {
        if d.is_human_readable() {
            let list = Vec::<u64>::deserialize(d)?;
            let mut set = VectorSet::EMPTY;
            for v in list {
                let v = u8::try_from(v)
                    .map_err(|_| D::Error::custom("vector above 255 in a vector list"))?;
                set.insert(v);
            }
            Ok(set.words())
        } else {
            <[u32; 8]>::deserialize(d)
        }
    }
}
