//! IOAPIC at 0xFEC00000 (IOREGSEL +0x00, IOWIN +0x10, EOI register +0x40)
//! and the pc-testdev interrupt lines that drive its pins.
//!
//! Only the BSP touches the IOAPIC, but handlers on the BSP read RTEs too, so
//! every select+access pair runs with interrupts disabled.

use crate::cpu::{self, IrqGuard};

pub const BASE: u64 = 0xFEC0_0000;
const IOREGSEL: u64 = BASE;
const IOWIN: u64 = BASE + 0x10;
const IOEOI: u64 = BASE + 0x40;

pub const REG_VERSION: u32 = 0x01;

pub const RTE_MASKED: u64 = 1 << 16;
pub const RTE_LEVEL: u64 = 1 << 15;
pub const RTE_REMOTE_IRR: u64 = 1 << 14;

/// pc-testdev: `outb(level, IRQ_PORT_BASE + line)` drives ISA IRQ `line`.
pub const IRQ_PORT_BASE: u16 = 0x2000;

pub fn read(reg: u32) -> u32 {
    let _irq = IrqGuard::new();
    unsafe {
        core::ptr::write_volatile(IOREGSEL as *mut u32, reg);
        core::ptr::read_volatile(IOWIN as *const u32)
    }
}

pub fn write(reg: u32, val: u32) {
    let _irq = IrqGuard::new();
    unsafe {
        core::ptr::write_volatile(IOREGSEL as *mut u32, reg);
        core::ptr::write_volatile(IOWIN as *mut u32, val);
    }
}

/// Version register: bits 7:0 version, 23:16 highest redirection entry.
pub fn version() -> u32 {
    read(REG_VERSION) & 0xFF
}

pub fn max_entry() -> u32 {
    (read(REG_VERSION) >> 16) & 0xFF
}

pub fn read_rte(pin: u32) -> u64 {
    let _irq = IrqGuard::new();
    let lo = read(0x10 + 2 * pin) as u64;
    let hi = read(0x11 + 2 * pin) as u64;
    (hi << 32) | lo
}

/// Write an RTE; the low word is first written masked so the entry never
/// becomes live with a half-written destination.
pub fn write_rte(pin: u32, val: u64) {
    let _irq = IrqGuard::new();
    write(0x10 + 2 * pin, (val as u32) | RTE_MASKED as u32);
    write(0x11 + 2 * pin, (val >> 32) as u32);
    write(0x10 + 2 * pin, val as u32);
}

/// Fixed, physical-destination RTE.
pub fn rte(vector: u8, level: bool, masked: bool, dest_apic_id: u32) -> u64 {
    let mut v = vector as u64 | ((dest_apic_id as u64 & 0xFF) << 56);
    if level {
        v |= RTE_LEVEL;
    }
    if masked {
        v |= RTE_MASKED;
    }
    v
}

/// Set or clear only the mask bit of an RTE.
pub fn set_masked(pin: u32, masked: bool) {
    let _irq = IrqGuard::new();
    let lo = read(0x10 + 2 * pin) as u64;
    let lo = if masked {
        lo | RTE_MASKED
    } else {
        lo & !RTE_MASKED
    };
    write(0x10 + 2 * pin, lo as u32);
}

/// Directed EOI through the IOAPIC EOI register (version >= 0x20).
pub fn eoi(vector: u8) {
    unsafe { core::ptr::write_volatile(IOEOI as *mut u32, vector as u32) };
}

/// Drive pc-testdev interrupt line `line` (ISA IRQ = IOAPIC pin).
pub fn set_line(line: u32, high: bool) {
    cpu::outb(IRQ_PORT_BASE + line as u16, high as u8);
}

/// Mask every RTE (boot and cleanup).
pub fn mask_all() {
    let n = max_entry().min(63);
    for pin in 0..=n {
        write_rte(pin, RTE_MASKED);
    }
}
