//! The import rules: every illumos `vlapic_data_validate` check, corrected where
//! illumos is wrong (O4), plus reserved-bit and timer-consistency rules.
//!
//! Rules, in the order they are checked (see `docs/state-formats.md`):
//!
//! | Rule | Field | Rejects |
//! |---|---|---|
//! | VVE_BAD_MSR_BASE | apic_base | reserved bits (MAXPHYADDR, 7:0, 9, EXTD without x2APIC) |
//! | APIC_BASE_MODE | apic_base | EN = 0 with EXTD = 1 |
//! | APIC_BASE_BSP | apic_base | BSP flag differing from the configuration |
//! | VVE_BAD_ID | id | x2APIC: not the initial ID; disabled: not its low 8 bits; xAPIC: above 0xFF |
//! | VVE_BAD_VERSION | version | not the destination's version |
//! | VVE_BAD_TPR / APR_RANGE | tpr, apr | above 0xFF |
//! | LDR_RESERVED / LDR_X2APIC_DERIVED | ldr | xAPIC bits 23:0; x2APIC not derived from the ID |
//! | DFR_RESERVED | dfr | bits 27:0 not all ones |
//! | SVR_RESERVED | svr | bits outside 0–9 (and 12 if EOI-broadcast suppression is offered) |
//! | VVE_LOW_VECTOR | isr, tmr, irr | vectors 0–15 |
//! | VVE_ISR_PRIORITY | isr | two in-service vectors in one 16-vector class |
//! | VVE_BAD_ESR | esr, esr_pending | bits outside 0xEF |
//! | ICR_RESERVED | icr | bits no ICR write can store |
//! | LVT_RESERVED / LVT_TIMER_MODE / LVT_ABSENT / LVT_UNMASKED_DISABLED | lvt.* | reserved bits, timer mode 11, CMCI when absent, unmasked while disabled |
//! | DISABLED_NOT_RESET | any register but TPR | EN = 0 with a register not at its power-up value (TPR excepted: CR8 still writes it while the APIC is disabled) |
//! | DCR_RESERVED | timer_divide | bits other than 0, 1, 3 |
//! | VVE_TIMER_MISMATCH | timer_deadline | armed one-shot/periodic timer with initial count 0 |
//! | TIMER_DEADLINE_RANGE | timer_deadline | expiry beyond `i64::MAX` ns |
//! | TSC_DEADLINE_MODE / TSC_DEADLINE_MISMATCH | tsc_deadline | set outside TSC-deadline mode; armed-ness differing from the expiry |

use alloc::vec::Vec;

use crate::icr::{ICR_HIGH_MASK, ICR_LOW_MASK};
use crate::lapic::{ApicMode, LapicConfig};
use crate::lvt::{Lvt, TimerMode, LVT_DELIVERY_STATUS, LVT_MASKED, LVT_REMOTE_IRR, LVT_RESET};
use crate::priority::class;
use crate::regs::*;
use crate::state::error::{Field, ImportError};
use crate::state::lapic::LapicState;

impl LapicState {
    /// Every rule this state breaks against an APIC configured as `cfg`, in a fixed
    /// order (empty when the state may be imported).
    pub fn validate(&self, cfg: &LapicConfig) -> Vec<ImportError> {
        let mut out = Vec::new();
        self.rules(cfg, &mut |e| {
            out.push(e);
            true
        });
        out
    }

    /// The first rule this state breaks against `cfg`, as import reports it.
    pub fn check(&self, cfg: &LapicConfig) -> Result<(), ImportError> {
        let mut first = None;
        self.rules(cfg, &mut |e| {
            first = Some(e);
            false
        });
        first.map_or(Ok(()), Err)
    }

    /// Runs the rules, handing each violation to `sink`; stops when it returns false.
    fn rules(&self, cfg: &LapicConfig, sink: &mut dyn FnMut(ImportError) -> bool) {
        // `report!` hands a violation over and returns when the sink has had enough.
        macro_rules! report {
            ($e:expr) => {
                if !sink($e) {
                    return;
                }
            };
        }

        // IA32_APIC_BASE (SDM §11.4.4, §11.12.1).
        let base = self.apic_base;
        let reserved = base & cfg.apic_base_reserved();
        if reserved != 0 {
            report!(ImportError::ApicBaseReserved {
                value: base,
                bits: reserved
            });
        }
        let mode = match self.mode() {
            Some(m) => m,
            None => {
                report!(ImportError::ApicBaseMode { value: base });
                ApicMode::Disabled
            }
        };
        if (base & APIC_BASE_BSP != 0) != cfg.bsp {
            report!(ImportError::ApicBaseBsp {
                value: base,
                bsp: cfg.bsp
            });
        }
        let x2 = mode == ApicMode::X2Apic;
        let enabled = mode != ApicMode::Disabled && self.svr & SVR_ENABLE != 0;

        // Identity. x2APIC: the initial ID (SDM §11.12.5.1). Disabled: the reset
        // value. xAPIC: the ID register is guest-writable here, so any 8-bit ID.
        let id_ok = match mode {
            ApicMode::X2Apic => self.id == cfg.apic_id,
            ApicMode::Disabled => self.id == cfg.apic_id & 0xFF,
            ApicMode::XApic => self.id <= 0xFF,
        };
        if !id_ok {
            report!(ImportError::Id {
                found: self.id,
                expected: if x2 { cfg.apic_id } else { cfg.apic_id & 0xFF }
            });
        }
        if self.version != cfg.version() {
            report!(ImportError::Version {
                found: self.version,
                expected: cfg.version()
            });
        }

        // Priorities.
        if self.tpr > TPR_MASK {
            report!(ImportError::Tpr { value: self.tpr });
        }
        if self.apr > 0xFF {
            report!(ImportError::Apr { value: self.apr });
        }

        // Logical destination.
        if x2 {
            let derived = x2apic_ldr(self.id);
            if self.ldr != derived {
                report!(ImportError::LdrDerived {
                    found: self.ldr,
                    expected: derived
                });
            }
        } else if self.ldr & !LDR_MASK != 0 {
            report!(ImportError::LdrReserved { value: self.ldr });
        }
        if self.dfr & DFR_RESERVED_ONES != DFR_RESERVED_ONES {
            report!(ImportError::Dfr { value: self.dfr });
        }
        let svr_ok = cfg.svr_writable();
        if self.svr & !svr_ok != 0 {
            report!(ImportError::Svr {
                value: self.svr,
                bits: self.svr & !svr_ok
            });
        }

        // ISR, TMR, IRR.
        for (field, words) in [
            (Field::Isr, &self.isr),
            (Field::Tmr, &self.tmr),
            (Field::Irr, &self.irr),
        ] {
            let low = words.first().copied().unwrap_or(0) & 0xFFFF;
            if low != 0 {
                report!(ImportError::LowVector {
                    field,
                    vector: low.trailing_zeros() as u8
                });
            }
        }
        let mut last: Option<u8> = None;
        for v in self.isr_set().iter() {
            if let Some(prev) = last {
                if class(prev) == class(v) {
                    report!(ImportError::IsrPriority {
                        first: prev,
                        second: v
                    });
                }
            }
            last = Some(v);
        }

        // Errors.
        for (field, value) in [
            (Field::Esr, self.esr),
            (Field::EsrPending, self.esr_pending),
        ] {
            if value & !ESR_VALID_MASK != 0 {
                report!(ImportError::Esr { field, value });
            }
        }

        // ICR: what the write paths can store.
        let icr_ok = ICR_LOW_MASK
            | if x2 {
                0xFFFF_FFFF_0000_0000
            } else {
                u64::from(ICR_HIGH_MASK) << 32
            };
        if self.icr & !icr_ok != 0 {
            report!(ImportError::Icr {
                value: self.icr,
                bits: self.icr & !icr_ok
            });
        }

        // LVTs (SDM Figure 11-8, §11.4.7.2).
        for entry in Lvt::ALL {
            let value = self.lvt(entry);
            if entry == Lvt::Cmci && !cfg.cmci {
                if value != LVT_RESET {
                    report!(ImportError::LvtAbsent { entry, value });
                }
                continue;
            }
            // Delivery status is derived, never stored; LINT1 is always edge-triggered
            // so its remote IRR can never be set (SDM §11.5.1).
            let mut reserved = entry.reserved_mask(cfg.tsc_deadline) | LVT_DELIVERY_STATUS;
            if entry == Lvt::Lint1 {
                reserved |= LVT_REMOTE_IRR;
            }
            let bad = value & reserved;
            if bad != 0 {
                report!(ImportError::LvtReserved {
                    entry,
                    value,
                    bits: bad
                });
            }
            if entry == Lvt::Timer && TimerMode::from_lvt(value).is_none() {
                report!(ImportError::LvtTimerMode { value });
            }
            if !enabled && value & LVT_MASKED == 0 {
                report!(ImportError::LvtUnmasked { entry, value });
            }
        }

        // A disabled APIC is in its power-up state (SDM §11.4.3).
        if mode == ApicMode::Disabled {
            let reset = LapicState::power_on(&LapicConfig {
                mode: ApicMode::Disabled,
                ..*cfg
            });
            let same = [
                (Field::Apr, self.apr == reset.apr),
                (Field::Ldr, self.ldr == reset.ldr),
                (Field::Dfr, self.dfr == reset.dfr),
                (Field::Svr, self.svr == reset.svr),
                (Field::Isr, self.isr == reset.isr),
                (Field::Tmr, self.tmr == reset.tmr),
                (Field::Irr, self.irr == reset.irr),
                (Field::Esr, self.esr == reset.esr),
                (Field::EsrPending, self.esr_pending == reset.esr_pending),
                (Field::Icr, self.icr == reset.icr),
                (Field::Lvt(Lvt::Timer), self.lvt == reset.lvt),
                (
                    Field::TimerInitial,
                    self.timer_initial == reset.timer_initial,
                ),
                (Field::TimerDivide, self.timer_divide == reset.timer_divide),
                (
                    Field::TimerDeadline,
                    self.timer_deadline == reset.timer_deadline,
                ),
                (Field::TscDeadline, self.tsc_deadline == reset.tsc_deadline),
            ];
            for (field, ok) in same {
                if !ok {
                    let field = match field {
                        Field::Lvt(_) => Lvt::ALL
                            .iter()
                            .find(|&&e| self.lvt(e) != reset.lvt(e))
                            .map_or(field, |&e| Field::Lvt(e)),
                        f => f,
                    };
                    report!(ImportError::DisabledNotReset { field });
                }
            }
        }

        // Timer (SDM §11.5.4; illumos 16183).
        if self.timer_divide & !DCR_MASK != 0 {
            report!(ImportError::TimerDivide {
                value: self.timer_divide
            });
        }
        let deadline = self.timer_deadline;
        if deadline > i64::MAX as u64 {
            report!(ImportError::TimerDeadlineRange { deadline });
        }
        match self.timer_mode() {
            Some(TimerMode::TscDeadline) => {
                if (self.tsc_deadline == 0) != (deadline == 0) {
                    report!(ImportError::TscDeadlineMismatch {
                        tsc_deadline: self.tsc_deadline,
                        deadline
                    });
                }
            }
            _ => {
                if deadline != 0 && self.timer_initial == 0 {
                    report!(ImportError::TimerMismatch { deadline });
                }
                if self.tsc_deadline != 0 {
                    report!(ImportError::TscDeadlineMode {
                        value: self.tsc_deadline
                    });
                }
            }
        }
    }
}
