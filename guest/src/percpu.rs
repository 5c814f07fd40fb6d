//! Per-CPU data, indexed by the CPU's initial APIC ID.
//!
//! Each CPU points IA32_GS_BASE at its own [`Cpu`] record, whose first field
//! is the index, so [`index`] is a single `mov eax, gs:[0]`. The records are
//! shared (all fields are atomics): the BSP reads the AP counters and posts
//! commands into the AP mailboxes (see `smp`).
//!
//! Each CPU also owns a TSS with two IST stacks (IST1: all vectors except
//! NMI/#DF/#MC, IST2: those three); see `idt` for why every vector enters on
//! an IST stack.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::*};

use crate::{boot, cpu, idt};

/// Highest supported CPU count; APIC IDs must be below this.
pub const MAX_CPUS: usize = 64;
/// Stack of each AP (BSS, `ap_stacks` in `boot`).
pub const AP_STACK_SIZE: usize = 64 * 1024;
/// Stack of the BSP (BSS, `bsp_stack` in `boot`).
pub const BSP_STACK_SIZE: usize = 128 * 1024;
/// Size of each IST stack.
pub const IST_STACK_SIZE: usize = 16 * 1024;

/// Per-CPU record.
#[repr(C, align(64))]
pub struct Cpu {
    /// Must stay the first field: read through `gs:[0]`.
    pub index: AtomicU32,
    /// Set once the CPU finished its local init and entered its command loop.
    pub online: AtomicBool,
    /// This CPU's local APIC is in x2APIC mode (selects MSR vs MMIO access).
    pub x2apic: AtomicBool,
    /// The CPU stopped answering mailbox commands (no more commands posted).
    pub dead: AtomicBool,
    /// Number of times each vector was dispatched on this CPU (NMI = 2).
    pub counts: [AtomicU32; 256],
    /// Mailbox: function to run, argument, sequence numbers, result.
    pub cmd_fn: AtomicUsize,
    pub cmd_arg: AtomicU64,
    pub cmd_seq: AtomicU32,
    pub ack_seq: AtomicU32,
    pub cmd_result: AtomicU64,
}

impl Cpu {
    const fn new() -> Self {
        Cpu {
            index: AtomicU32::new(0),
            online: AtomicBool::new(false),
            x2apic: AtomicBool::new(false),
            dead: AtomicBool::new(false),
            counts: [const { AtomicU32::new(0) }; 256],
            cmd_fn: AtomicUsize::new(0),
            cmd_arg: AtomicU64::new(0),
            cmd_seq: AtomicU32::new(0),
            ack_seq: AtomicU32::new(0),
            cmd_result: AtomicU64::new(0),
        }
    }

    /// How often `vector` was dispatched on this CPU.
    pub fn count(&self, vector: u8) -> u32 {
        self.counts[vector as usize].load(SeqCst)
    }
}

pub static CPUS: [Cpu; MAX_CPUS] = [const { Cpu::new() }; MAX_CPUS];

/// Index (initial APIC ID) of the BSP.
pub static BSP_INDEX: AtomicU32 = AtomicU32::new(0);

/// Index of the executing CPU.
#[inline]
pub fn index() -> usize {
    let i: u32;
    unsafe {
        core::arch::asm!("mov {:e}, gs:[0]", out(reg) i, options(nostack, preserves_flags, readonly))
    }
    i as usize
}

/// The executing CPU's record.
#[inline]
pub fn this() -> &'static Cpu {
    &CPUS[index()]
}

pub fn bsp() -> usize {
    BSP_INDEX.load(Relaxed) as usize
}

/// Online CPUs in index order (BSP included).
pub fn online() -> impl Iterator<Item = usize> {
    (0..MAX_CPUS).filter(|&i| CPUS[i].online.load(Acquire))
}

/// Online APs in index order.
pub fn aps() -> impl Iterator<Item = usize> {
    let b = bsp();
    online().filter(move |&i| i != b)
}

pub fn online_count() -> usize {
    online().count()
}

/// 64-bit TSS (only the IST pointers are used).
#[repr(C, packed(4))]
struct Tss {
    _r0: u32,
    rsp: [u64; 3],
    _r1: u64,
    ist: [u64; 7],
    _r2: u64,
    _r3: u16,
    iomap_base: u16,
}

#[repr(C, align(16))]
struct IstStacks([[u8; IST_STACK_SIZE]; 2 * MAX_CPUS]);

/// Interior-mutable static for data each CPU writes only for itself during
/// its own initialisation.
struct Racy<T>(UnsafeCell<T>);
unsafe impl<T> Sync for Racy<T> {}

static TSS: Racy<[Tss; MAX_CPUS]> = Racy(UnsafeCell::new(
    [const {
        Tss {
            _r0: 0,
            rsp: [0; 3],
            _r1: 0,
            ist: [0; 7],
            _r2: 0,
            _r3: 0,
            iomap_base: 0,
        }
    }; MAX_CPUS],
));
static IST: Racy<IstStacks> = Racy(UnsafeCell::new(IstStacks(
    [[0; IST_STACK_SIZE]; 2 * MAX_CPUS],
)));

/// Top of the executing CPU's IST1 stack (the TSS's IST1 pointer).
pub fn ist1_top() -> u64 {
    let tss = unsafe { (TSS.0.get() as *const Tss).add(index()) };
    unsafe { core::ptr::addr_of!((*tss).ist[0]).read_unaligned() }
}

/// Per-CPU setup of the executing CPU: GS base, TSS/IST, GDT, IDT.
pub fn init_this_cpu(index: usize) {
    assert!(index < MAX_CPUS);
    let rec = &CPUS[index];
    rec.index.store(index as u32, SeqCst);
    unsafe { cpu::wrmsr(cpu::MSR_GS_BASE, rec as *const Cpu as u64) };

    unsafe {
        let ist = IST.0.get() as *mut [u8; IST_STACK_SIZE];
        let top = |slot: usize| (ist.add(slot) as u64 + IST_STACK_SIZE as u64) & !15;
        let tss = (TSS.0.get() as *mut Tss).add(index);
        (*tss).ist[0] = top(2 * index);
        (*tss).ist[1] = top(2 * index + 1);
        (*tss).iomap_base = core::mem::size_of::<Tss>() as u16;
        boot::set_tss_descriptor(index, tss as u64, core::mem::size_of::<Tss>() as u32 - 1);
    }
    boot::load_gdt();
    let sel = boot::TSS_SELECTOR_BASE + 16 * index as u16;
    unsafe { core::arch::asm!("ltr {:x}", in(reg) sel, options(nostack, preserves_flags)) };
    idt::load();
}
