//! Register semantics shared by the xAPIC page and the x2APIC MSRs: what a read
//! returns and what a write changes, in the current mode.

use super::*;
use crate::delivery::DeliveryMode;
use crate::icr::{self};
use crate::lvt::{self, Lvt, TimerMode, LVT_DELIVERY_STATUS, LVT_MASKED, LVT_REMOTE_IRR};
use crate::regs::*;

impl LocalApic {
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
    pub(super) fn read_lvt(&self, entry: Lvt) -> u32 {
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
                self.settle_timer();
                fx.timer_changed = true;
            }
            Reg::TimerDivide => {
                self.timer
                    .write_divide(v32, self.now, self.timer_mode(), &self.cfg.clock);
                self.settle_timer();
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

    pub(super) fn write_svr(&mut self, value: u32) -> Effects {
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
    pub(super) fn write_lvt(&mut self, entry: Lvt, value: u32) -> bool {
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
            self.settle_timer();
            return true;
        }
        false
    }
}
