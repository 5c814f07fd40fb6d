//! xAPIC access: the 4 KiB MMIO page at the APIC base (SDM Vol. 3A Table 11-1),
//! with this crate's rule for access sizes and alignment.
//!
//! Access rule (KVM's): a read of 1, 2 or 4 bytes that lies within bytes 0–3 of a
//! register's 16-byte slot returns those bytes of the 32-bit register; any other
//! read (8 bytes, straddling bytes 4–15) returns zeros. Only 4-byte writes at a
//! 16-byte-aligned offset take effect; others are ignored and counted. Reserved
//! offsets read 0, ignore writes, and latch ESR "illegal register address".
//! Outside xAPIC mode (disabled or x2APIC) the page reads all ones and ignores writes.

use crate::lapic::{ApicMode, Effects, LocalApic};
use crate::regs::{Reg, APIC_BASE_EN, APIC_BASE_EXTD, ESR_ILLEGAL_REGISTER};

/// Offset of the EOI register.
const EOI_OFFSET: u64 = 0x0B0;
/// IA32_APIC_BASE EN and EXTD: EN alone is xAPIC mode.
const MODE_BITS: u64 = APIC_BASE_EN | APIC_BASE_EXTD;

impl LocalApic {
    /// A guest read of `data.len()` bytes at `offset` (0–0xFFF) in the xAPIC page.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8], now: u64) {
        self.advance(now);
        if self.mode() != ApicMode::XApic {
            data.fill(0xFF);
            self.stats.ignored_access = self.stats.ignored_access.saturating_add(1);
            return;
        }
        data.fill(0);
        let within = (offset & 0xF) as usize;
        let len = data.len();
        let Some(reg) = self.xapic_reg(offset & !0xF) else {
            return;
        };
        if !matches!(len, 1 | 2 | 4) || within.saturating_add(len) > 4 {
            self.stats.ignored_access = self.stats.ignored_access.saturating_add(1);
            return;
        }
        let bytes = (self.read_reg(reg) as u32).to_le_bytes();
        if let Some(src) = bytes.get(within..within.saturating_add(len)) {
            data.copy_from_slice(src);
        }
    }

    /// A guest write of `data` at `offset` (0–0xFFF) in the xAPIC page.
    #[inline]
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], now: u64) -> Effects {
        self.advance(now);
        // Fast path (issue 14): the 4-byte EOI write in xAPIC mode decodes nothing else.
        if offset == EOI_OFFSET && data.len() == 4 && self.apic_base & MODE_BITS == APIC_BASE_EN {
            return Effects {
                eoi: self.eoi(),
                ..Effects::default()
            };
        }
        self.mmio_write_decoded(offset, data)
    }

    /// [`LocalApic::mmio_write`] after `advance`, for every offset.
    fn mmio_write_decoded(&mut self, offset: u64, data: &[u8]) -> Effects {
        if self.mode() != ApicMode::XApic {
            self.stats.ignored_access = self.stats.ignored_access.saturating_add(1);
            return Effects::default();
        }
        let Some(reg) = self.xapic_reg(offset & !0xF) else {
            return Effects::default();
        };
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.stats.ignored_access = self.stats.ignored_access.saturating_add(1);
            return Effects::default();
        };
        if offset & 0xF != 0 {
            self.stats.ignored_access = self.stats.ignored_access.saturating_add(1);
            return Effects::default();
        }
        self.write_reg(reg, u64::from(u32::from_le_bytes(bytes)))
    }

    /// A 32-bit read of the register at a 16-byte-aligned `offset`, as the guest
    /// would see it through the page.
    pub fn read_register(&mut self, offset: u64, now: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mmio_read(offset, &mut b, now);
        u32::from_le_bytes(b)
    }

    /// A 32-bit write of the register at a 16-byte-aligned `offset`, as the guest
    /// would make it through the page.
    #[inline]
    pub fn write_register(&mut self, offset: u64, value: u32, now: u64) -> Effects {
        self.mmio_write(offset, &value.to_le_bytes(), now)
    }

    /// The register at an aligned xAPIC offset, or `None` after latching the
    /// illegal-register error for a reserved one (LVT CMCI is reserved when not
    /// configured; SELF IPI is x2APIC-only).
    fn xapic_reg(&mut self, aligned: u64) -> Option<Reg> {
        match Reg::from_offset(aligned) {
            Some(Reg::LvtCmci) if !self.cfg.cmci => {}
            Some(reg) => return Some(reg),
            None => {}
        }
        self.stats.reserved_access = self.stats.reserved_access.saturating_add(1);
        self.signal_error(ESR_ILLEGAL_REGISTER);
        None
    }
}
