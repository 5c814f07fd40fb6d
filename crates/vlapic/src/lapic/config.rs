//! The construction-time description of one APIC ([`LapicConfig`]), its mode
//! ([`ApicMode`]) and the #GP a guest access can raise ([`GpFault`]).

use crate::regs::*;
use crate::timer::TimerClock;
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
///
/// Non-exhaustive (fields will be added as the model grows): start from
/// [`LapicConfig::with_id`] or [`LapicConfig::default`] and change what differs with
/// the `with_*` methods (or by assigning a field).
///
/// ```
/// use vlapic::{ApicMode, LapicConfig};
/// let cfg = LapicConfig::with_id(3).with_mode(ApicMode::X2Apic).with_verify(true);
/// assert!(!cfg.bsp && cfg.mode == ApicMode::X2Apic && cfg.verify);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
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

    /// The same configuration with another initial APIC ID ([`LapicConfig::apic_id`]);
    /// the BSP flag is left as it is.
    #[must_use]
    pub const fn with_apic_id(mut self, apic_id: u32) -> Self {
        self.apic_id = apic_id;
        self
    }

    /// The same configuration with whether this is the bootstrap processor ([`LapicConfig::bsp`]) set.
    #[must_use]
    pub const fn with_bsp(mut self, bsp: bool) -> Self {
        self.bsp = bsp;
        self
    }

    /// The same configuration with the mode after power-up reset ([`LapicConfig::mode`]) set.
    #[must_use]
    pub const fn with_mode(mut self, mode: ApicMode) -> Self {
        self.mode = mode;
        self
    }

    /// The same configuration with whether x2APIC mode is offered ([`LapicConfig::x2apic`]) set.
    #[must_use]
    pub const fn with_x2apic(mut self, x2apic: bool) -> Self {
        self.x2apic = x2apic;
        self
    }

    /// The same configuration with whether TSC-deadline timer mode is offered ([`LapicConfig::tsc_deadline`]) set.
    #[must_use]
    pub const fn with_tsc_deadline(mut self, tsc_deadline: bool) -> Self {
        self.tsc_deadline = tsc_deadline;
        self
    }

    /// The same configuration with whether EOI-broadcast suppression is offered ([`LapicConfig::eoi_broadcast_suppression`]) set.
    #[must_use]
    pub const fn with_eoi_broadcast_suppression(mut self, eoi_broadcast_suppression: bool) -> Self {
        self.eoi_broadcast_suppression = eoi_broadcast_suppression;
        self
    }

    /// The same configuration with whether LVT CMCI exists ([`LapicConfig::cmci`]) set.
    #[must_use]
    pub const fn with_cmci(mut self, cmci: bool) -> Self {
        self.cmci = cmci;
        self
    }

    /// The same configuration with the physical-address width ([`LapicConfig::max_phys_addr`]) set.
    #[must_use]
    pub const fn with_max_phys_addr(mut self, max_phys_addr: u8) -> Self {
        self.max_phys_addr = max_phys_addr;
        self
    }

    /// The same configuration with the timer and TSC time base ([`LapicConfig::clock`]) set.
    #[must_use]
    pub const fn with_clock(mut self, clock: TimerClock) -> Self {
        self.clock = clock;
        self
    }

    /// The same configuration with the minimum periodic-timer spacing in microseconds ([`LapicConfig::min_timer_period_us`]) set.
    #[must_use]
    pub const fn with_min_timer_period_us(mut self, min_timer_period_us: u32) -> Self {
        self.min_timer_period_us = min_timer_period_us;
        self
    }

    /// The same configuration with whether the nesting verifier runs from the start ([`LapicConfig::verify`]) set.
    #[must_use]
    pub const fn with_verify(mut self, verify: bool) -> Self {
        self.verify = verify;
        self
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
