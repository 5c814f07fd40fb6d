//! IDT, interrupt entry stubs and the Rust-level dispatcher.
//!
//! # Interrupt entry and the red zone
//!
//! The precompiled `core` may use the SysV red zone (128 bytes below RSP)
//! and SSE. So that *any* code — including `core` functions — can run with
//! interrupts enabled, every vector is delivered on an IST stack (the CPU
//! then never pushes onto the interrupted stack). The common stub copies the
//! hardware frame to `(interrupted RSP - 128) & !15` — below the interrupted
//! code's red zone — switches to it and continues there with interrupts
//! still disabled. The IST stack is thus free again before the handler may
//! re-enable interrupts, so handlers can `sti` and nest arbitrarily deep.
//! NMI, #DF and #MC use IST2, everything else IST1; an NMI hitting a stub
//! before its switch lands on IST2 and copies itself below the stub's RSP.
//!
//! The stub saves all 15 GPRs and the x87/SSE state with `fxsave64` into a
//! 16-byte-aligned area (never `xsave`/`xrstor`), then calls
//! [`interrupt_dispatch`] with a pointer to the [`Frame`].
//!
//! # Dispatch
//!
//! Every dispatch increments the per-CPU count for the vector. Then:
//! #GP at a guarded MSR instruction is fixed up (see `cpu::gp_fixup`); a
//! handler installed with [`set_handler`] is called (it must do its own EOI);
//! otherwise NMI (2) and the spurious vector are only counted, other vectors
//! below 32 are fatal, and vectors 32..=254 get an EOI.

use core::arch::global_asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use crate::{apic, cpu, percpu, report};

/// Register state saved by the entry stub (lowest address first).
#[repr(C)]
#[derive(Debug)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl Frame {
    pub fn vector(&self) -> u8 {
        self.vector as u8
    }
}

/// Interrupt handler. Runs with IF=0 (interrupt gate); may `sti` itself.
pub type Handler = fn(&mut Frame);

static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];

/// Install a handler for `vector` (global, used by every CPU).
pub fn set_handler(vector: u8, h: Handler) {
    HANDLERS[vector as usize].store(h as usize, SeqCst);
}

/// Remove all installed handlers (back to default count-and-EOI behaviour).
pub fn clear_handlers() {
    for h in HANDLERS.iter() {
        h.store(0, SeqCst);
    }
}

global_asm!(
    r#"
    .pushsection .text.isr, "ax"
    .balign 16
    .global isr_stubs
isr_stubs:
    .set isr_vec, 0
    .rept 256
    .balign 16
    .if (isr_vec == 8) || (isr_vec == 10) || (isr_vec == 11) || (isr_vec == 12) || (isr_vec == 13) || (isr_vec == 14) || (isr_vec == 17) || (isr_vec == 21) || (isr_vec == 29) || (isr_vec == 30)
    .else
    pushq $0                        /* dummy error code */
    .endif
    pushq $isr_vec
    jmp isr_common
    .set isr_vec, isr_vec + 1
    .endr

isr_common:
    /* IST stack: vector, error, rip, cs, rflags, rsp, ss */
    pushq %rax
    pushq %rcx
    pushq %rsi
    /* move the 10 words below the interrupted stack's red zone */
    movq 64(%rsp), %rax             /* interrupted RSP */
    subq $128, %rax
    andq $-16, %rax
    subq $80, %rax
    xorl %ecx, %ecx
1:  movq (%rsp,%rcx,8), %rsi
    movq %rsi, (%rax,%rcx,8)
    incl %ecx
    cmpl $10, %ecx
    jne 1b
    movq %rax, %rsp
    popq %rsi
    popq %rcx
    popq %rax

    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rbx                 /* rbx = &Frame (callee-saved) */
    subq $512, %rsp
    andq $-16, %rsp
    fxsave64 (%rsp)
    movq %rbx, %rdi
    cld
    call {dispatch}
    fxrstor64 (%rsp)
    movq %rbx, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp                  /* vector, error */
    iretq
    .popsection
"#,
    dispatch = sym interrupt_dispatch,
    options(att_syntax)
);

extern "C" {
    static isr_stubs: u8;
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Gate {
    off_lo: u16,
    sel: u16,
    ist: u8,
    attr: u8,
    off_mid: u16,
    off_hi: u32,
    _r: u32,
}

struct Idt(UnsafeCell<[Gate; 256]>);
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new(
    [Gate {
        off_lo: 0,
        sel: 0,
        ist: 0,
        attr: 0,
        off_mid: 0,
        off_hi: 0,
        _r: 0,
    }; 256],
));

/// Fill the IDT (BSP, once, before any CPU calls [`load`]).
pub fn init() {
    let base = unsafe { &isr_stubs as *const u8 as u64 };
    let idt = IDT.0.get() as *mut Gate;
    for v in 0..256u64 {
        let addr = base + 16 * v;
        let ist = match v {
            2 | 8 | 18 => 2,
            _ => 1,
        };
        let g = Gate {
            off_lo: addr as u16,
            sel: 0x08,
            ist,
            attr: 0x8E, // present, DPL0, 64-bit interrupt gate
            off_mid: (addr >> 16) as u16,
            off_hi: (addr >> 32) as u32,
            _r: 0,
        };
        unsafe { idt.add(v as usize).write_volatile(g) };
    }
}

/// Point gate `vector` at `handler` with IST index `ist` and attribute byte `attr`
/// (P, DPL, type), selector 0x08; [`default_gate`] puts the usual one back.
pub fn set_gate(vector: u8, handler: u64, ist: u8, attr: u8) {
    let g = Gate {
        off_lo: handler as u16,
        sel: 0x08,
        ist,
        attr,
        off_mid: (handler >> 16) as u16,
        off_hi: (handler >> 32) as u32,
        _r: 0,
    };
    unsafe { (IDT.0.get() as *mut Gate).add(vector as usize).write_volatile(g) };
}

/// The gate [`init`] installs for `vector`.
pub fn default_gate(vector: u8) {
    let base = unsafe { &isr_stubs as *const u8 as u64 };
    let ist = match vector {
        2 | 8 | 18 => 2,
        _ => 1,
    };
    set_gate(vector, base + 16 * u64::from(vector), ist, 0x8E);
}

/// Load the IDT on the executing CPU.
pub fn load() {
    #[repr(C, packed)]
    struct Ptr {
        limit: u16,
        base: u64,
    }
    let p = Ptr {
        limit: (256 * 16 - 1) as u16,
        base: IDT.0.get() as u64,
    };
    unsafe { core::arch::asm!("lidt [{}]", in(reg) &p, options(nostack, preserves_flags)) };
}

#[no_mangle]
extern "C" fn interrupt_dispatch(f: &mut Frame) {
    let v = f.vector();
    percpu::this().counts[v as usize].fetch_add(1, SeqCst);
    if v == 13 {
        if let Some(fix) = cpu::gp_fixup(f.rip) {
            f.rip = fix;
            return;
        }
    }
    let h = HANDLERS[v as usize].load(SeqCst);
    if h != 0 {
        let h: Handler = unsafe { core::mem::transmute::<usize, Handler>(h) };
        h(f);
        return;
    }
    match v {
        2 => {}
        0..=31 => report::fatal_exception(f),
        apic::SPURIOUS_VECTOR => {}
        _ => apic::eoi(),
    }
}
