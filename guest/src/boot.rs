//! Boot code: multiboot v1 header, 32-bit entry, page tables, switch to
//! long mode, and the real-mode AP trampoline.
//!
//! Boot flow (BSP):
//! 1. The multiboot loader enters `_start32` in 32-bit protected mode with
//!    paging off, EAX = 0x2BADB002, EBX = multiboot info address.
//! 2. We identity map the low 4 GiB with 2 MiB pages (everything at or above
//!    3 GiB — the LAPIC at 0xFEE00000 and the IOAPIC at 0xFEC00000 — is mapped
//!    PCD|PWT, i.e. uncached), enable PAE + SSE (CR4.OSFXSR/OSXMMEXCPT,
//!    CR0.EM=0, CR0.MP=1), set EFER.LME, enable paging and far-jump to 64-bit
//!    code, which calls `bsp_main(magic, info)` on the BSP boot stack.
//!
//! AP flow: the BSP copies `trampoline_start..trampoline_end` to
//! [`TRAMPOLINE_ADDR`] and sends INIT + SIPI (vector [`SIPI_VECTOR`]). The AP
//! starts in real mode at 0x0800:0000, loads the (shared) GDT, enters
//! protected mode, jumps to `ap_entry32` in the kernel image, follows the same
//! long-mode switch, picks its stack from its initial APIC ID
//! (CPUID.1:EBX[31:24]) and calls `ap_main(apic_id)`.
//!
//! The page tables and the boot GDT live in `.data` (explicitly zeroed in the
//! image), so they do not depend on the loader zeroing the BSS; Rust statics
//! in `.bss` do (every ELF loader does this).

use core::arch::global_asm;

use crate::percpu::{AP_STACK_SIZE, BSP_STACK_SIZE, MAX_CPUS};

/// Physical address the AP trampoline is copied to (below 1 MiB, 4 KiB aligned).
pub const TRAMPOLINE_ADDR: u64 = 0x8000;
/// SIPI vector: start address = vector << 12.
pub const SIPI_VECTOR: u32 = (TRAMPOLINE_ADDR >> 12) as u32;
/// GDT selector of the first TSS descriptor (each CPU has a 16-byte one).
pub const TSS_SELECTOR_BASE: u16 = 0x20;

global_asm!(
    r#"
    /* ---------------- multiboot v1 header ---------------- */
    .pushsection .multiboot, "a"
    .balign 4
multiboot_header:
    .long 0x1BADB002                    /* magic */
    .long 0x00000003                    /* flags: page-align modules, want mem info */
    .long -(0x1BADB002 + 0x00000003)    /* checksum */
    .popsection

    /* ---------------- boot data (in the image, not BSS) ---------------- */
    .pushsection .data.boot, "aw"
    .balign 4096
    .global boot_pml4
boot_pml4:  .fill 512, 8, 0
boot_pdpt:  .fill 512, 8, 0
boot_pd:    .fill 2048, 8, 0            /* 4 page directories: 4 GiB of 2 MiB pages */

    .balign 16
    .global gdt64
gdt64:
    .quad 0                             /* 0x00 null */
    .quad 0x00AF9A000000FFFF            /* 0x08 64-bit code */
    .quad 0x00CF92000000FFFF            /* 0x10 flat data */
    .quad 0x00CF9A000000FFFF            /* 0x18 32-bit code (AP trampoline) */
    .fill {tss_qwords}, 8, 0            /* 0x20.. per-CPU 16-byte TSS descriptors */
gdt64_end:
    .balign 8
    .global gdt64_ptr
gdt64_ptr:
    .word gdt64_end - gdt64 - 1
    .quad gdt64

    .global mb_magic
mb_magic:   .long 0
    .global mb_info
mb_info:    .long 0
    .popsection

    /* ---------------- stacks (BSS) ---------------- */
    .pushsection .bss.stacks, "aw", @nobits
    .balign 4096
bsp_stack:  .skip {bsp_stack_size}
bsp_stack_top:
    .global ap_stacks
ap_stacks:  .skip {ap_stacks_size}
    .popsection

    /* ---------------- 32-bit entry ---------------- */
    .pushsection .text.boot, "ax"
    .code32
    .global _start32
_start32:
    cli
    cld
    movl %eax, mb_magic
    movl %ebx, mb_info

    /* PML4[0] -> PDPT */
    movl $boot_pdpt, %eax
    orl $0x3, %eax
    movl %eax, boot_pml4

    /* PDPT[0..4] -> PD0..PD3 */
    movl $boot_pd, %eax
    orl $0x3, %eax
    movl $boot_pdpt, %edi
    movl $4, %ecx
1:  movl %eax, (%edi)
    movl $0, 4(%edi)
    addl $0x1000, %eax
    addl $8, %edi
    decl %ecx
    jnz 1b

    /* 2048 x 2 MiB identity pages; >= 3 GiB (MMIO) uncached */
    movl $boot_pd, %edi
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax                     /* present | writable | 2 MiB page */
    cmpl $1536, %ecx
    jb 3f
    orl $0x18, %eax                     /* PWT | PCD */
3:  movl %eax, (%edi,%ecx,8)
    movl $0, 4(%edi,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 2b

    lgdt gdt64_ptr
    jmp enter_long_mode_bsp

    /* AP path: arrives here from the real-mode trampoline (CS = 0x18) */
    .global ap_entry32
ap_entry32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $0x620, %eax                    /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx              /* EFER */
    rdmsr
    orl $0x100, %eax                    /* LME */
    wrmsr
    movl %cr0, %eax
    andl $0x9FFFFFFB, %eax              /* clear CD, NW, EM */
    orl $0x80000023, %eax               /* PG | NE | MP | PE */
    movl %eax, %cr0
    ljmp $0x08, $ap_start64

enter_long_mode_bsp:
    movl %cr4, %eax
    orl $0x620, %eax                    /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx              /* EFER */
    rdmsr
    orl $0x100, %eax                    /* LME */
    wrmsr
    movl %cr0, %eax
    andl $0x9FFFFFFB, %eax              /* clear CD, NW, EM */
    orl $0x80000023, %eax               /* PG | NE | MP | PE */
    movl %eax, %cr0
    ljmp $0x08, $bsp_start64

    /* ---------------- 64-bit entries ---------------- */
    .code64
bsp_start64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movq $bsp_stack_top, %rsp
    xorl %ebp, %ebp
    movl mb_magic(%rip), %edi
    movl mb_info(%rip), %esi
    call {bsp_main}
4:  cli
    hlt
    jmp 4b

ap_start64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $1, %eax
    cpuid
    shrl $24, %ebx                      /* initial APIC ID */
    cmpl ${max_cpus}, %ebx
    jae 5f
    movl %ebx, %edi
    leaq 1(%rbx), %rax
    imulq ${ap_stack_size}, %rax
    movq $ap_stacks, %rsp
    addq %rax, %rsp                     /* top of this CPU's stack */
    xorl %ebp, %ebp
    call {ap_main}
5:  cli
    hlt
    jmp 5b
    .popsection

    /* ---------------- real-mode AP trampoline (copied to {tramp}) ---------------- */
    .pushsection .rodata.trampoline, "a"
    .code16
    .global trampoline_start
trampoline_start:
    cli
    cld
    xorw %ax, %ax
    movw %ax, %ds
    lgdtl (trampoline_gdtr - trampoline_start + {tramp})
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x18, $ap_entry32
    .balign 8
trampoline_gdtr:
    .word gdt64_end - gdt64 - 1
    .long gdt64
    .global trampoline_end
trampoline_end:
    .code64
    .popsection
"#,
    tss_qwords = const MAX_CPUS * 2,
    bsp_stack_size = const BSP_STACK_SIZE,
    ap_stacks_size = const AP_STACK_SIZE * MAX_CPUS,
    ap_stack_size = const AP_STACK_SIZE,
    max_cpus = const MAX_CPUS,
    tramp = const TRAMPOLINE_ADDR,
    bsp_main = sym crate::bsp_main,
    ap_main = sym crate::smp::ap_main,
    options(att_syntax)
);

extern "C" {
    static trampoline_start: u8;
    static trampoline_end: u8;
    static mut gdt64: [u64; 4 + 2 * MAX_CPUS];
    static gdt64_ptr: u8;
}

/// Copy the AP trampoline to [`TRAMPOLINE_ADDR`].
pub fn install_trampoline() {
    unsafe {
        let start = &trampoline_start as *const u8;
        let len = (&trampoline_end as *const u8 as usize) - start as usize;
        assert!(len <= 4096);
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE_ADDR as *mut u8, len);
    }
}

/// Write the 16-byte TSS descriptor for CPU `index` into the GDT.
pub fn set_tss_descriptor(index: usize, base: u64, limit: u32) {
    let low = (limit as u64 & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | (0x89u64 << 40) // present, 64-bit available TSS
        | (((limit as u64 >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56);
    let high = base >> 32;
    unsafe {
        let gdt = core::ptr::addr_of_mut!(gdt64) as *mut u64;
        gdt.add(4 + 2 * index).write_volatile(low);
        gdt.add(5 + 2 * index).write_volatile(high);
    }
}

/// Reload the GDT (64-bit form) on the executing CPU.
pub fn load_gdt() {
    unsafe {
        core::arch::asm!("lgdt [{}]", in(reg) &gdt64_ptr as *const u8, options(nostack, preserves_flags));
    }
}
