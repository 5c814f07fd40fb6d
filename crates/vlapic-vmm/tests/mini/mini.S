/* Minimal multiboot v1 guest for VMM smoke tests and exit-cost measurement.
 * Enters at 32-bit protected mode (paging off), switches to long mode (nested
 * KVM here emulates 32-bit code and cannot IRET there), reports on COM1 and
 * ends via port 0xF4. Tests: ROUNDS self-IPIs (xAPIC ICR or x2APIC SELF_IPI MSR,
 * whichever mode the APIC is in), one APIC timer one-shot taken from HLT. */
    .set APIC, 0xFEE00000
    .set ROUNDS, 1000
    .text
    .balign 4
    .long 0x1BADB002, 0x00000003, -(0x1BADB002 + 3)

    .code32
    .globl _start
_start:
    mov $stack_top, %esp
    /* page tables: PML4[0] -> PDPT; PDPT[0] -> PD0, PDPT[3] -> PD3; 2 MiB pages */
    mov $pdpt, %eax; or $3, %eax; mov %eax, pml4
    mov $pd0, %eax; or $3, %eax; mov %eax, pdpt
    mov $pd3, %eax; or $3, %eax; mov %eax, pdpt+24
    xor %ecx, %ecx
1:  mov %ecx, %eax; shl $21, %eax; or $0x83, %eax; mov %eax, pd0(,%ecx,8)
    mov %ecx, %eax; shl $21, %eax; add $0xC0000000, %eax; or $0x9B, %eax; mov %eax, pd3(,%ecx,8)
    inc %ecx; cmp $512, %ecx; jne 1b
    mov $pml4, %eax; mov %eax, %cr3
    mov %cr4, %eax; or $0x620, %eax; mov %eax, %cr4      /* PAE, OSFXSR, OSXMMEXCPT */
    mov $0xC0000080, %ecx; rdmsr; or $0x100, %eax; wrmsr  /* EFER.LME */
    mov %cr0, %eax; or $0x80000001, %eax; mov %eax, %cr0
    lgdt gdt_ptr
    ljmp $0x08, $long_start

    .code64
long_start:
    mov $0x10, %ax
    mov %ax, %ds; mov %ax, %es; mov %ax, %ss
    mov $stack_top, %rsp
    /* IDT: 16-byte gates; 0x40 ipi, 0x41 timer, others default */
    lea idt(%rip), %rdi
    xor %ecx, %ecx
2:  lea default_handler(%rip), %rax
    cmp $0x40, %ecx; jne 3f; lea ipi_handler(%rip), %rax
3:  cmp $0x41, %ecx; jne 4f; lea timer_handler(%rip), %rax
4:  mov %ax, (%rdi)
    movw $0x08, 2(%rdi)
    movw $0x8E00, 4(%rdi)
    shr $16, %rax
    mov %eax, 6(%rdi)
    movl $0, 12(%rdi)
    add $16, %rdi
    inc %ecx
    cmp $256, %ecx
    jne 2b
    lidt idt_ptr(%rip)
    lea msg_hello(%rip), %rsi; call puts
    /* x2APIC mode? (IA32_APIC_BASE bit 10) */
    mov $0x1B, %ecx; rdmsr
    and $0x400, %eax
    mov %eax, x2(%rip)
    /* software-enable the APIC */
    mov $0x1FF, %eax; mov $0xF0, %edi; call apic_write
    sti
    xor %ebx, %ebx
5:  mov ipi_count(%rip), %edx
    cmpl $0, x2(%rip); jne 51f
    mov $APIC, %r8d
    movl $0x00040040, 0x300(%r8)
    jmp 6f
51: mov $0x83F, %ecx; mov $0x40, %eax; xor %edx, %edx; wrmsr
    mov ipi_count(%rip), %edx; dec %edx   /* the IPI may already have been taken */
    mov %ebx, %eax; inc %eax; mov %eax, %edx
    jmp 61f
6:  cmp ipi_count(%rip), %edx
    je 6b
    jmp 62f
61: cmp ipi_count(%rip), %edx
    ja 61b
62: inc %ebx
    cmp $ROUNDS, %ebx
    jne 5b
    out %al, $0x80
    lea msg_ipi(%rip), %rsi; call puts
    /* timer: one-shot, vector 0x41, divide by 1, 200 us */
    mov $0x0B, %eax; mov $0x3E0, %edi; call apic_write
    mov $0x41, %eax; mov $0x320, %edi; call apic_write
    mov $200000, %eax; mov $0x380, %edi; call apic_write
7:  hlt
    cmpl $0, timer_count(%rip)
    je 7b
    lea msg_timer(%rip), %rsi; call puts
    lea msg_done(%rip), %rsi; call puts
    xor %eax, %eax
    out %eax, $0xF4
8:  cli; hlt; jmp 8b

/* eax = value, edi = xAPIC offset */
apic_write:
    cmpl $0, x2(%rip); jne 1f
    mov $APIC, %r8d
    mov %eax, (%r8,%rdi)
    ret
1:  mov %edi, %ecx; shr $4, %ecx; add $0x800, %ecx; xor %edx, %edx; wrmsr
    ret

eoi:
    push %rax; push %rdi; push %rcx; push %rdx
    xor %eax, %eax; mov $0xB0, %edi; call apic_write
    pop %rdx; pop %rcx; pop %rdi; pop %rax
    ret
ipi_handler:
    incl ipi_count(%rip)
    call eoi
    iretq
timer_handler:
    incl timer_count(%rip)
    call eoi
    iretq
default_handler:
    lea msg_unexp(%rip), %rsi; call puts
    mov $3, %eax
    out %eax, $0xF4
    jmp 8b

puts:                           /* rsi = NUL-terminated string */
    mov $0x3F8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  ret

    .data
    .balign 8
gdt: .quad 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF
gdt_ptr: .word 23
    .long gdt
    .balign 8
idt_ptr: .word 256*16-1
    .quad idt
x2: .long 0
ipi_count: .long 0
timer_count: .long 0
msg_hello: .asciz "mini guest: hello\n"
msg_ipi: .asciz "PASS self_ipi_1000\n"
msg_timer: .asciz "PASS timer_oneshot\n"
msg_done: .asciz "DONE mini\n"
msg_unexp: .asciz "FAIL unexpected: exception or stray vector\n"
    .bss
    .balign 4096
pml4: .skip 4096
pdpt: .skip 4096
pd0: .skip 4096
pd3: .skip 4096
idt: .skip 256*16
    .skip 8192
stack_top:
