//! Platform glue outside the APICs: legacy PIC masking, QEMU fw_cfg CPU
//! count, isa-debug-exit, and the multiboot command line.

use core::sync::atomic::{AtomicUsize, Ordering::*};

use crate::cpu;

/// isa-debug-exit port: `outl(code)` makes QEMU exit with `(code << 1) | 1`.
pub const EXIT_PORT: u16 = 0xF4;
const FW_CFG_SELECTOR: u16 = 0x510;
const FW_CFG_DATA: u16 = 0x511;
const FW_CFG_SIGNATURE: u16 = 0x0000;
const FW_CFG_NB_CPUS: u16 = 0x0005;

pub const MULTIBOOT_MAGIC: u32 = 0x2BAD_B002;

/// Mask both 8259 PICs (all interrupts go through the APICs).
pub fn mask_pic() {
    cpu::outb(0x21, 0xFF);
    cpu::outb(0xA1, 0xFF);
}

/// CPU count from fw_cfg key 0x0005, or `None` if there is no fw_cfg
/// ("QEMU" signature missing).
pub fn fw_cfg_cpu_count() -> Option<u32> {
    cpu::outw(FW_CFG_SELECTOR, FW_CFG_SIGNATURE);
    let mut sig = [0u8; 4];
    for b in sig.iter_mut() {
        *b = cpu::inb(FW_CFG_DATA);
    }
    if &sig != b"QEMU" {
        return None;
    }
    cpu::outw(FW_CFG_SELECTOR, FW_CFG_NB_CPUS);
    let lo = cpu::inb(FW_CFG_DATA) as u32;
    let hi = cpu::inb(FW_CFG_DATA) as u32;
    Some(lo | (hi << 8))
}

/// Leave the VM with `code` (0 = all passed). Never returns; if there is no
/// exit device the CPU halts.
pub fn exit(code: u32) -> ! {
    cpu::outl(EXIT_PORT, code);
    cpu::halt_forever()
}

const CMDLINE_MAX: usize = 512;
static mut CMDLINE: [u8; CMDLINE_MAX] = [0; CMDLINE_MAX];
static CMDLINE_LEN: AtomicUsize = AtomicUsize::new(0);

/// Copy the multiboot command line (info flags bit 2, pointer at +16) into
/// a static buffer. Called once on the BSP before anything else runs.
pub fn capture_cmdline(magic: u32, info: u32) {
    if magic != MULTIBOOT_MAGIC || info == 0 {
        return;
    }
    unsafe {
        let flags = core::ptr::read_volatile(info as u64 as *const u32);
        if flags & (1 << 2) == 0 {
            return;
        }
        let p = core::ptr::read_volatile((info as u64 + 16) as *const u32) as u64;
        if p == 0 {
            return;
        }
        let buf = &mut *core::ptr::addr_of_mut!(CMDLINE);
        let mut n = 0;
        while n < CMDLINE_MAX {
            let b = core::ptr::read_volatile((p + n as u64) as *const u8);
            if b == 0 {
                break;
            }
            buf[n] = b;
            n += 1;
        }
        CMDLINE_LEN.store(n, SeqCst);
    }
}

/// The captured command line (lossy: non-UTF-8 yields "").
pub fn cmdline() -> &'static str {
    let n = CMDLINE_LEN.load(SeqCst);
    let buf = unsafe { &*core::ptr::addr_of!(CMDLINE) };
    core::str::from_utf8(&buf[..n]).unwrap_or("")
}

/// What the command line asks for.
#[derive(Clone, Copy)]
pub enum Selection {
    /// Every scenario (`all` or nothing recognised).
    All,
    /// Benchmarks (`bench`).
    Bench,
    /// A subset (`only=a,b,c`); holds the comma-separated list.
    Only(&'static str),
}

/// Parse the command line. Tokens are separated by whitespace; unknown
/// tokens are ignored (QEMU and GRUB put the kernel path first). The last
/// recognised token wins.
pub fn selection() -> Selection {
    let mut sel = Selection::All;
    for tok in cmdline().split_ascii_whitespace() {
        if tok == "all" {
            sel = Selection::All;
        } else if tok == "bench" {
            sel = Selection::Bench;
        } else if let Some(list) = tok.strip_prefix("only=") {
            sel = Selection::Only(list);
        }
    }
    sel
}

impl Selection {
    /// Does the selection include scenario `name`?
    pub fn wants(&self, name: &str) -> bool {
        match self {
            Selection::All => true,
            Selection::Bench => false,
            Selection::Only(list) => list.split(',').any(|n| n == name),
        }
    }
}
