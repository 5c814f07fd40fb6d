//! Local APIC access layer (xAPIC MMIO or x2APIC MSRs).
//!
//! Registers are named by their xAPIC MMIO offset; in x2APIC mode offset
//! `o` is MSR `0x800 + (o >> 4)`. The mode is per CPU (IA32_APIC_BASE.EXTD)
//! and cached in the per-CPU record, so every access picks the right
//! interface for the executing CPU.
//!
//! Differences handled here: the ID register (xAPIC: bits 31:24, x2APIC: the
//! full 32-bit value), the ICR (xAPIC: ICR_HI then ICR_LO with an 8-bit
//! destination, delivery-status polling; x2APIC: one 64-bit MSR write with a
//! 32-bit destination, preceded by MFENCE;LFENCE so earlier stores are
//! visible to the target), and ESR writes (x2APIC requires 0).

use core::sync::atomic::Ordering::*;

use crate::cpu::{self, IrqGuard};
use crate::{percpu, time};

pub const XAPIC_BASE: u64 = 0xFEE0_0000;

pub const ID: u32 = 0x020;
pub const VERSION: u32 = 0x030;
pub const TPR: u32 = 0x080;
pub const PPR: u32 = 0x0A0;
pub const EOI: u32 = 0x0B0;
pub const LDR: u32 = 0x0D0;
pub const DFR: u32 = 0x0E0;
pub const SVR: u32 = 0x0F0;
pub const ISR: u32 = 0x100;
pub const TMR: u32 = 0x180;
pub const IRR: u32 = 0x200;
pub const ESR: u32 = 0x280;
pub const ICR_LO: u32 = 0x300;
pub const ICR_HI: u32 = 0x310;
pub const LVT_TIMER: u32 = 0x320;
pub const LVT_THERMAL: u32 = 0x330;
pub const LVT_PMC: u32 = 0x340;
pub const LVT_LINT0: u32 = 0x350;
pub const LVT_LINT1: u32 = 0x360;
pub const LVT_ERROR: u32 = 0x370;
pub const TIMER_ICR: u32 = 0x380;
pub const TIMER_CCR: u32 = 0x390;
pub const TIMER_DCR: u32 = 0x3E0;
/// x2APIC SELF IPI register (MSR 0x83F).
pub const SELF_IPI: u32 = 0x3F0;

pub const APIC_BASE_EXTD: u64 = 1 << 10;
pub const APIC_BASE_EN: u64 = 1 << 11;

pub const SVR_ENABLE: u32 = 1 << 8;
/// SVR bit 12: suppress EOI broadcast (directed EOI).
pub const SVR_SUPPRESS_EOI_BROADCAST: u32 = 1 << 12;
/// VERSION bit 24: suppress-EOI-broadcast supported.
pub const VERSION_DIRECTED_EOI: u32 = 1 << 24;

pub const LVT_MASKED: u32 = 1 << 16;
pub const LVT_TIMER_PERIODIC: u32 = 1 << 17;
pub const LVT_TIMER_TSC_DEADLINE: u32 = 2 << 17;

// ICR low bits.
pub const DM_FIXED: u32 = 0 << 8;
pub const DM_LOWEST: u32 = 1 << 8;
pub const DM_NMI: u32 = 4 << 8;
pub const DM_INIT: u32 = 5 << 8;
pub const DM_STARTUP: u32 = 6 << 8;
pub const DEST_LOGICAL: u32 = 1 << 11;
pub const DELIVERY_PENDING: u32 = 1 << 12;
pub const LEVEL_ASSERT: u32 = 1 << 14;
pub const SH_SELF: u32 = 1 << 18;
pub const SH_ALL: u32 = 2 << 18;
pub const SH_OTHERS: u32 = 3 << 18;

/// DFR values (xAPIC only).
pub const DFR_FLAT: u32 = 0xFFFF_FFFF;
pub const DFR_CLUSTER: u32 = 0x0FFF_FFFF;

// ESR bits.
pub const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
pub const ESR_RECV_ILLEGAL_VECTOR: u32 = 1 << 6;

/// Vectors with a fixed meaning for the whole guest.
pub const SPURIOUS_VECTOR: u8 = 0xFF;
pub const ERROR_VECTOR: u8 = 0xFE;
/// Mailbox wake-up IPI (see `smp`).
pub const WAKE_VECTOR: u8 = 0xF0;

/// Is the executing CPU's APIC in x2APIC mode?
#[inline]
pub fn is_x2apic() -> bool {
    percpu::this().x2apic.load(Relaxed)
}

#[inline]
fn msr(reg: u32) -> u32 {
    0x800 + (reg >> 4)
}

/// Read a 32-bit APIC register.
#[inline]
pub fn read(reg: u32) -> u32 {
    if is_x2apic() {
        unsafe { cpu::rdmsr(msr(reg)) as u32 }
    } else {
        unsafe { core::ptr::read_volatile((XAPIC_BASE + reg as u64) as *const u32) }
    }
}

/// Write a 32-bit APIC register.
#[inline]
pub fn write(reg: u32, val: u32) {
    if is_x2apic() {
        unsafe { cpu::wrmsr(msr(reg), val as u64) }
    } else {
        unsafe { core::ptr::write_volatile((XAPIC_BASE + reg as u64) as *mut u32, val) }
    }
}

#[inline]
pub fn eoi() {
    write(EOI, 0);
}

/// The APIC ID as used in physical destinations.
pub fn id() -> u32 {
    if is_x2apic() {
        read(ID)
    } else {
        read(ID) >> 24
    }
}

/// Physical broadcast destination for the current mode.
pub fn broadcast_dest() -> u32 {
    if is_x2apic() {
        0xFFFF_FFFF
    } else {
        0xFF
    }
}

/// Clear ESR and return what it latched (write, then read).
pub fn read_esr() -> u32 {
    write(ESR, 0);
    read(ESR)
}

/// Wait (bounded, ~100 ms) for the xAPIC ICR delivery status to go idle.
fn wait_icr_idle() -> bool {
    time::wait_until(time::ms(100), || read(ICR_LO) & DELIVERY_PENDING == 0)
}

/// Send an IPI: `lo` = ICR low word (vector, delivery mode, destination
/// mode, shorthand), `dest` = destination (8-bit in xAPIC mode).
pub fn send_ipi(dest: u32, lo: u32) {
    let _irq = IrqGuard::new();
    if is_x2apic() {
        cpu::mfence();
        unsafe { cpu::wrmsr(msr(ICR_LO), ((dest as u64) << 32) | lo as u64) };
    } else {
        wait_icr_idle();
        write(ICR_HI, dest << 24);
        write(ICR_LO, lo);
        wait_icr_idle();
    }
}

/// Fixed self-IPI through the ICR "self" shorthand.
pub fn self_ipi(vector: u8) {
    send_ipi(0, SH_SELF | DM_FIXED | vector as u32);
}

/// Read a 256-bit register array (ISR/TMR/IRR) as 8 words.
pub fn read_bitmap(base: u32) -> [u32; 8] {
    let mut out = [0u32; 8];
    for (i, w) in out.iter_mut().enumerate() {
        *w = read(base + 0x10 * i as u32);
    }
    out
}

pub fn isr() -> [u32; 8] {
    read_bitmap(ISR)
}

pub fn irr() -> [u32; 8] {
    read_bitmap(IRR)
}

pub fn tmr() -> [u32; 8] {
    read_bitmap(TMR)
}

#[inline]
pub fn bit(map: &[u32; 8], v: u8) -> bool {
    map[(v >> 5) as usize] & (1 << (v & 31)) != 0
}

/// Build a bitmap from a list of vectors.
pub fn bitmap_of(vs: &[u8]) -> [u32; 8] {
    let mut m = [0u32; 8];
    for &v in vs {
        m[(v >> 5) as usize] |= 1 << (v & 31);
    }
    m
}

pub fn isr_bit(v: u8) -> bool {
    bit(&isr(), v)
}

pub fn irr_bit(v: u8) -> bool {
    bit(&irr(), v)
}

/// Formats a bitmap as a list of set vectors, e.g. `[0x41 0x61]`.
pub struct Vectors(pub [u32; 8]);

impl core::fmt::Display for Vectors {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("[")?;
        let mut first = true;
        for v in 0..=255u8 {
            if bit(&self.0, v) {
                if !first {
                    f.write_str(" ")?;
                }
                first = false;
                write!(f, "{:#x}", v)?;
            }
        }
        f.write_str("]")
    }
}

/// IA32_APIC_BASE of the executing CPU.
pub fn base_msr() -> u64 {
    unsafe { cpu::rdmsr(cpu::MSR_APIC_BASE) }
}

/// Bring the executing CPU's APIC into a known state. Keeps the current
/// xAPIC/x2APIC mode (enables the APIC in xAPIC mode if it is globally
/// disabled). Leaves TPR=0, all LVTs masked except LVT error
/// ([`ERROR_VECTOR`]), spurious vector 0xFF, flat logical model, LDR=0
/// (xAPIC), empty ISR, divide-by-1.
pub fn init_local() {
    let _irq = IrqGuard::new();
    let mut base = base_msr();
    if base & APIC_BASE_EN == 0 {
        base = (base & !APIC_BASE_EXTD) | APIC_BASE_EN;
        unsafe { cpu::wrmsr(cpu::MSR_APIC_BASE, base) };
    }
    percpu::this()
        .x2apic
        .store(base & APIC_BASE_EXTD != 0, SeqCst);
    reset_local();
}

/// Reset the programmable state (mode unchanged); see [`init_local`].
pub fn reset_local() {
    let _irq = IrqGuard::new();
    write(SVR, SVR_ENABLE | SPURIOUS_VECTOR as u32);
    write(TPR, 0);
    write(TIMER_ICR, 0);
    write(LVT_TIMER, LVT_MASKED | 0x30);
    write(TIMER_DCR, 0xB);
    write(LVT_LINT0, LVT_MASKED);
    write(LVT_LINT1, LVT_MASKED);
    let max_lvt = (read(VERSION) >> 16) & 0xFF;
    if max_lvt >= 4 {
        write(LVT_THERMAL, LVT_MASKED);
    }
    if max_lvt >= 5 {
        write(LVT_PMC, LVT_MASKED);
    }
    write(LVT_ERROR, ERROR_VECTOR as u32);
    if !is_x2apic() {
        write(DFR, DFR_FLAT);
        write(LDR, 0);
    }
    write(ESR, 0);
    write(ESR, 0);
    drain_isr();
}

/// EOI until the ISR is empty (recovers from a scenario that left a vector
/// in service). Bounded.
pub fn drain_isr() {
    for _ in 0..256 {
        if isr().iter().all(|&w| w == 0) {
            break;
        }
        eoi();
    }
}

/// Switch the executing CPU's APIC from xAPIC to x2APIC mode.
pub fn enable_x2apic() {
    let _irq = IrqGuard::new();
    let base = base_msr();
    unsafe { cpu::wrmsr(cpu::MSR_APIC_BASE, base | APIC_BASE_EN | APIC_BASE_EXTD) };
    percpu::this().x2apic.store(true, SeqCst);
}
