/* Minimal multiboot v1 guest for VMM smoke tests and exit-cost measurement.
 * Enters at 32-bit protected mode (paging off), switches to long mode (nested
 * KVM here emulates 32-bit code and cannot IRET there), reports on COM1 and
 * ends via port 0xF4. No SSE anywhere (this nested KVM cannot run it).
 * Tests: ROUNDS self-IPIs (xAPIC ICR or x2APIC SELF_IPI MSR, whichever mode
 * the APIC is in), one APIC timer one-shot taken from HLT, then with more
 * than one CPU (fw_cfg key 5): INIT/SIPI start-up of every AP through a
 * real-mode trampoline at 0x8000, and one fixed IPI to each AP by APIC ID; in
 * xAPIC mode, last, no_tf_leak_after_kick (with the harness's help, see there). */
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
3:  cmp $0x41, %ecx; jne 31f; lea timer_handler(%rip), %rax
31: cmp $0x42, %ecx; jne 32f; lea ap_ipi_handler(%rip), %rax
32: cmp $0x02, %ecx; jne 33f; lea nmi_handler(%rip), %rax
33: cmp $0x43, %ecx; jne 34f; lea ioapic_edge_handler(%rip), %rax
34: cmp $0x44, %ecx; jne 37f; lea ioapic_level_handler(%rip), %rax
37: cmp $0x45, %ecx; jne 38f; lea nest_handler(%rip), %rax
38: cmp $0x55, %ecx; jne 39f; lea nest_handler(%rip), %rax
39: cmp $0x65, %ecx; jne 40f; lea nest_handler(%rip), %rax
40: cmp $0x0D, %ecx; jne 41f; lea gp_handler(%rip), %rax
41: cmp $0x01, %ecx; jne 42f; lea db_handler(%rip), %rax
42: cmp $0x46, %ecx; jne 4f; lea tf_irq_handler(%rip), %rax
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
    mov $0xFF, %al; out %al, $0x21; out %al, $0xA1   /* mask both 8259s */
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
7:  cli                         /* check, then sti; hlt (the STI shadow closes the race) */
    cmpl $0, timer_count(%rip)
    jne 71f
    sti
    hlt
    jmp 7b
71: sti
    lea msg_timer(%rip), %rsi; call puts
    /* periodic timer while the CPU spins: 100 interrupts, 100 us period */
    movl $0, timer_count(%rip)
    mov $0x20041, %eax; mov $0x320, %edi; call apic_write
    mov $100000, %eax; mov $0x380, %edi; call apic_write
20: cmpl $100, timer_count(%rip)
    jb 20b
    mov $0x10041, %eax; mov $0x320, %edi; call apic_write
    xor %eax, %eax; mov $0x380, %edi; call apic_write
    lea msg_periodic(%rip), %rsi; call puts
    /* 100 one-shot interrupts, each taken from HLT */
    mov $0x41, %eax; mov $0x320, %edi; call apic_write
    xor %r13d, %r13d
21: movl $0, timer_count(%rip)
    mov $50000, %eax; mov $0x380, %edi; call apic_write
22: cli
    cmpl $0, timer_count(%rip)
    jne 23f
    sti
    hlt
    jmp 22b
23: sti
    inc %r13d
    cmp $100, %r13d
    jb 21b
    lea msg_hlt(%rip), %rsi; call puts
    /* TSC-deadline: deadline = now + 500 us of TSC (2.6 GHz assumed only for the
       distance); the handler must see rdtsc >= deadline */
    mov $0x40041, %eax; mov $0x320, %edi; call apic_write     /* TSC-deadline mode */
    movl $0, timer_count(%rip)
    rdtsc; shl $32, %rdx; or %rax, %rdx
    add $1300000, %rdx
    mov %rdx, tsc_deadline(%rip)
    mov %edx, %eax; shr $32, %rdx
    mov $0x6E0, %ecx; wrmsr
40: cli
    cmpl $0, timer_count(%rip)
    jne 41f
    sti
    hlt
    jmp 40b
41: sti
    mov timer_tsc(%rip), %rax
    cmp tsc_deadline(%rip), %rax
    jb 42f
    lea msg_tscd(%rip), %rsi; call puts
    jmp 43f
42: lea msg_tscd_early(%rip), %rsi; call puts
43: mov $0x10041, %eax; mov $0x320, %edi; call apic_write
    /* NMI to self by physical destination (our APIC ID is 0) */
    xor %edx, %edx; mov $0x400, %eax; call send_ipi
    mov $1, %ebx
    lea nmi_count(%rip), %rdi; call wait_count
    test %eax, %eax; jnz 24f
    lea msg_nmi(%rip), %rsi; call puts
    jmp 25f
24: lea msg_nmi_fail(%rip), %rsi; call puts
25:
    /* CR8 = 15 holds back a class-4 self-IPI; CR8 = 0 lets it in */
    mov ipi_count(%rip), %r14d
    mov $15, %eax; mov %rax, %cr8
    xor %edx, %edx; mov $0x40040, %eax; call send_icr_all_self
    mov $20000, %ecx
26: pause
    dec %ecx
    jnz 26b
    cmp ipi_count(%rip), %r14d
    jne 27f
    xor %eax, %eax; mov %rax, %cr8
    inc %r14d
    mov %r14d, %ebx
    lea ipi_count(%rip), %rdi; call wait_count
    test %eax, %eax; jnz 27f
    lea msg_cr8(%rip), %rsi; call puts
    jmp 28f
27: xor %eax, %eax; mov %rax, %cr8
    lea msg_cr8_fail(%rip), %rsi; call puts
28:
    /* nesting: the handler of 0x45 re-enables interrupts and takes 0x55 (a
       higher class) before its EOI, whose handler takes 0x65: depth 3 */
    xor %edx, %edx; mov $0x40045, %eax; call send_icr_all_self
    mov $1, %ebx
    lea nest_done(%rip), %rdi; call wait_count
    test %eax, %eax; jnz 35f
    cmpl $3, nest_depth_max(%rip)
    jne 35f
    lea msg_nest(%rip), %rsi; call puts
    jmp 36f
35: lea msg_nest_fail(%rip), %rsi; call puts
36:
    /* IOAPIC: pin 5 edge -> 0x43, pin 6 level -> 0x44, raised with pc-testdev ports */
    mov $0x10 + 2*5, %edi; mov $0x43, %eax; call ioapic_write
    mov $0x11 + 2*5, %edi; xor %eax, %eax; call ioapic_write
    mov $0x10 + 2*6, %edi; mov $0x8044, %eax; call ioapic_write
    mov $0x11 + 2*6, %edi; xor %eax, %eax; call ioapic_write
    mov $1, %al; mov $0x2005, %dx; out %al, %dx
    mov $0, %al; out %al, %dx
    mov $1, %ebx
    lea ioapic_edge_count(%rip), %rdi; call wait_count
    test %eax, %eax; jnz 29f
    mov $1, %al; mov $0x2006, %dx; out %al, %dx      /* handler lowers it before EOI */
    mov $1, %ebx
    lea ioapic_level_count(%rip), %rdi; call wait_count
    test %eax, %eax; jnz 29f
    lea msg_ioapic(%rip), %rsi; call puts
    jmp 30f
29: lea msg_ioapic_fail(%rip), %rsi; call puts
30:
    /* CPU count from fw_cfg */
    mov $0x510, %dx; mov $5, %ax; out %ax, %dx
    mov $0x511, %dx; in %dx, %al; movzbl %al, %ebx; in %dx, %al; movzbl %al, %eax; shl $8, %eax; or %eax, %ebx
    mov %ebx, ncpus(%rip)
    cmp $1, %ebx
    jbe 90f
    /* copy the trampoline to 0x8000 */
    lea tramp_start(%rip), %rsi
    mov $0x8000, %edi
    mov $(tramp_end - tramp_start), %ecx
    rep movsb
    /* INIT, then SIPI (vector 8 = 0x8000) to all excluding self */
    mov $0x000C4500, %eax; call send_icr_all
    mov $0x000C4608, %eax; call send_icr_all
    mov ncpus(%rip), %ebx; dec %ebx
    lea ap_started(%rip), %rdi; call wait_count
    test %eax, %eax; jnz 91f
    lea msg_smp(%rip), %rsi; call puts
    /* one fixed IPI 0x42 to each AP, by physical APIC ID */
    mov $1, %r12d
10: cmp ncpus(%rip), %r12d
    jae 11f
    mov %r12d, %edx; mov $0x42, %eax; call send_ipi
    inc %r12d
    jmp 10b
11: mov ncpus(%rip), %ebx; dec %ebx
    lea ap_ipi_count(%rip), %rdi; call wait_count
    test %eax, %eax; jnz 92f
    lea msg_apipi(%rip), %rsi; call puts
    jmp 90f
91: lea msg_smp_fail(%rip), %rsi; call puts
    jmp 90f
92: lea msg_apipi_fail(%rip), %rsi; call puts
90:
    /* no_tf_leak_after_kick (xAPIC only: RDMSR 0x802 must #GP): with TPR 0xF0 the
       refused RDMSR's exit makes the harness send vector 0x46 (held back by TPR) and
       set immediate_exit, so KVM queues the #GP but returns before delivering it.
       The adapter must not single-step the entry that delivers it: the #GP handler's
       40 APIC reads would use up the step budget, stepping would stop with KVM's TF
       in the #GP frame, and IRETQ would turn it on (a #DB the guest never asked for).
       Only where the harness takes part: port 0x513 reads 0x5A (elsewhere 0xFF). */
    cmpl $0, x2(%rip); jne 95f
    mov $0x513, %dx; in %dx, %al; cmp $0x5A, %al; jne 95f
    mov $0xF0, %eax; mov $0x80, %edi; call apic_write
    mov $0x802, %ecx; rdmsr
    xor %eax, %eax; mov $0x80, %edi; call apic_write
    mov $1, %ebx; lea tf_irq_count(%rip), %rdi; call wait_count
    test %eax, %eax; jnz 94f
    cmpl $1, gp_count(%rip); jne 94f
    cmpl $0, db_count(%rip); jne 94f
    lea msg_tf(%rip), %rsi; call puts
    jmp 95f
94: lea msg_tf_fail(%rip), %rsi; call puts
95:
    lea msg_done(%rip), %rsi; call puts
    xor %eax, %eax
    out %eax, $0xF4
8:  cli; hlt; jmp 8b

/* wait until the u32 at rdi reaches ebx; eax = 0 ok, 1 on timeout (~4 s of TSC) */
wait_count:
    push %rbx
    rdtsc; shl $32, %rdx; or %rax, %rdx; mov %rdx, %r9
    mov $10000000000, %r10; add %r10, %r9
1:  cmp (%rdi), %ebx
    jbe 2f
    pause
    rdtsc; shl $32, %rdx; or %rax, %rdx
    cmp %r9, %rdx
    jb 1b
    pop %rbx; mov $1, %eax; ret
2:  pop %rbx; xor %eax, %eax; ret

/* ICR low = eax with a shorthand (no destination) */
send_icr_all:
    cmpl $0, x2(%rip); jne 1f
    mov $APIC, %r8d
    movl %eax, 0x300(%r8)
    ret
1:  mov $0x830, %ecx; xor %edx, %edx; wrmsr
    ret

/* self IPI with vector in eax's low byte (shorthand self) */
send_icr_all_self:
    cmpl $0, x2(%rip); jne 1f
    mov $APIC, %r8d
    movl %eax, 0x300(%r8)
    ret
1:  and $0xFF, %eax
    mov $0x83F, %ecx; xor %edx, %edx; wrmsr
    ret

/* fixed IPI: eax = ICR low, edx = destination APIC ID */
send_ipi:
    cmpl $0, x2(%rip); jne 1f
    mov $APIC, %r8d
    shl $24, %edx
    movl %edx, 0x310(%r8)
    movl %eax, 0x300(%r8)
    ret
1:  mov $0x830, %ecx; wrmsr
    ret

/* IOAPIC register edi = eax */
ioapic_write:
    mov $0xFEC00000, %r8d
    movl %edi, (%r8)
    movl %eax, 0x10(%r8)
    ret

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
/* shared by 0x45/0x55/0x65: depth d = ++nest_depth; if d < 3, send the
   next class to self with interrupts on and wait for it; then EOI */
nest_handler:
    push %rax; push %rbx; push %rcx; push %rdx; push %rdi; push %r8
    incl nest_depth(%rip)
    mov nest_depth(%rip), %eax
    cmp nest_depth_max(%rip), %eax
    jbe 1f
    mov %eax, nest_depth_max(%rip)
1:  cmp $3, %eax
    jae 2f
    mov %eax, %ebx                      /* wait until depth_max > current */
    shl $4, %eax
    add $0x40045, %eax                  /* 0x45 + 16*d: 0x55, 0x65 */
    xor %edx, %edx
    call send_icr_all_self
    sti
3:  cmp nest_depth_max(%rip), %ebx
    jae 3b
    cli
2:  decl nest_depth(%rip)
    cmpl $0, nest_depth(%rip)
    jne 4f
    movl $1, nest_done(%rip)
4:  pop %r8; pop %rdi; pop %rdx; pop %rcx; pop %rbx; pop %rax
    call eoi
    iretq
ioapic_edge_handler:
    lock incl ioapic_edge_count(%rip)
    call eoi
    iretq
ioapic_level_handler:
    push %rax; push %rdx
    lock incl ioapic_level_count(%rip)
    mov $0, %al; mov $0x2006, %dx; out %al, %dx
    pop %rdx; pop %rax
    call eoi
    iretq
nmi_handler:
    lock incl nmi_count(%rip)
    iretq
ap_ipi_handler:
    lock incl ap_ipi_count(%rip)
    call eoi
    iretq
ipi_handler:
    incl ipi_count(%rip)
    call eoi
    iretq
timer_handler:
    push %rax; push %rdx
    rdtsc; shl $32, %rdx; or %rax, %rdx
    mov %rdx, timer_tsc(%rip)
    pop %rdx; pop %rax
    incl timer_count(%rip)
    call eoi
    iretq
/* #GP (no_tf_leak_after_kick): 40 APIC reads, then skip the 2-byte RDMSR */
gp_handler:
    push %rax; push %rcx; push %r8
    mov $APIC, %r8d
    mov $40, %ecx
1:  mov 0x20(%r8), %eax
    dec %ecx; jnz 1b
    incl gp_count(%rip)
    addq $2, 32(%rsp)
    pop %r8; pop %rcx; pop %rax
    add $8, %rsp
    iretq
/* #DB: only a single-step trap from a TF this guest never sets; count it, clear TF */
db_handler:
    incl db_count(%rip)
    andq $~0x100, 16(%rsp)
    iretq
tf_irq_handler:
    incl tf_irq_count(%rip)
    call eoi
    iretq
default_handler:
    lea msg_unexp(%rip), %rsi; call puts
    mov $3, %eax
    out %eax, $0xF4
    jmp 8b

/* ---- AP start-up: real mode at 0x8000 -> 32-bit -> long mode ---- */
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
    mov %cr4, %eax; or $0x620, %eax; mov %eax, %cr4
    mov $0xC0000080, %ecx; rdmsr; or $0x100, %eax; wrmsr
    mov %cr0, %eax; or $0x80000001, %eax; mov %eax, %cr0
    ljmp $0x08, $ap64

    .code64
ap64:
    mov $1, %eax
    lock xadd %eax, ap_next(%rip)
    inc %eax
    shl $12, %eax
    lea ap_stacks(%rip), %rsp
    add %rax, %rsp
    lidt idt_ptr(%rip)
    mov $0x1FF, %eax; mov $0xF0, %edi; call apic_write
    lock incl ap_started(%rip)
1:  sti
    hlt
    jmp 1b

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
gdt: .quad 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00CF9A000000FFFF
gdt_ptr: .word 31
    .long gdt
    .balign 8
idt_ptr: .word 256*16-1
    .quad idt
x2: .long 0
ipi_count: .long 0
timer_count: .long 0
ncpus: .long 1
ap_started: .long 0
ap_ipi_count: .long 0
ap_next: .long 0
msg_smp: .asciz "PASS smp_startup\n"
msg_smp_fail: .asciz "FAIL smp_startup: not every AP came up\n"
msg_apipi: .asciz "PASS ipi_to_aps\n"
msg_apipi_fail: .asciz "FAIL ipi_to_aps: not every AP took its IPI\n"
msg_hello: .asciz "mini guest: hello\n"
msg_ipi: .asciz "PASS self_ipi_1000\n"
msg_timer: .asciz "PASS timer_oneshot\n"
msg_periodic: .asciz "PASS timer_periodic_100\n"
msg_hlt: .asciz "PASS timer_from_hlt_100\n"
msg_nmi: .asciz "PASS nmi_self\n"
msg_nmi_fail: .asciz "FAIL nmi_self: no NMI\n"
msg_cr8: .asciz "PASS cr8_masks\n"
msg_cr8_fail: .asciz "FAIL cr8_masks: CR8 did not hold back the IPI, or lowering it did not release it\n"
nmi_count: .long 0
    .balign 8
tsc_deadline: .quad 0
timer_tsc: .quad 0
msg_tscd: .asciz "PASS tsc_deadline\n"
msg_tscd_early: .asciz "FAIL tsc_deadline: interrupt before the deadline\n"
nest_depth: .long 0
nest_depth_max: .long 0
nest_done: .long 0
msg_nest: .asciz "PASS nested_3_deep\n"
msg_nest_fail: .asciz "FAIL nested_3_deep: did not nest three deep\n"
ioapic_edge_count: .long 0
ioapic_level_count: .long 0
msg_ioapic: .asciz "PASS ioapic_edge_and_level\n"
msg_ioapic_fail: .asciz "FAIL ioapic_edge_and_level: interrupt not delivered\n"
gp_count: .long 0
db_count: .long 0
tf_irq_count: .long 0
msg_tf: .asciz "PASS no_tf_leak_after_kick\n"
msg_tf_fail: .asciz "FAIL no_tf_leak_after_kick: #GP, #DB or vector 0x46 count wrong\n"
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
ap_stacks: .skip 4096*64
