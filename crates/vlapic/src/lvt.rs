//! The local vector table: the seven LVT entries, their writable-bit masks and
//! field decoding (SDM Vol. 3A §11.5.1, Figure 11-8).

use crate::delivery::DeliveryMode;
use crate::regs::Reg;

/// LVT bit 16: interrupt masked.
pub const LVT_MASKED: u32 = 1 << 16;
/// LVT bit 12: delivery status (read-only, derived).
pub const LVT_DELIVERY_STATUS: u32 = 1 << 12;
/// LVT bit 13: input pin polarity (LINT0/LINT1).
pub const LVT_POLARITY_LOW: u32 = 1 << 13;
/// LVT bit 14: remote IRR (read-only; LINT0/LINT1 level-triggered fixed).
pub const LVT_REMOTE_IRR: u32 = 1 << 14;
/// LVT bit 15: trigger mode level (LINT0/LINT1).
pub const LVT_LEVEL: u32 = 1 << 15;
/// LVT timer bits 18:17: timer mode.
pub const LVT_TIMER_MODE_MASK: u32 = 3 << 17;
/// Value of all LVTs after reset: masked, everything else 0.
pub const LVT_RESET: u32 = LVT_MASKED;

/// One entry of the local vector table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lvt {
    /// Corrected machine-check error interrupt (present only when configured).
    Cmci = 0,
    /// APIC timer.
    Timer = 1,
    /// Thermal sensor.
    Thermal = 2,
    /// Performance-monitoring counters.
    Perf = 3,
    /// Local interrupt pin 0.
    Lint0 = 4,
    /// Local interrupt pin 1.
    Lint1 = 5,
    /// APIC internal error.
    Error = 6,
}

impl Lvt {
    /// All seven entries, in storage order.
    pub const ALL: [Lvt; 7] = [
        Lvt::Cmci,
        Lvt::Timer,
        Lvt::Thermal,
        Lvt::Perf,
        Lvt::Lint0,
        Lvt::Lint1,
        Lvt::Error,
    ];

    /// Storage index (0–6).
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The entry behind a register, if it is an LVT register.
    pub(crate) const fn from_reg(reg: Reg) -> Option<Lvt> {
        Some(match reg {
            Reg::LvtCmci => Lvt::Cmci,
            Reg::LvtTimer => Lvt::Timer,
            Reg::LvtThermal => Lvt::Thermal,
            Reg::LvtPerf => Lvt::Perf,
            Reg::LvtLint0 => Lvt::Lint0,
            Reg::LvtLint1 => Lvt::Lint1,
            Reg::LvtError => Lvt::Error,
            _ => return None,
        })
    }

    /// Bits software may write (SDM Figure 11-8). Delivery status and remote IRR are
    /// read-only and excluded; the timer's TSC-deadline mode bit only when offered.
    pub const fn writable_mask(self, tsc_deadline: bool) -> u32 {
        const VECTOR: u32 = 0xFF;
        const DELIVERY_MODE: u32 = 0x700;
        match self {
            Lvt::Timer => {
                VECTOR
                    | LVT_MASKED
                    | if tsc_deadline {
                        LVT_TIMER_MODE_MASK
                    } else {
                        1 << 17
                    }
            }
            Lvt::Cmci | Lvt::Thermal | Lvt::Perf => VECTOR | DELIVERY_MODE | LVT_MASKED,
            Lvt::Lint0 | Lvt::Lint1 => {
                VECTOR | DELIVERY_MODE | LVT_POLARITY_LOW | LVT_LEVEL | LVT_MASKED
            }
            Lvt::Error => VECTOR | LVT_MASKED,
        }
    }

    /// Bits that are neither writable nor read-only status: setting them is a
    /// reserved-bit violation (an x2APIC #GP, an import rejection).
    pub const fn reserved_mask(self, tsc_deadline: bool) -> u32 {
        let status = match self {
            Lvt::Lint0 | Lvt::Lint1 => LVT_DELIVERY_STATUS | LVT_REMOTE_IRR,
            _ => LVT_DELIVERY_STATUS,
        };
        !(self.writable_mask(tsc_deadline) | status)
    }

    /// The delivery mode the entry's mode field selects. Entries without a mode
    /// field (timer, error) are fixed. Modes an entry may not use (SDM Figure 11-8:
    /// only fixed, SMI, NMI, INIT and ExtINT, INIT/ExtINT only on LINT pins) yield `None`.
    pub fn delivery_mode(self, value: u32) -> Option<DeliveryMode> {
        match self {
            Lvt::Timer | Lvt::Error => Some(DeliveryMode::Fixed),
            Lvt::Cmci | Lvt::Thermal | Lvt::Perf => match DeliveryMode::from_bits(value >> 8)? {
                m @ (DeliveryMode::Fixed | DeliveryMode::Smi | DeliveryMode::Nmi) => Some(m),
                _ => None,
            },
            Lvt::Lint0 | Lvt::Lint1 => match DeliveryMode::from_bits(value >> 8)? {
                m @ (DeliveryMode::Fixed
                | DeliveryMode::Smi
                | DeliveryMode::Nmi
                | DeliveryMode::Init
                | DeliveryMode::ExtInt) => Some(m),
                _ => None,
            },
        }
    }
}

/// Timer mode from LVT timer bits 18:17 (SDM §11.5.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TimerMode {
    /// 00: count down once.
    OneShot,
    /// 01: reload the initial count at zero.
    Periodic,
    /// 10: fire at the IA32_TSC_DEADLINE value.
    TscDeadline,
}

impl TimerMode {
    /// Decodes LVT timer bits 18:17; the reserved value 11 yields `None`.
    pub const fn from_lvt(value: u32) -> Option<Self> {
        match (value >> 17) & 3 {
            0 => Some(TimerMode::OneShot),
            1 => Some(TimerMode::Periodic),
            2 => Some(TimerMode::TscDeadline),
            _ => None,
        }
    }

    /// The LVT bits 18:17 for this mode.
    pub const fn lvt_bits(self) -> u32 {
        match self {
            TimerMode::OneShot => 0,
            TimerMode::Periodic => 1 << 17,
            TimerMode::TscDeadline => 2 << 17,
        }
    }
}

/// The vector field of an LVT value.
#[inline(always)]
pub const fn vector(value: u32) -> u8 {
    (value & 0xFF) as u8
}

/// Whether an LVT value is masked.
#[inline(always)]
pub const fn is_masked(value: u32) -> bool {
    value & LVT_MASKED != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_follow_figure_11_8() {
        assert_eq!(Lvt::Timer.writable_mask(true), 0x700FF);
        assert_eq!(Lvt::Timer.writable_mask(false), 0x300FF);
        assert_eq!(Lvt::Lint0.writable_mask(false), 0x1A7FF);
        assert_eq!(Lvt::Error.writable_mask(false), 0x100FF);
        assert_eq!(Lvt::Thermal.writable_mask(false), 0x107FF);
        // Read-only status bits are not reserved.
        assert_eq!(
            Lvt::Lint1.reserved_mask(false) & (LVT_REMOTE_IRR | LVT_DELIVERY_STATUS),
            0
        );
        assert_ne!(Lvt::Error.reserved_mask(false) & (1 << 17), 0);
    }

    #[test]
    fn lvt_delivery_modes() {
        assert_eq!(Lvt::Lint0.delivery_mode(0x700), Some(DeliveryMode::ExtInt));
        assert_eq!(Lvt::Perf.delivery_mode(0x400), Some(DeliveryMode::Nmi));
        assert_eq!(
            Lvt::Perf.delivery_mode(0x700),
            None,
            "ExtINT only on LINT pins"
        );
        assert_eq!(Lvt::Lint1.delivery_mode(0x300), None, "011 is reserved");
        assert_eq!(Lvt::Timer.delivery_mode(0x4FF), Some(DeliveryMode::Fixed));
    }

    #[test]
    fn timer_modes() {
        assert_eq!(TimerMode::from_lvt(0), Some(TimerMode::OneShot));
        assert_eq!(TimerMode::from_lvt(1 << 17), Some(TimerMode::Periodic));
        assert_eq!(TimerMode::from_lvt(2 << 17), Some(TimerMode::TscDeadline));
        assert_eq!(TimerMode::from_lvt(3 << 17), None);
    }
}
