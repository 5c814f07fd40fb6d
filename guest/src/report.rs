//! Result reporting: the `PASS`/`FAIL`/`SKIP`/`DONE` lines, failure notes
//! recorded from interrupt handlers, and the fatal-error path.
//!
//! Output format (parsed by the VMM tests and CI; lines starting with `#`
//! are informational):
//! ```text
//! PASS <name>
//! FAIL <name>: <detail>
//! SKIP <name>: <reason>
//! BENCH <name> cycles=<median> iters=<n>
//! DONE passed=<n> failed=<n> skipped=<n>
//! ```

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, Ordering::*};

use crate::cpu::{self, IrqGuard};
use crate::idt::Frame;
use crate::{percpu, platform, serial};

/// Small fixed-capacity string (no allocator); truncates silently.
#[derive(Clone, Copy)]
pub struct Msg {
    buf: [u8; 200],
    len: usize,
}

impl Msg {
    pub const fn new() -> Self {
        Msg {
            buf: [0; 200],
            len: 0,
        }
    }

    pub fn from_args(args: fmt::Arguments) -> Self {
        let mut m = Msg::new();
        let _ = m.write_fmt(args);
        m
    }

    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("<bad utf8>")
    }
}

impl Write for Msg {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a scenario did not pass.
pub enum Verdict {
    Fail(Msg),
    Skip(Msg),
}

/// Scenario result: `Ok(())` = pass.
pub type Res = Result<(), Verdict>;

/// `fail!("fmt", args)`: return a FAIL verdict from the current function.
#[macro_export]
macro_rules! fail {
    ($($t:tt)*) => {
        return Err($crate::report::Verdict::Fail($crate::report::Msg::from_args(format_args!($($t)*))))
    };
}

/// `skip!("fmt", args)`: return a SKIP verdict from the current function.
#[macro_export]
macro_rules! skip {
    ($($t:tt)*) => {
        return Err($crate::report::Verdict::Skip($crate::report::Msg::from_args(format_args!($($t)*))))
    };
}

/// `ensure!(cond, "fmt", args)`: FAIL unless `cond`.
#[macro_export]
macro_rules! ensure {
    ($c:expr, $($t:tt)*) => {
        if !($c) {
            $crate::fail!($($t)*);
        }
    };
}

/// `note!("fmt", args)`: record a failure from an interrupt handler (or an
/// AP); the first note of a scenario turns it into a FAIL.
#[macro_export]
macro_rules! note {
    ($($t:tt)*) => { $crate::report::note(format_args!($($t)*)) };
}

// --- failure notes -------------------------------------------------------

static NOTE_LOCK: AtomicBool = AtomicBool::new(false);
static mut NOTE: Msg = Msg::new();
static NOTE_SET: AtomicBool = AtomicBool::new(false);

/// Record the first failure seen outside the scenario's main flow.
pub fn note(args: fmt::Arguments) {
    let _irq = IrqGuard::new();
    while NOTE_LOCK.swap(true, Acquire) {
        cpu::pause();
    }
    if !NOTE_SET.load(Relaxed) {
        unsafe { *core::ptr::addr_of_mut!(NOTE) = Msg::from_args(args) };
        NOTE_SET.store(true, Relaxed);
    }
    NOTE_LOCK.store(false, Release);
}

/// Take (and clear) the recorded note.
pub fn take_note() -> Option<Msg> {
    let _irq = IrqGuard::new();
    while NOTE_LOCK.swap(true, Acquire) {
        cpu::pause();
    }
    let r = if NOTE_SET.swap(false, Relaxed) {
        Some(unsafe { *core::ptr::addr_of!(NOTE) })
    } else {
        None
    };
    NOTE_LOCK.store(false, Release);
    r
}

// --- counters and lines ------------------------------------------------------

static PASSED: AtomicU32 = AtomicU32::new(0);
static FAILED: AtomicU32 = AtomicU32::new(0);
static SKIPPED: AtomicU32 = AtomicU32::new(0);
/// Name of the running scenario (for the fatal path), as a `&'static str`
/// split into pointer and length.
static CURRENT: AtomicPtr<u8> = AtomicPtr::new(core::ptr::null_mut());
static CURRENT_LEN: AtomicU32 = AtomicU32::new(0);
static FINISHING: AtomicBool = AtomicBool::new(false);

pub fn begin(name: &'static str) {
    CURRENT_LEN.store(name.len() as u32, SeqCst);
    CURRENT.store(name.as_ptr() as *mut u8, SeqCst);
}

fn current() -> &'static str {
    let p = CURRENT.load(SeqCst);
    if p.is_null() {
        return "boot";
    }
    let n = CURRENT_LEN.load(SeqCst) as usize;
    unsafe { core::str::from_utf8_unchecked(core::slice::from_raw_parts(p, n)) }
}

pub fn pass(name: &str) {
    PASSED.fetch_add(1, SeqCst);
    println!("PASS {}", name);
}

pub fn fail(name: &str, detail: fmt::Arguments) {
    FAILED.fetch_add(1, SeqCst);
    println!("FAIL {}: {}", name, detail);
}

pub fn skip(name: &str, reason: fmt::Arguments) {
    SKIPPED.fetch_add(1, SeqCst);
    println!("SKIP {}: {}", name, reason);
}

/// Print a benchmark result (counts as passed).
pub fn bench(name: &str, cycles: u64, iters: usize) {
    PASSED.fetch_add(1, SeqCst);
    println!("BENCH {} cycles={} iters={}", name, cycles, iters);
}

/// Print the outcome of a scenario (combining its result and any note).
pub fn outcome(name: &'static str, r: Res) {
    let note = take_note();
    match (r, note) {
        (Ok(()), None) => pass(name),
        (Ok(()), Some(n)) => fail(name, format_args!("{}", n)),
        (Err(Verdict::Fail(m)), None) => fail(name, format_args!("{}", m)),
        (Err(Verdict::Fail(m)), Some(n)) => fail(name, format_args!("{} (first: {})", m, n)),
        (Err(Verdict::Skip(m)), None) => skip(name, format_args!("{}", m)),
        (Err(Verdict::Skip(m)), Some(n)) => {
            fail(name, format_args!("{} (while skipping: {})", n, m))
        }
    }
    CURRENT.store(core::ptr::null_mut(), SeqCst);
}

/// Print `DONE ...` and exit (status 0 iff nothing failed).
pub fn finish() -> ! {
    FINISHING.store(true, SeqCst);
    let (p, f, s) = (
        PASSED.load(SeqCst),
        FAILED.load(SeqCst),
        SKIPPED.load(SeqCst),
    );
    println!("DONE passed={} failed={} skipped={}", p, f, s);
    platform::exit(if f == 0 { 0 } else { 1 })
}

/// Fatal error on any CPU: report it as a failure of the running scenario,
/// print `DONE` and exit with status 1.
pub fn fatal(args: fmt::Arguments) -> ! {
    cpu::cli();
    if FINISHING.swap(true, SeqCst) {
        // Another CPU is already reporting; just stop.
        cpu::halt_forever();
    }
    let name = current();
    serial::print_line_force(format_args!("# FATAL on cpu {}: {}", percpu::index(), args));
    serial::print_line_force(format_args!("FAIL {}: fatal: {}", name, args));
    let (p, f, s) = (
        PASSED.load(SeqCst),
        FAILED.load(SeqCst) + 1,
        SKIPPED.load(SeqCst),
    );
    serial::print_line_force(format_args!("DONE passed={} failed={} skipped={}", p, f, s));
    platform::exit(1)
}

/// Unexpected exception: fatal.
pub fn fatal_exception(f: &Frame) -> ! {
    let cr2 = if f.vector == 14 { cpu::read_cr2() } else { 0 };
    fatal(format_args!(
        "exception {} error={:#x} rip={:#x} rsp={:#x} cr2={:#x}",
        f.vector, f.error, f.rip, f.rsp, cr2
    ))
}
