//! The register map: xAPIC MMIO offsets, x2APIC MSR numbers, and the bit
//! definitions and reserved-bit masks of each register (SDM Vol. 3A Table 11-1, 11-6).

/// Default physical base of the xAPIC page.
pub const DEFAULT_APIC_BASE: u64 = 0xFEE0_0000;
/// Size of the xAPIC MMIO page.
pub const APIC_PAGE_SIZE: u64 = 0x1000;

/// IA32_APIC_BASE MSR.
pub const MSR_APIC_BASE: u32 = 0x1B;
/// IA32_TSC_DEADLINE MSR.
pub const MSR_TSC_DEADLINE: u32 = 0x6E0;
/// First x2APIC MSR.
pub const MSR_X2APIC_FIRST: u32 = 0x800;
/// Last MSR of the x2APIC range.
pub const MSR_X2APIC_LAST: u32 = 0x8FF;

/// IA32_APIC_BASE: this processor is the bootstrap processor.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// IA32_APIC_BASE: x2APIC mode enable (EXTD).
pub const APIC_BASE_EXTD: u64 = 1 << 10;
/// IA32_APIC_BASE: APIC global enable (EN).
pub const APIC_BASE_EN: u64 = 1 << 11;

/// Version register: the version number of an integrated xAPIC (0x14, as KVM and bhyve).
pub const VERSION_NUMBER: u32 = 0x14;
/// Version register: EOI-broadcast suppression is offered (bit 24).
pub const VERSION_EOI_SUPPRESSION: u32 = 1 << 24;

/// SVR: APIC software enable (bit 8).
pub const SVR_ENABLE: u32 = 1 << 8;
/// SVR: focus processor checking disable (bit 9; no effect, kept for guests that set it).
pub const SVR_FOCUS_DISABLE: u32 = 1 << 9;
/// SVR: suppress EOI broadcast (bit 12), writable only when offered.
pub const SVR_SUPPRESS_EOI_BROADCAST: u32 = 1 << 12;

/// ESR bit 0: send checksum error.
pub const ESR_SEND_CHECKSUM: u32 = 1 << 0;
/// ESR bit 1: receive checksum error.
pub const ESR_RECEIVE_CHECKSUM: u32 = 1 << 1;
/// ESR bit 2: send accept error.
pub const ESR_SEND_ACCEPT: u32 = 1 << 2;
/// ESR bit 3: receive accept error.
pub const ESR_RECEIVE_ACCEPT: u32 = 1 << 3;
/// ESR bit 5: send illegal vector.
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
/// ESR bit 6: receive illegal vector.
pub const ESR_RECEIVE_ILLEGAL_VECTOR: u32 = 1 << 6;
/// ESR bit 7: illegal register address (xAPIC mode only).
pub const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;
/// Bits that may ever be set in ESR (bits 0–3 and 5–7; bit 4 "redirectable IPI" is
/// not emulated), as illumos' `APIC_VALID_MASK_ESR`.
pub const ESR_VALID_MASK: u32 = 0xEF;

/// Writable bits of TPR.
pub const TPR_MASK: u32 = 0xFF;
/// Writable bits of the xAPIC ID register (bits 31:24).
pub const XAPIC_ID_MASK: u32 = 0xFF00_0000;
/// Writable bits of the xAPIC LDR (bits 31:24).
pub const LDR_MASK: u32 = 0xFF00_0000;
/// Writable bits of DFR (the model, bits 31:28); bits 27:0 read as ones.
pub const DFR_MODEL_MASK: u32 = 0xF000_0000;
/// DFR bits 27:0, reserved, read as ones.
pub const DFR_RESERVED_ONES: u32 = 0x0FFF_FFFF;
/// DFR flat model value.
pub const DFR_FLAT: u32 = 0xFFFF_FFFF;
/// DFR cluster model value.
pub const DFR_CLUSTER: u32 = 0x0FFF_FFFF;
/// Writable bits of the divide configuration register (bits 0, 1 and 3).
pub const DCR_MASK: u32 = 0xB;

/// An architectural local APIC register, named independently of its access path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Reg {
    /// 0x020 Local APIC ID.
    Id,
    /// 0x030 Local APIC version.
    Version,
    /// 0x080 Task priority.
    Tpr,
    /// 0x090 Arbitration priority (xAPIC only).
    Apr,
    /// 0x0A0 Processor priority.
    Ppr,
    /// 0x0B0 EOI (write-only).
    Eoi,
    /// 0x0C0 Remote read (xAPIC only).
    Rrd,
    /// 0x0D0 Logical destination.
    Ldr,
    /// 0x0E0 Destination format (xAPIC only).
    Dfr,
    /// 0x0F0 Spurious-interrupt vector.
    Svr,
    /// 0x100–0x170 In-service register word 0–7.
    Isr(u8),
    /// 0x180–0x1F0 Trigger-mode register word 0–7.
    Tmr(u8),
    /// 0x200–0x270 Interrupt-request register word 0–7.
    Irr(u8),
    /// 0x280 Error status.
    Esr,
    /// 0x2F0 LVT CMCI.
    LvtCmci,
    /// 0x300 Interrupt command, low half (x2APIC: the whole 64-bit ICR).
    IcrLow,
    /// 0x310 Interrupt command, high half (xAPIC only).
    IcrHigh,
    /// 0x320 LVT timer.
    LvtTimer,
    /// 0x330 LVT thermal sensor.
    LvtThermal,
    /// 0x340 LVT performance-monitoring counters.
    LvtPerf,
    /// 0x350 LVT LINT0.
    LvtLint0,
    /// 0x360 LVT LINT1.
    LvtLint1,
    /// 0x370 LVT error.
    LvtError,
    /// 0x380 Timer initial count.
    TimerInitial,
    /// 0x390 Timer current count (read-only).
    TimerCurrent,
    /// 0x3E0 Timer divide configuration.
    TimerDivide,
    /// 0x3F0 SELF IPI (x2APIC only, write-only).
    SelfIpi,
}

impl Reg {
    /// The register at a 16-byte-aligned offset of the APIC page, if any.
    /// Offsets not listed in SDM Table 11-1 (and SELF IPI, which is x2APIC-only)
    /// are reserved and yield `None`.
    pub fn from_offset(offset: u64) -> Option<Self> {
        if offset & 0xF != 0 {
            return None;
        }
        let reg = match offset {
            0x020 => Reg::Id,
            0x030 => Reg::Version,
            0x080 => Reg::Tpr,
            0x090 => Reg::Apr,
            0x0A0 => Reg::Ppr,
            0x0B0 => Reg::Eoi,
            0x0C0 => Reg::Rrd,
            0x0D0 => Reg::Ldr,
            0x0E0 => Reg::Dfr,
            0x0F0 => Reg::Svr,
            0x100..=0x170 => Reg::Isr(((offset & 0x70) >> 4) as u8),
            0x180..=0x1F0 => Reg::Tmr(((offset.wrapping_sub(0x180) & 0x70) >> 4) as u8),
            0x200..=0x270 => Reg::Irr(((offset & 0x70) >> 4) as u8),
            0x280 => Reg::Esr,
            0x2F0 => Reg::LvtCmci,
            0x300 => Reg::IcrLow,
            0x310 => Reg::IcrHigh,
            0x320 => Reg::LvtTimer,
            0x330 => Reg::LvtThermal,
            0x340 => Reg::LvtPerf,
            0x350 => Reg::LvtLint0,
            0x360 => Reg::LvtLint1,
            0x370 => Reg::LvtError,
            0x380 => Reg::TimerInitial,
            0x390 => Reg::TimerCurrent,
            0x3E0 => Reg::TimerDivide,
            _ => return None,
        };
        Some(reg)
    }

    /// The register behind an x2APIC MSR (SDM Table 11-6), if the MSR is defined.
    /// APR, RRD, DFR and ICR-high have no x2APIC MSR; SELF IPI (0x83F) exists only here.
    pub fn from_x2apic_msr(msr: u32) -> Option<Self> {
        if !(MSR_X2APIC_FIRST..=MSR_X2APIC_LAST).contains(&msr) {
            return None;
        }
        if msr == 0x83F {
            return Some(Reg::SelfIpi);
        }
        match Reg::from_offset(u64::from(msr & 0xFF) << 4)? {
            Reg::Apr | Reg::Rrd | Reg::Dfr | Reg::IcrHigh => None,
            reg => Some(reg),
        }
    }

    /// The register's offset in the APIC page.
    #[cfg(test)]
    pub fn offset(self) -> u16 {
        match self {
            Reg::Id => 0x020,
            Reg::Version => 0x030,
            Reg::Tpr => 0x080,
            Reg::Apr => 0x090,
            Reg::Ppr => 0x0A0,
            Reg::Eoi => 0x0B0,
            Reg::Rrd => 0x0C0,
            Reg::Ldr => 0x0D0,
            Reg::Dfr => 0x0E0,
            Reg::Svr => 0x0F0,
            Reg::Isr(i) => 0x100 | u16::from(i & 7) << 4,
            Reg::Tmr(i) => 0x180 | u16::from(i & 7) << 4,
            Reg::Irr(i) => 0x200 | u16::from(i & 7) << 4,
            Reg::Esr => 0x280,
            Reg::LvtCmci => 0x2F0,
            Reg::IcrLow => 0x300,
            Reg::IcrHigh => 0x310,
            Reg::LvtTimer => 0x320,
            Reg::LvtThermal => 0x330,
            Reg::LvtPerf => 0x340,
            Reg::LvtLint0 => 0x350,
            Reg::LvtLint1 => 0x360,
            Reg::LvtError => 0x370,
            Reg::TimerInitial => 0x380,
            Reg::TimerCurrent => 0x390,
            Reg::TimerDivide => 0x3E0,
            Reg::SelfIpi => 0x3F0,
        }
    }

    /// The x2APIC MSR number of this register (`0x800 + offset / 16`).
    #[cfg(test)]
    pub fn x2apic_msr(self) -> u32 {
        MSR_X2APIC_FIRST + u32::from(self.offset() >> 4)
    }
}

/// The x2APIC logical destination derived from an x2APIC ID (SDM §11.12.10.2):
/// cluster `id[19:4]` in bits 31:16, member bit `1 << id[3:0]` in bits 15:0.
#[inline]
pub const fn x2apic_ldr(id: u32) -> u32 {
    ((id >> 4) << 16) | (1 << (id & 0xF))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_map_matches_sdm_table_11_6() {
        assert_eq!(Reg::from_x2apic_msr(0x802), Some(Reg::Id));
        assert_eq!(Reg::from_x2apic_msr(0x80B), Some(Reg::Eoi));
        assert_eq!(Reg::from_x2apic_msr(0x830), Some(Reg::IcrLow));
        assert_eq!(Reg::from_x2apic_msr(0x83F), Some(Reg::SelfIpi));
        assert_eq!(Reg::from_x2apic_msr(0x817), Some(Reg::Isr(7)));
        // No x2APIC form: APR, RRD, DFR, ICR high; and undefined MSRs.
        for msr in [0x809, 0x80C, 0x80E, 0x831, 0x800, 0x801, 0x840, 0x8FF] {
            assert_eq!(Reg::from_x2apic_msr(msr), None, "{msr:#x}");
        }
        for reg in [Reg::Tpr, Reg::Irr(3), Reg::TimerDivide, Reg::SelfIpi] {
            assert_eq!(Reg::from_x2apic_msr(reg.x2apic_msr()), Some(reg));
        }
    }

    #[test]
    fn offsets_round_trip() {
        for off in (0..0x1000u64).step_by(16) {
            if let Some(r) = Reg::from_offset(off) {
                assert_eq!(u64::from(r.offset()), off);
            }
        }
        assert_eq!(Reg::from_offset(0x3F0), None, "SELF IPI is x2APIC-only");
        assert_eq!(Reg::from_offset(0x024), None);
    }

    #[test]
    fn x2apic_ldr_derivation() {
        // SDM §11.12.10.2: LDR = (x2APIC ID[19:4] << 16) | (1 << x2APIC ID[3:0]).
        assert_eq!(x2apic_ldr(0), 0x0000_0001);
        assert_eq!(x2apic_ldr(0x25), 0x0002_0020);
        assert_eq!(x2apic_ldr(0xFFFF_FFFF), 0xFFFF_8000);
    }
}
