//! IA32_APIC_BASE writes (enable, disable, mode switches, relocation) and the
//! INIT and power-on resets.

use super::*;
use crate::lvt::{self};
use crate::regs::*;
use crate::vector_set::{ClassSummarySet, WordSummarySet};
use crate::VectorSet;

impl LocalApic {
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
    pub(super) fn reset_registers(&mut self) {
        trace_event!(self, crate::trace::TraceKind::Reset);
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
