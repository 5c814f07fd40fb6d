//! COM1 console (16550 at I/O 0x3F8), polled, no UART interrupts.
//!
//! Output is line-atomic across CPUs: [`print_fmt`] takes a spinlock with
//! interrupts disabled, so a line is never interleaved and no interrupt
//! handler can deadlock on the lock held by the code it interrupted.
//! Handlers must not print (they record failures with `report::note`);
//! only the fatal path does, and it takes the lock by force.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicU32, Ordering::*};

use crate::cpu::{self, IrqGuard};
use crate::{percpu, time};

const COM1: u16 = 0x3F8;
const LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 1 << 5;

/// Owner of the console lock: CPU index + 1, 0 = free.
static OWNER: AtomicU32 = AtomicU32::new(0);

/// Minimal UART setup: no interrupts. (QEMU and the VMM need nothing else.)
pub fn init() {
    cpu::outb(COM1 + 1, 0x00); // IER: no interrupts
}

fn put_byte(b: u8) {
    // Bounded poll (~10 ms); a missing UART reads 0xFF (THR empty) anyway.
    time::wait_until(time::ms(10), || cpu::inb(LSR) & LSR_THR_EMPTY != 0);
    cpu::outb(COM1, b);
}

struct Uart;

impl Write for Uart {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            put_byte(b);
        }
        Ok(())
    }
}

/// Print formatted text followed by `\n` as one atomic line.
pub fn print_line(args: fmt::Arguments) {
    let _irq = IrqGuard::new();
    let me = percpu::index() as u32 + 1;
    while OWNER.compare_exchange(0, me, Acquire, Relaxed).is_err() {
        cpu::pause();
    }
    let _ = Uart.write_fmt(args);
    put_byte(b'\n');
    OWNER.store(0, Release);
}

/// Print from the fatal path: takes the lock without waiting too long.
pub fn print_line_force(args: fmt::Arguments) {
    let _irq = IrqGuard::new();
    let me = percpu::index() as u32 + 1;
    // Wait ~100 ms for a line in progress, then print regardless.
    time::wait_until(time::ms(100), || {
        OWNER.compare_exchange(0, me, Acquire, Relaxed).is_ok()
    });
    put_byte(b'\n');
    let _ = Uart.write_fmt(args);
    put_byte(b'\n');
    OWNER.store(0, Release);
}

/// `println!` for the guest: one line on COM1.
#[macro_export]
macro_rules! println {
    ($($t:tt)*) => { $crate::serial::print_line(format_args!($($t)*)) };
}
