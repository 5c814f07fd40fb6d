/* hostile: multiboot v1 entry, 32-bit -> long mode, the AP trampoline and one
 * interrupt stub per vector. The C part (hostile.c) does the rest.
 * Nested KVM on the project's host cannot run 32-bit IRET, INT n, INT3 or SSE:
 * everything after the first far jump is 64-bit code without SSE. */
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00000003
    .set STACK_SIZE, 16384

    .section .multiboot, "a"
    .balign 4
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

    .text
    .code32
    .globl _start
_start:
    cli
    mov $(stacks + STACK_SIZE), %esp
    mov %ebx, mb_info
    /* page tables: PML4[0] -> PDPT; PDPT[0] -> PD0 (RAM, 1 GiB), PDPT[3] -> PD3
       (3-4 GiB, uncached: the IOAPIC and every page the APIC can be moved to) */
    mov $pdpt, %eax; or $3, %eax; mov %eax, pml4
    mov $pd0, %eax; or $3, %eax; mov %eax, pdpt
    mov $pd3, %eax; or $3, %eax; mov %eax, pdpt+24
    xor %ecx, %ecx
1:  mov %ecx, %eax; shl $21, %eax; or $0x83, %eax; mov %eax, pd0(,%ecx,8)
    mov %ecx, %eax; shl $21, %eax; add $0xC0000000, %eax; or $0x9B, %eax; mov %eax, pd3(,%ecx,8)
    inc %ecx; cmp $512, %ecx; jne 1b
    call enter_long_mode_regs
    lgdt gdt_ptr
    ljmp $0x08, $long_start

/* CR3, CR4.PAE, EFER.LME, CR0.PG|PE (shared by the BSP and the APs) */
enter_long_mode_regs:
    mov $pml4, %eax; mov %eax, %cr3
    mov %cr4, %eax; or $0x20, %eax; mov %eax, %cr4
    mov $0xC0000080, %ecx; rdmsr; or $0x100, %eax; wrmsr
    mov %cr0, %eax; or $0x80000001, %eax; mov %eax, %cr0
    ret

    .code64
long_start:
    mov $0x10, %ax
    mov %ax, %ds; mov %ax, %es; mov %ax, %ss; mov %ax, %fs; mov %ax, %gs
    lea (stacks + STACK_SIZE)(%rip), %rsp
    call idt_fill
    lidt idt_ptr(%rip)
    mov mb_info(%rip), %edi
    call kmain
2:  cli; hlt; jmp 2b

/* IDT: 256 interrupt gates (DPL 0, IST 0) to the 32-byte stubs below */
idt_fill:
    lea idt(%rip), %rdi
    lea isr_stubs(%rip), %rax
    xor %ecx, %ecx
1:  mov %ax, (%rdi)
    movw $0x08, 2(%rdi)
    movw $0x8E00, 4(%rdi)
    mov %rax, %rdx
    shr $16, %rdx
    mov %edx, 6(%rdi)
    movl $0, 12(%rdi)
    add $16, %rdi
    add $32, %rax
    inc %ecx
    cmp $256, %ecx
    jne 1b
    ret

/* One stub per vector, 32 bytes apart: the common code finds the vector from the
   stub's return address. Any vector may arrive with or without an error code (the
   APIC can deliver 16-31, which share numbers with exceptions that push one), so
   the stub looks: CS (0x08) right above RIP means no error code; then it pushes -1. */
    .balign 32
    .globl isr_stubs
isr_stubs:
    .rept 256
    .balign 32
    cmpq $0x08, 8(%rsp)
    jne 1f
    pushq $-1
1:  call isr_common
    .endr

isr_common:
    push %rax; push %rbx; push %rcx; push %rdx; push %rsi; push %rdi; push %rbp
    push %r8; push %r9; push %r10; push %r11; push %r12; push %r13; push %r14; push %r15
    mov %rsp, %rdi
    cld
    call isr
    pop %r15; pop %r14; pop %r13; pop %r12; pop %r11; pop %r10; pop %r9; pop %r8
    pop %rbp; pop %rdi; pop %rsi; pop %rdx; pop %rcx; pop %rbx; pop %rax
    add $16, %rsp           /* stub return address, error code */
    iretq

/* ---- AP start-up: real mode at 0x8000 -> 32-bit -> long mode -> ap_main ---- */
    .globl tramp_start, tramp_end
    .code16
tramp_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    lgdtl 0x8000 + (tramp_gdtp - tramp_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x18, $ap32
    .balign 8
tramp_gdtp:
    .word 31
    .long gdt
tramp_end:

    .code32
ap32:
    mov $0x10, %ax
    mov %ax, %ds; mov %ax, %es; mov %ax, %ss
    mov $pml4, %eax; mov %eax, %cr3
    mov %cr4, %eax; or $0x20, %eax; mov %eax, %cr4
    mov $0xC0000080, %ecx; rdmsr; or $0x100, %eax; wrmsr
    mov %cr0, %eax; or $0x80000001, %eax; mov %eax, %cr0
    ljmp $0x08, $ap64

    .code64
ap64:
    mov $0x10, %ax
    mov %ax, %fs; mov %ax, %gs
    mov $1, %eax
    cpuid
    shr $24, %ebx                        /* initial APIC ID = this AP's CPU index */
    mov %ebx, %eax
    mov %eax, %edi
    cmp $8, %eax
    jae 3f
    inc %eax
    shl $14, %eax                        /* STACK_SIZE */
    lea stacks(%rip), %rsp
    add %rax, %rsp
    lidt idt_ptr(%rip)
    call ap_main
3:  cli; hlt; jmp 3b

    .data
    .balign 8
gdt: .quad 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00CF9A000000FFFF
gdt_ptr: .word 31
    .long gdt
    .balign 8
idt_ptr: .word 256*16-1
    .quad idt
    .globl mb_info
mb_info: .long 0

    .bss
    .balign 4096
pml4: .skip 4096
pdpt: .skip 4096
pd0: .skip 4096
pd3: .skip 4096
idt: .skip 256*16
    .balign 16384
    .globl stacks
stacks: .skip 16384*8

    .section .note.GNU-stack, "", @progbits
