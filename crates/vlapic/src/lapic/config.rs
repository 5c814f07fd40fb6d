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
