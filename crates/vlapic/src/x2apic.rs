//! x2APIC and APIC MSR access: MSRs 0x800–0x8FF, IA32_APIC_BASE (0x1B) and
//! IA32_TSC_DEADLINE (0x6E0), with the SDM's #GP cases (Vol. 3A §11.12.1.2–3).

use crate::lapic::{ApicMode, Effects, GpFault, LocalApic};
use crate::lvt::{Lvt, TimerMode};
use crate::regs::*;

/// Whether this crate handles RDMSR/WRMSR of `msr` (APIC base, TSC deadline, x2APIC range).
pub fn is_apic_msr(msr: u32) -> bool {
    msr == MSR_APIC_BASE
        || msr == MSR_TSC_DEADLINE
        || (MSR_X2APIC_FIRST..=MSR_X2APIC_LAST).contains(&msr)
}

impl LocalApic {
    /// RDMSR. #GP: MSRs this crate does not handle, x2APIC MSRs outside x2APIC mode,
    /// undefined x2APIC MSRs, write-only registers (EOI, SELF IPI), and
    /// IA32_TSC_DEADLINE when TSC-deadline mode is not offered.
    pub fn read_msr(&mut self, msr: u32, now: u64) -> Result<u64, GpFault> {
        self.advance(now);
        match msr {
            MSR_APIC_BASE => Ok(self.apic_base),
            MSR_TSC_DEADLINE => {
                if !self.cfg.tsc_deadline {
                    return Err(GpFault);
                }
                Ok(self.timer.read_tsc_deadline(self.timer_mode()))
            }
            _ => {
                let reg = self.x2apic_reg(msr)?;
                if matches!(reg, Reg::Eoi | Reg::SelfIpi) {
                    return Err(GpFault);
                }
                Ok(self.read_reg(reg))
            }
        }
    }

    /// WRMSR. #GP, besides the cases of [`LocalApic::read_msr`] and
    /// [`LocalApic::write_apic_base`]: writes to read-only registers (ID, version,
    /// LDR, PPR, ISR/TMR/IRR, current count), bits 63:32 set in a 32-bit register,
    /// a non-zero EOI or ESR value, SELF IPI bits 63:8, ICR reserved bits (13, 17:16,
    /// 31:20), and reserved bits of TPR, SVR, the LVTs (timer mode 11 included) and
    /// the divide configuration.
    pub fn write_msr(&mut self, msr: u32, value: u64, now: u64) -> Result<Effects, GpFault> {
        self.advance(now);
        match msr {
            MSR_APIC_BASE => return self.write_apic_base(value, now),
            MSR_TSC_DEADLINE => {
                if !self.cfg.tsc_deadline {
                    return Err(GpFault);
                }
                self.timer
                    .write_tsc_deadline(value, self.timer_mode(), &self.cfg.clock);
                // A deadline already passed fires now.
                self.settle_timer();
                return Ok(Effects {
                    timer_changed: true,
                    ..Effects::default()
                });
            }
            _ => {}
        }
        let reg = self.x2apic_reg(msr)?;
        if reg != Reg::IcrLow && value >> 32 != 0 {
            return Err(GpFault);
        }
        let v = value as u32;
        let td = self.cfg.tsc_deadline;
        let bad = match reg {
            Reg::Id
            | Reg::Version
            | Reg::Ldr
            | Reg::Ppr
            | Reg::Isr(_)
            | Reg::Tmr(_)
            | Reg::Irr(_)
            | Reg::TimerCurrent => true,
            Reg::Eoi | Reg::Esr => v != 0,
            Reg::SelfIpi => v > 0xFF,
            Reg::IcrLow => value & crate::icr::X2APIC_ICR_RESERVED != 0,
            Reg::Tpr => v & !TPR_MASK != 0,
            Reg::Svr => v & !self.cfg.svr_writable() != 0,
            Reg::TimerDivide => v & !DCR_MASK != 0,
            Reg::LvtTimer => {
                v & Lvt::Timer.reserved_mask(td) != 0 || TimerMode::from_lvt(v).is_none()
            }
            Reg::LvtCmci
            | Reg::LvtThermal
            | Reg::LvtPerf
            | Reg::LvtLint0
            | Reg::LvtLint1
            | Reg::LvtError => Lvt::from_reg(reg).is_some_and(|e| v & e.reserved_mask(td) != 0),
            Reg::TimerInitial => false,
            // Not reachable through x2APIC MSRs (filtered by x2apic_reg).
            Reg::Apr | Reg::Rrd | Reg::Dfr | Reg::IcrHigh => true,
        };
        if bad {
            return Err(GpFault);
        }
        Ok(self.write_reg(reg, value))
    }

    /// The register behind an x2APIC MSR, if the APIC is in x2APIC mode and the MSR
    /// is defined (LVT CMCI only when configured).
    fn x2apic_reg(&self, msr: u32) -> Result<Reg, GpFault> {
        if self.mode() != ApicMode::X2Apic {
            return Err(GpFault);
        }
        match Reg::from_x2apic_msr(msr) {
            Some(Reg::LvtCmci) if !self.cfg.cmci => Err(GpFault),
            Some(reg) => Ok(reg),
            None => Err(GpFault),
        }
    }
}
