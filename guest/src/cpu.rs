//! Thin wrappers around privileged x86 instructions: port I/O, MSRs,
//! CPUID, TSC, interrupt flag control.
//!
//! `rdmsr_safe` / `wrmsr_safe` are written in assembly with a known faulting
//! instruction address; the #GP handler (see `idt`) consults [`gp_fixup`] and
//! resumes at the matching fixup label, which makes the access return an
//! error instead of killing the guest (same idea as Linux's exception table).

use core::arch::{asm, global_asm};

/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1B;
/// IA32_TSC_DEADLINE.
pub const MSR_TSC_DEADLINE: u32 = 0x6E0;
/// IA32_GS_BASE.
pub const MSR_GS_BASE: u32 = 0xC000_0101;

#[inline]
pub fn outb(port: u16, val: u8) {
    unsafe { asm!("out dx, al", in("dx") port, in("al") val, options(nostack, preserves_flags)) }
}

#[inline]
pub fn outw(port: u16, val: u16) {
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") val, options(nostack, preserves_flags)) }
}

#[inline]
pub fn outl(port: u16, val: u32) {
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") val, options(nostack, preserves_flags)) }
}

#[inline]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    unsafe { asm!("in al, dx", out("al") v, in("dx") port, options(nostack, preserves_flags)) }
    v
}

/// Serialised-enough TSC read (LFENCE keeps it from executing before
/// earlier instructions complete).
#[inline]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    unsafe {
        asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nostack, preserves_flags))
    }
    ((hi as u64) << 32) | lo as u64
}

/// CPUID leaf/subleaf -> (eax, ebx, ecx, edx).
#[inline]
pub fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// Initial APIC ID of the executing CPU (CPUID.1:EBX[31:24]).
pub fn initial_apic_id() -> u32 {
    cpuid(1, 0).1 >> 24
}

/// CPUID.1:ECX[21] — x2APIC supported.
pub fn has_x2apic() -> bool {
    cpuid(1, 0).2 & (1 << 21) != 0
}

/// CPUID.1:ECX[24] — TSC-deadline timer mode supported.
pub fn has_tsc_deadline() -> bool {
    cpuid(1, 0).2 & (1 << 24) != 0
}

/// # Safety
/// The MSR must exist; otherwise the CPU raises #GP (fatal). Use
/// [`rdmsr_safe`] for MSRs that may fault.
#[inline]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let lo: u32;
    let hi: u32;
    asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nostack, preserves_flags));
    ((hi as u64) << 32) | lo as u64
}

/// # Safety
/// See [`rdmsr`]; additionally the write must not break the environment.
#[inline]
pub unsafe fn wrmsr(msr: u32, val: u64) {
    asm!("wrmsr", in("ecx") msr, in("eax") val as u32, in("edx") (val >> 32) as u32, options(nostack, preserves_flags));
}

// Fault-tolerant MSR accessors. The instruction addresses are exported so the
// #GP handler can redirect execution to the fixup labels.
global_asm!(
    r#"
    .pushsection .text.msr_safe, "ax"
    .global rdmsr_safe_asm
rdmsr_safe_asm:                 /* edi = msr, rsi = *mut u64 ; returns 0 ok / 1 #GP */
    movl %edi, %ecx
    .global rdmsr_safe_insn
rdmsr_safe_insn:
    rdmsr
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, (%rsi)
    xorl %eax, %eax
    ret
    .global rdmsr_safe_fixup
rdmsr_safe_fixup:
    movl $1, %eax
    ret

    .global wrmsr_safe_asm
wrmsr_safe_asm:                 /* edi = msr, rsi = value ; returns 0 ok / 1 #GP */
    movl %edi, %ecx
    movl %esi, %eax
    movq %rsi, %rdx
    shrq $32, %rdx
    .global wrmsr_safe_insn
wrmsr_safe_insn:
    wrmsr
    xorl %eax, %eax
    ret
    .global wrmsr_safe_fixup
wrmsr_safe_fixup:
    movl $1, %eax
    ret
    .popsection
"#,
    options(att_syntax)
);

extern "C" {
    fn rdmsr_safe_asm(msr: u32, out: *mut u64) -> u32;
    fn wrmsr_safe_asm(msr: u32, val: u64) -> u32;
    static rdmsr_safe_insn: u8;
    static rdmsr_safe_fixup: u8;
    static wrmsr_safe_insn: u8;
    static wrmsr_safe_fixup: u8;
}

/// RDMSR that returns `None` if the access raised #GP.
pub fn rdmsr_safe(msr: u32) -> Option<u64> {
    let mut v = 0u64;
    if unsafe { rdmsr_safe_asm(msr, &mut v) } == 0 {
        Some(v)
    } else {
        None
    }
}

/// WRMSR that returns `false` if the access raised #GP.
pub fn wrmsr_safe(msr: u32, val: u64) -> bool {
    unsafe { wrmsr_safe_asm(msr, val) == 0 }
}

/// If `rip` is one of the guarded MSR instructions, the address to resume at.
pub fn gp_fixup(rip: u64) -> Option<u64> {
    unsafe {
        if rip == &rdmsr_safe_insn as *const u8 as u64 {
            Some(&rdmsr_safe_fixup as *const u8 as u64)
        } else if rip == &wrmsr_safe_insn as *const u8 as u64 {
            Some(&wrmsr_safe_fixup as *const u8 as u64)
        } else {
            None
        }
    }
}

#[inline]
pub fn rflags() -> u64 {
    let f: u64;
    unsafe { asm!("pushfq", "pop {}", out(reg) f, options(preserves_flags)) }
    f
}

/// True if RFLAGS.IF is set.
#[inline]
pub fn interrupts_enabled() -> bool {
    rflags() & 0x200 != 0
}

#[inline]
pub fn cli() {
    unsafe { asm!("cli", options(nostack)) }
}

#[inline]
pub fn sti() {
    unsafe { asm!("sti", options(nostack)) }
}

/// `sti; hlt` — the STI shadow guarantees an interrupt that became pending
/// before this point wakes the HLT instead of being taken before it.
#[inline]
pub fn sti_hlt() {
    unsafe { asm!("sti", "hlt", options(nostack)) }
}

#[inline]
pub fn pause() {
    unsafe { asm!("pause", options(nomem, nostack, preserves_flags)) }
}

#[inline]
pub fn mfence() {
    unsafe { asm!("mfence", "lfence", options(nostack, preserves_flags)) }
}

pub fn read_cr2() -> u64 {
    let v: u64;
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Stop this CPU for good (used after fatal errors and when exiting).
pub fn halt_forever() -> ! {
    loop {
        unsafe { asm!("cli", "hlt", options(nostack)) }
    }
}

/// RAII guard: disables interrupts, restores the previous IF on drop.
pub struct IrqGuard(bool);

impl IrqGuard {
    #[inline]
    pub fn new() -> Self {
        let was = interrupts_enabled();
        cli();
        IrqGuard(was)
    }
}

impl Drop for IrqGuard {
    #[inline]
    fn drop(&mut self) {
        if self.0 {
            sti();
        }
    }
}
