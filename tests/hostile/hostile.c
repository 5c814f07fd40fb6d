/* hostile: a multiboot v1 kernel that attacks its interrupt controllers.
 *
 * Command line (multiboot cmdline, `vlapic run --append`):
 *   seed=N      PRNG seed (default 1)
 *   rounds=N    chaos operations per CPU (default 3000)
 *   halt_ms=N   length of each hostile-timer halt (default 1000; 0 = no halt phase)
 *   only=halt   skip the chaos, run only the halt phase (for CPU-time measurement)
 *
 * Every CPU (the BSP, and the APs it starts with INIT/SIPI when fw_cfg key 5 says
 * there are several) runs `rounds` random operations on its own local APIC:
 * xAPIC MMIO reads and writes of any offset and size in the APIC page, x2APIC
 * RDMSR/WRMSR over 0x800-0x8FF, IA32_APIC_BASE flips (disable, xAPIC, x2APIC,
 * garbage) and relocations, ICRs of every delivery mode and shorthand, illegal LVT
 * vectors, extreme timer counts, divides and TSC deadlines, TPR/CR8, EOIs, and
 * `lock cmpxchg8b` / `rep movsd` / `rep stosd` on the APIC page. The BSP also hits
 * the IOAPIC (IOREGSEL/IOWIN, redirection entries, pin pulses through pc-testdev).
 * #GP (a refused RDMSR/WRMSR) is counted and the 2-byte instruction skipped; every
 * vector has a handler that EOIs exactly when the vector is in service (else it
 * counts a spurious interrupt); NMIs are counted.
 *
 * What the guest must never do, so that it survives its own chaos:
 *   - INIT/SIPI only to APIC IDs that do not exist (physical destination), never a
 *     shorthand (the INIT level de-assert, which resets nobody, may use any);
 *   - no IOAPIC entry in INIT/SIPI mode may point at a live CPU;
 *   - no write to the ID or ICR registers outside the ICR generator;
 *   - the xAPIC page is only touched when IA32_APIC_BASE places it in the window
 *     0xFE000000-0xFEFFFFFF (mapped uncached, not RAM).
 *
 * Then each CPU restores a sane APIC (disable/re-enable, SVR, TPR 0), the BSP
 * masks every IOAPIC entry, checks that a self-IPI and a one-shot timer still work,
 * and with 2+ CPUs runs the halt phase: its own timer hostile (A: LVT masked,
 * periodic, divide 1, count 1; B: TPR 0xF0 + unmasked periodic count 1), `sti; hlt`
 * for halt_ms each, printing HALT-BEGIN/HALT-END around each; CPU 1 is the alarm
 * clock (its own one-shot APIC timer, then an NMI to the BSP).
 * Finally `DONE hostile seed=... gp=... irqs=...` and 0 to port 0xF4.
 *
 * Built by build.sh: gcc -m64 -mgeneral-regs-only (no SSE: this host's nested KVM
 * cannot run it), ld at 1 MiB, objcopy to an ELF32 container. */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;

#define MAX_CPUS 8
#define STACK_SIZE 16384
#define APIC_DEFAULT 0xFEE00000UL
#define IOAPIC 0xFEC00000UL
#define WIN_LO 0xFE000000UL
#define WIN_HI 0xFF000000UL
#define MSR_APIC_BASE 0x1B
#define MSR_TSC_DEADLINE 0x6E0
#define BASE_BSP (1UL << 8)
#define BASE_EXTD (1UL << 10)
#define BASE_EN (1UL << 11)
#define V_SELFTEST 0x50
#define V_ALARM 0xE0
#define V_AP_TIMER 0x41
#define V_HALT_TIMER 0x40

extern u8 stacks[];
extern u8 isr_stubs[];
extern u8 tramp_start[], tramp_end[];
extern u32 mb_info;

struct frame {
    u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
    u64 stub_ret, err, rip, cs, rflags, rsp, ss;
};

struct cpu {
    u64 rng;
    u64 boot_base;          /* IA32_APIC_BASE at start */
    volatile u32 vec_count[256];
    volatile u32 nmis;
    volatile u32 gp;
    volatile u32 alarm;     /* BSP -> CPU 1: start the alarm clock */
};

static struct cpu cpus[MAX_CPUS];
static volatile u32 g_gp, g_irqs, g_spurious, g_nmis, g_eoi, g_tf_leaks, g_nmi_at_hlt;

/* Halts until *flag is non-zero: `cli; check; sti; hlt`, looping. `cli` does not hold
   off an NMI, so an NMI whose handler sets the flag after the check and before the
   `hlt` would have its wake-up slept through; the NMI handler sends such an NMI's
   return address back to the check (wait_flag_check..wait_flag_hlt is the window). */
__asm__(".text\n"
        ".globl wait_flag, wait_flag_check, wait_flag_checked, wait_flag_hlt\n"
        "wait_flag:\n"
        "wait_flag_check:\n"
        "\tcli\n"
        "\tcmpl $0, (%rdi)\n"
        "wait_flag_checked:\n"
        "\tjne 1f\n"
        "\tsti\n"
        "wait_flag_hlt:\n"
        "\thlt\n"
        "\tjmp wait_flag_check\n"
        "1:\tsti\n"
        "\tret\n");
extern void wait_flag(volatile u32 *flag);
extern const char wait_flag_check[], wait_flag_checked[], wait_flag_hlt[];
static volatile u32 ap_ready, ap_done, halt_woken;
static volatile u32 print_lock;
static u32 ncpus = 1;
static u64 seed = 1;
static u32 rounds = 3000;
static u32 halt_ms = 1000;
static int only_halt;
static u32 ioapic_low_shadow[24];

/* ---------------------------------------------------------------- basics */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void pause(void) { __asm__ volatile("pause" ::: "memory"); }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return (u64)hi << 32 | lo; }
static inline void write_cr8(u64 v) { __asm__ volatile("mov %0, %%cr8" ::"r"(v) : "memory"); }

/* RDMSR/WRMSR may #GP: the handler counts it and skips the 2-byte instruction, so
   a refused read returns 0. */
static inline u64 rdmsr(u32 msr) {
    u32 lo = 0, hi = 0;
    __asm__ volatile("rdmsr" : "+a"(lo), "+d"(hi) : "c"(msr) : "memory");
    return (u64)hi << 32 | lo;
}
static inline void wrmsr(u32 msr, u64 v) {
    __asm__ volatile("wrmsr" ::"c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}

static inline u32 atomic_inc(volatile u32 *p) { return __atomic_add_fetch(p, 1, __ATOMIC_SEQ_CST); }

static struct cpu *me(void) {
    u8 here;
    u64 i = (u64)(&here - stacks) / STACK_SIZE;
    return &cpus[i < MAX_CPUS ? i : 0];
}
static u32 my_index(void) { return (u32)(me() - cpus); }

void *memset(void *d, int c, u64 n) { u8 *p = d; while (n--) *p++ = (u8)c; return d; }
void *memcpy(void *d, const void *s, u64 n) { u8 *p = d; const u8 *q = s; while (n--) *p++ = *q++; return d; }

static void putc_raw(char c) { outb(0x3F8, (u8)c); }
static void puts_raw(const char *s) { while (*s) putc_raw(*s++); }
static void putu_raw(u64 v) {
    char b[24]; int i = 0;
    do { b[i++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (i) putc_raw(b[--i]);
}
static void putx_raw(u64 v) {
    puts_raw("0x");
    for (int s = 60; s >= 0; s -= 4) {
        int d = (int)(v >> s) & 15;
        if (d || s == 0 || v >> s) putc_raw("0123456789abcdef"[d]);
    }
}
static void lock(void) { while (__atomic_exchange_n(&print_lock, 1, __ATOMIC_ACQUIRE)) pause(); }
static void unlock(void) { __atomic_store_n(&print_lock, 0, __ATOMIC_RELEASE); }

static void guest_exit(u32 code) {
    outl(0xF4, code);
    for (;;) __asm__ volatile("cli; hlt");
}

static void fatal(const char *what, u64 a, u64 b, u64 c) {
    /* no lock: may run inside a handler that interrupted a printer */
    puts_raw("\nFAIL hostile_fatal: ");
    puts_raw(what);
    puts_raw(" cpu="); putu_raw(my_index());
    puts_raw(" a="); putx_raw(a);
    puts_raw(" b="); putx_raw(b);
    puts_raw(" c="); putx_raw(c);
    puts_raw("\n");
    guest_exit(1);
}

/* xorshift64* */
static u64 rnd(void) {
    struct cpu *c = me();
    u64 x = c->rng;
    x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
    c->rng = x;
    return x * 0x2545F4914F6CDD1DUL;
}
static u32 rn(u32 n) { return (u32)(rnd() % n); }

/* ---------------------------------------------------------------- APIC access */

static u64 apic_base_msr(void) { return rdmsr(MSR_APIC_BASE); }
static int mode_x2(u64 b) { return (b & (BASE_EN | BASE_EXTD)) == (BASE_EN | BASE_EXTD); }
static int mode_x(u64 b) { return (b & (BASE_EN | BASE_EXTD)) == BASE_EN; }
/* The xAPIC page if it may be touched: xAPIC mode and inside the window. */
static u64 xpage(u64 b) {
    u64 p = b & 0xFFFFFF000UL;
    if (!mode_x(b) || p < WIN_LO || p >= WIN_HI) return 0;
    return p;
}

/* Register `off` (xAPIC offset) in whichever mode the APIC is in; 0/ignored when
   disabled. */
static u32 apic_read(u32 off) {
    u64 b = apic_base_msr();
    if (mode_x2(b)) return (u32)rdmsr(0x800 + (off >> 4));
    u64 p = xpage(b);
    if (p) return *(volatile u32 *)(p + off);
    return 0;
}
static void apic_write(u32 off, u32 v) {
    u64 b = apic_base_msr();
    if (mode_x2(b)) { wrmsr(0x800 + (off >> 4), v); return; }
    u64 p = xpage(b);
    if (p) *(volatile u32 *)(p + off) = v;
}
static void send_ipi(u32 dest, u32 low) {
    u64 b = apic_base_msr();
    if (mode_x2(b)) { wrmsr(0x830, (u64)dest << 32 | low); return; }
    u64 p = xpage(b);
    if (!p) return;
    *(volatile u32 *)(p + 0x310) = dest << 24;
    *(volatile u32 *)(p + 0x300) = low;
}

/* ---------------------------------------------------------------- interrupts */

void isr(struct frame *f) {
    u32 v = (u32)((f->stub_ret - (u64)isr_stubs) / 32);
    struct cpu *c = me();
    int has_err = f->err != (u64)-1;
    if (v == 2 && !has_err) {
        c->nmis++;
        atomic_inc(&g_nmis);
        if (my_index() == 0) halt_woken = 1;
        if (f->rip >= (u64)wait_flag_check && f->rip <= (u64)wait_flag_hlt) {
            /* Counted when the flag was already read: the wake-up this saves. */
            if (f->rip >= (u64)wait_flag_checked) atomic_inc(&g_nmi_at_hlt);
            f->rip = (u64)wait_flag_check;          /* the wake-up is not slept through */
        }
        return;
    }
    if (v == 13 && has_err) {
        const u8 *ip = (const u8 *)f->rip;
        if (ip[0] == 0x0F && (ip[1] == 0x30 || ip[1] == 0x32)) {
            f->rip += 2;
            c->gp++;
            atomic_inc(&g_gp);
            return;
        }
        fatal("#GP not on RDMSR/WRMSR", f->rip, f->err, ip[0] | (u64)ip[1] << 8);
    }
    if (v == 1 && !has_err) {
        /* #DB: DR6.BS (bit 14) set means a single-step trap, which this guest never
           asks for (RFLAGS.TF is never set here): a host's single-stepping leaked. */
        u64 dr6;
        __asm__ volatile("mov %%dr6, %0" : "=r"(dr6));
        if ((dr6 & (1UL << 14)) && (f->rflags & 0x100)) {
            /* Survive it (clear TF in the frame and DR6.BS) and count it: DONE
               reports tf_leaks=N, the test decides. */
            f->rflags &= ~0x100UL;
            __asm__ volatile("mov %0, %%dr6" ::"r"(0xFFFF0FF0UL));
            atomic_inc(&g_tf_leaks);
            return;
        }
        fatal(dr6 & (1UL << 14) ? "#DB single-step trap (TF leaked into the guest)"
                                : "vector 1 without DR6.BS (an illegal vector delivered?)",
              dr6, f->rflags, f->rip);
    }
    if (v < 16 || has_err)
        fatal("exception (or an illegal vector delivered)", v, f->err, f->rip);
    /* An interrupt: EOI exactly when it is in service. */
    c->vec_count[v]++;
    atomic_inc(&g_irqs);
    u64 b = apic_base_msr();
    int in_service = 0;
    if (mode_x2(b)) {
        in_service = (rdmsr(0x810 + (v >> 5)) >> (v & 31)) & 1;
        if (in_service) wrmsr(0x80B, 0);
    } else if (xpage(b)) {
        u64 p = xpage(b);
        in_service = (*(volatile u32 *)(p + 0x100 + 0x10 * (v >> 5)) >> (v & 31)) & 1;
        if (in_service) *(volatile u32 *)(p + 0xB0) = 0;
    }
    if (in_service) atomic_inc(&g_eoi);
    else atomic_inc(&g_spurious);
}

/* ---------------------------------------------------------------- the chaos */

/* A vector: mostly 32-255, sometimes illegal (0-15) or exception-numbered (16-31). */
static u32 rvec(void) {
    u32 k = rn(16);
    if (k == 0) return rn(16);
    if (k == 1) return 16 + rn(16);
    return 32 + rn(224);
}

/* A value with interesting bits: random, small, all ones, vector-like. */
static u32 rval(void) {
    switch (rn(6)) {
    case 0: return 0;
    case 1: return 0xFFFFFFFFu;
    case 2: return rn(16);
    case 3: return rvec() | (rn(8) << 8) | (rn(2) << 16) | (rn(4) << 17);
    default: return (u32)rnd();
    }
}

/* Offsets a random write must not cover: ID (0x20) and ICR (0x300-0x31F). */
static int forbidden(u32 off, u32 len) {
    u32 end = off + len;
    return (off < 0x30 && end > 0x20) || (off < 0x320 && end > 0x300);
}

/* Picks an APIC ID nobody has (physical destination). */
static u32 nobody(int x2) {
    if (x2) return 0x100 + rn(0x1000);
    return 0x10 + rn(0xE0);        /* 0x10-0xEF: not 0xFF (broadcast), not 0-7 */
}

static void op_mmio_read(void) {
    u64 p = xpage(apic_base_msr());
    if (!p) return;
    u32 off = rn(0x1000);
    switch (rn(4)) {
    case 0: (void)*(volatile u8 *)(p + off); break;
    case 1: (void)*(volatile u16 *)(p + (off & ~1u)); break;
    case 2: (void)*(volatile u32 *)(p + (off & ~3u)); break;
    default: (void)*(volatile u64 *)(p + (off & ~7u)); break;
    }
}

static void op_mmio_write(void) {
    u64 p = xpage(apic_base_msr());
    if (!p) return;
    u32 off = rn(8) ? (rn(0x40) << 4) : rn(0x1000);   /* registers, or anywhere */
    u32 sz = 1u << rn(4);
    off &= ~(sz - 1);
    if (forbidden(off, sz)) return;
    u32 v = rval();
    switch (sz) {
    case 1: *(volatile u8 *)(p + off) = (u8)v; break;
    case 2: *(volatile u16 *)(p + off) = (u16)v; break;
    case 4: *(volatile u32 *)(p + off) = v; break;
    default: *(volatile u64 *)(p + off) = (u64)v << 32 | rval(); break;
    }
}

static void op_msr_read(void) { (void)rdmsr(0x800 + rn(0x100)); }

static void op_msr_write(void) {
    u32 m = 0x800 + rn(0x100);
    if (m == 0x830) return;
    u64 v = rn(4) ? rval() : rnd();
    wrmsr(m, v);
}

/* IA32_APIC_BASE: disable, enable xAPIC, enable x2APIC, relocate, flags, garbage;
   interrupts off until the page is back in the window (a handler touches it). */
static void op_apic_base(void) {
    cli();
    u64 b = apic_base_msr();
    u64 keep = b & (BASE_BSP | BASE_EN | BASE_EXTD);
    u64 page = b & 0xFFFFFF000UL;
    u64 v;
    switch (rn(7)) {
    case 0: v = page | (b & BASE_BSP); break;                        /* disable */
    case 1: v = page | (b & BASE_BSP) | BASE_EN; break;              /* xAPIC */
    case 2: v = page | (b & BASE_BSP) | BASE_EN | BASE_EXTD; break;  /* x2APIC */
    case 3: v = (WIN_LO + ((u64)rn(0x1000) << 12)) | keep; break;       /* relocate */
    case 4: v = page | (b & BASE_BSP) | (rn(2) ? BASE_EXTD : 0); break; /* EXTD without EN */
    case 5: v = page | ((u64)rn(8) << 8) | (b & (BASE_EN | BASE_EXTD)); break; /* BSP flag */
    default: v = rnd(); break;                                       /* garbage */
    }
    wrmsr(MSR_APIC_BASE, v);
    b = apic_base_msr();
    u64 p = b & 0xFFFFFF000UL;
    if (p < WIN_LO || p >= WIN_HI)
        wrmsr(MSR_APIC_BASE, (b & 0xFFF) | APIC_DEFAULT);
    sti();
}

static void op_icr(void) {
    u64 b = apic_base_msr();
    int x2 = mode_x2(b);
    u32 mode = rn(8);
    u32 low = rvec() | mode << 8 | rn(2) << 11 | rn(2) << 14 | rn(2) << 15 | rn(4) << 18;
    if (!rn(8)) low |= (u32)rnd() & 0xFFF33000u;     /* reserved bits */
    u32 dest = rn(4) ? rn(MAX_CPUS) : (x2 ? (u32)rnd() : rn(256));
    int deassert = mode == 5 && !(low & (1u << 14)) && (low & (1u << 15));
    if ((mode == 5 && !deassert) || mode == 6) {
        /* INIT, SIPI: nobody real */
        low &= ~((3u << 18) | (1u << 11));
        dest = nobody(x2);
    }
    if (mode == 0 && (low & (3u << 18)) == 0 && !x2 && dest == 0xFF && rn(2))
        dest = my_index();
    if (x2 && rn(4) == 0) {
        wrmsr(0x83F, rvec());     /* SELF IPI */
        return;
    }
    send_ipi(dest, low);
}

static void ioapic_w(u32 reg, u32 v) {
    *(volatile u32 *)(IOAPIC) = reg;
    *(volatile u32 *)(IOAPIC + 0x10) = v;
}
static u32 ioapic_r(u32 reg) {
    *(volatile u32 *)(IOAPIC) = reg;
    return *(volatile u32 *)(IOAPIC + 0x10);
}

/* An RTE low word whose delivery mode would reset a CPU (INIT) or start one (SIPI,
   reserved): must point at nobody. */
static int rte_dangerous(u32 low) { u32 dm = (low >> 8) & 7; return dm == 5 || dm == 6; }

static void op_ioapic(void) {
    /* BSP only: the IOREGSEL/IOWIN pair is not atomic across CPUs. If our APIC page
       sits on the IOAPIC's, these go to the APIC: fine, nothing here is ID/ICR. */
    u64 b = apic_base_msr();
    if (mode_x(b) && (b & 0xFFFFFF000UL) == IOAPIC) return;
    u32 pin = rn(26);
    switch (rn(6)) {
    case 0: (void)ioapic_r(rn(0x100)); break;
    case 1: {
        u32 off = rn(0x100);
        switch (rn(3)) {
        case 0: (void)*(volatile u8 *)(IOAPIC + off); break;
        case 1: (void)*(volatile u16 *)(IOAPIC + (off & ~1u)); break;
        default: (void)*(volatile u32 *)(IOAPIC + (off & ~3u)); break;
        }
        break;
    }
    case 2: {
        u32 low = rvec() | rn(8) << 8 | rn(2) << 11 | rn(2) << 13 | rn(2) << 15 | rn(2) << 16;
        if (!rn(8)) low |= (u32)rnd() & 0xFFFE0000u;
        if (pin < 24) {
            if (rte_dangerous(low)) {
                low &= ~(1u << 11);
                ioapic_w(0x11 + 2 * pin, 0xF0u << 24);
            }
            ioapic_low_shadow[pin] = low;
        }
        ioapic_w(0x10 + 2 * pin, low);
        break;
    }
    case 3: {
        u32 hi = rn(2) ? rn(MAX_CPUS) << 24 : (u32)rnd();
        if (pin < 24 && rte_dangerous(ioapic_low_shadow[pin])) hi = 0xF0u << 24;
        if (pin >= 24 && pin < 26) hi = (u32)rnd();
        ioapic_w(0x11 + 2 * pin, hi);
        break;
    }
    case 4:
        /* ID, version (read-only), arbitration; EOI register */
        if (rn(2)) ioapic_w(rn(3), (u32)rnd());
        else *(volatile u32 *)(IOAPIC + 0x40) = rvec();
        break;
    default:
        /* a pulse on a pin (pc-testdev), or a line left up for a moment */
        outb((u16)(0x2000 + pin), 1);
        outb((u16)(0x2000 + pin), 0);
        break;
    }
}

static void op_lvt_illegal(void) {
    static const u32 lvts[] = {0x2F0, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370};
    u32 r = lvts[rn(7)];
    apic_write(r, rn(16) | (rn(4) ? 0 : rn(8) << 8));
    if (r == 0x320) {
        apic_write(0x3E0, 0xB);
        apic_write(0x380, 1 + rn(3));
    }
    apic_write(0x280, 0);
    (void)apic_read(0x280);
}

static void op_timer(void) {
    switch (rn(9)) {
    case 0: apic_write(0x3E0, rval()); break;                        /* any divide */
    case 1: apic_write(0x3E0, 0xA); apic_write(0x380, 0xFFFFFFFFu); break; /* /128, max */
    case 2:                                                          /* periodic 1, masked */
        apic_write(0x3E0, 0xB); apic_write(0x320, 0x30000 | (32 + rn(224))); apic_write(0x380, 1);
        break;
    case 3:                                                          /* periodic 1, live */
        apic_write(0x3E0, 0xB); apic_write(0x320, 0x20000 | (32 + rn(224))); apic_write(0x380, 1 + rn(4));
        break;
    case 4: {                                                        /* TSC deadline */
        apic_write(0x320, 0x40000 | (rn(4) ? 0 : 0x10000) | (32 + rn(224)));
        u64 t = rdtsc();
        static const u64 extremes[] = {0, 1, 0xFFFFFFFFFFFFFFFFUL, 0x8000000000000000UL};
        u64 d;
        switch (rn(4)) {
        case 0: d = extremes[rn(4)]; break;
        case 1: d = t; break;
        case 2: d = t + rn(100000); break;
        default: d = rnd(); break;
        }
        wrmsr(MSR_TSC_DEADLINE, d);
        break;
    }
    case 5: apic_write(0x320, rval()); break;                        /* any LVT timer */
    case 6: apic_write(0x380, rval()); break;
    case 7: (void)apic_read(0x390); break;
    default: apic_write(0x380, 0); break;                            /* stop */
    }
}

static void op_tpr(void) {
    switch (rn(3)) {
    case 0: apic_write(0x80, rn(2) ? rn(256) : 0); break;
    case 1: write_cr8(rn(16)); break;
    default: write_cr8(0); apic_write(0x80, 0); break;
    }
}

/* lock cmpxchg8b / rep movsd / rep stosd on the APIC page. */
static u32 scratch[16];
static void op_multi(void) {
    u64 p = xpage(apic_base_msr());
    if (!p) return;
    switch (rn(4)) {
    case 0: {
        u32 off = rn(0x200) << 3;
        if (forbidden(off, 8)) return;
        u32 lo = rn(2) ? 0 : (u32)rnd(), hi = rn(2) ? 0 : (u32)rnd();
        u32 nlo = rval(), nhi = rval();
        __asm__ volatile("lock cmpxchg8b %0"
                         : "+m"(*(volatile u64 *)(p + off)), "+a"(lo), "+d"(hi)
                         : "b"(nlo), "c"(nhi)
                         : "memory", "cc");
        break;
    }
    case 1: {                                   /* RAM -> APIC registers */
        u64 n = 1 + rn(8);
        u32 off = rn(0x400) << 2;
        if (off + 4 * n > 0x1000 || forbidden(off, (u32)(4 * n))) return;
        for (u32 i = 0; i < 16; i++) scratch[i] = rval();
        void *d = (void *)(p + off);
        const void *s = scratch;
        __asm__ volatile("rep movsl" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
        break;
    }
    case 2: {                                   /* APIC registers -> RAM */
        u64 n = 1 + rn(16);
        u32 off = rn(0x400) << 2;
        if (off + 4 * n > 0x1000) return;
        void *d = scratch;
        const void *s = (const void *)(p + off);
        __asm__ volatile("rep movsl" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
        break;
    }
    default: {                                  /* fill APIC registers */
        u64 n = 1 + rn(8);
        u32 off = rn(0x400) << 2;
        if (off + 4 * n > 0x1000 || forbidden(off, (u32)(4 * n))) return;
        void *d = (void *)(p + off);
        __asm__ volatile("rep stosl" : "+D"(d), "+c"(n) : "a"(rval()) : "memory");
        break;
    }
    }
}

static void op_misc(void) {
    switch (rn(4)) {
    case 0: apic_write(0xB0, 0); break;                 /* EOI, in service or not */
    case 1: apic_write(0x280, rval()); (void)apic_read(0x280); break;
    case 2: apic_write(0xF0, rn(4) ? (0x100 | rn(256)) : rval()); break; /* SVR */
    default: wrmsr(0x83F, rvec()); break;               /* SELF IPI (x2APIC only) */
    }
}

static void chaos(u32 n) {
    int bsp = my_index() == 0;
    for (u32 i = 0; i < n; i++) {
        switch (rn(bsp ? 24 : 22)) {
        case 0: case 1: case 2: op_mmio_read(); break;
        case 3: case 4: case 5: op_mmio_write(); break;
        case 6: case 7: op_msr_read(); break;
        case 8: case 9: op_msr_write(); break;
        case 10: op_apic_base(); break;
        case 11: case 12: case 13: op_icr(); break;
        case 14: op_lvt_illegal(); break;
        case 15: case 16: op_timer(); break;
        case 17: op_tpr(); break;
        case 18: case 19: op_multi(); break;
        case 20: case 21: op_misc(); break;
        default: op_ioapic(); break;
        }
        if ((i & 63) == 63) { write_cr8(0); sti(); }
    }
}

/* ---------------------------------------------------------------- sane again */

/* Disable (which resets the APIC), re-enable in the boot mode at 0xFEE00000, SVR on,
   TPR 0, timer stopped, ESR cleared. */
static void restore_apic(void) {
    struct cpu *c = me();
    cli();
    write_cr8(0);
    u64 bsp = c->boot_base & BASE_BSP;
    wrmsr(MSR_APIC_BASE, APIC_DEFAULT | bsp);
    wrmsr(MSR_APIC_BASE, APIC_DEFAULT | bsp | BASE_EN);
    if (c->boot_base & BASE_EXTD) wrmsr(MSR_APIC_BASE, APIC_DEFAULT | bsp | BASE_EN | BASE_EXTD);
    u64 b = apic_base_msr();
    if ((b & ~0xFFUL) != (c->boot_base & ~0xFFUL))
        fatal("IA32_APIC_BASE not restored", b, c->boot_base, 0);
    apic_write(0xF0, 0x1FF);
    apic_write(0x80, 0);
    apic_write(0x380, 0);
    apic_write(0x320, 0x10000);
    apic_write(0x280, 0);
    apic_write(0x280, 0);
    for (int i = 0; i < 16; i++) {
        u32 any = 0;
        for (u32 w = 0; w < 8; w++) any |= apic_read(0x100 + 0x10 * w);
        if (!any) break;
        apic_write(0xB0, 0);
    }
    sti();
}

static void restore_ioapic(void) {
    for (u32 pin = 0; pin < 24; pin++) {
        ioapic_w(0x10 + 2 * pin, 0x10000);
        ioapic_w(0x11 + 2 * pin, 0);
        ioapic_low_shadow[pin] = 0x10000;
        outb((u16)(0x2000 + pin), 0);
        *(volatile u32 *)(IOAPIC + 0x40) = 32 + pin;
    }
}

/* Waits (halted, interrupts on) until `*p` differs from `old`; 0 on success. */
static int wait_change(volatile u32 *p, u32 old, u64 tsc_budget) {
    u64 end = rdtsc() + tsc_budget;
    while (*p == old) {
        if (rdtsc() > end) return 1;
        pause();
    }
    return 0;
}

static void sanity(void) {
    struct cpu *c = me();
    u32 before = c->vec_count[V_SELFTEST];
    send_ipi(0, V_SELFTEST | 0x40000);             /* fixed, shorthand self */
    int ipi_ok = !wait_change(&c->vec_count[V_SELFTEST], before, 20000000000UL);
    u32 t0 = c->vec_count[V_AP_TIMER];
    apic_write(0x3E0, 0xB);
    apic_write(0x320, V_AP_TIMER);
    apic_write(0x380, 100000);                      /* 100 us one-shot */
    int timer_ok = !wait_change(&c->vec_count[V_AP_TIMER], t0, 20000000000UL);
    apic_write(0x320, 0x10000);
    lock();
    puts_raw(ipi_ok && timer_ok ? "PASS hostile_sane_after" : "FAIL hostile_sane_after: ");
    if (!ipi_ok) puts_raw(" self-IPI lost");
    if (!timer_ok) puts_raw(" timer lost");
    puts_raw("\n");
    unlock();
}

/* ---------------------------------------------------------------- halt phase */

/* CPU 1: on the alarm IPI, a one-shot of halt_ms on its own APIC timer (1 ns per
   tick at divide 1), then an NMI to the BSP. Halted throughout. */
static void alarm_clock(void) {
    struct cpu *c = me();
    c->alarm = 0;
    u32 t0 = c->vec_count[V_AP_TIMER];
    apic_write(0x3E0, 0xB);
    apic_write(0x320, V_AP_TIMER);
    u64 ns = (u64)halt_ms * 1000000UL;
    apic_write(0x380, (u32)(ns > 0xFFFFFFFFUL ? 0xFFFFFFFFUL : ns));
    for (;;) {
        cli();
        if (c->vec_count[V_AP_TIMER] != t0) break;
        __asm__ volatile("sti; hlt" ::: "memory");
    }
    sti();
    send_ipi(0, 0x400);                             /* NMI to APIC ID 0 */
}

static void halt_once(const char *name) {
    lock(); puts_raw("HALT-BEGIN "); puts_raw(name); puts_raw(" ms="); putu_raw(halt_ms); puts_raw("\n"); unlock();
    halt_woken = 0;
    cpus[1].alarm = 1;
    send_ipi(1, V_ALARM);
    wait_flag(&halt_woken);
    lock(); puts_raw("HALT-END "); puts_raw(name); puts_raw("\n"); unlock();
}

static void halt_phase(void) {
    if (ncpus < 2 || halt_ms == 0) {
        lock(); puts_raw("SKIP hostile_halt: needs 2 CPUs and halt_ms > 0\n"); unlock();
        return;
    }
    /* A: LVT timer masked, periodic, divide 1, count 1 */
    apic_write(0x3E0, 0xB);
    apic_write(0x320, 0x30000 | V_HALT_TIMER);
    apic_write(0x380, 1);
    halt_once("masked-periodic-1");
    apic_write(0x380, 0);
    apic_write(0x320, 0x10000);
    /* B: TPR 0xF0 holds back an unmasked periodic count-1 timer */
    u32 before = me()->vec_count[V_HALT_TIMER];
    apic_write(0x80, 0xF0);
    apic_write(0x320, 0x20000 | V_HALT_TIMER);
    apic_write(0x380, 1);
    halt_once("tpr-f0-periodic-1");
    u32 tpr_after = apic_read(0x80);
    u64 cr8_after;
    __asm__ volatile("mov %%cr8, %0" : "=r"(cr8_after));
    apic_write(0x380, 0);
    apic_write(0x320, 0x10000);
    u32 held = me()->vec_count[V_HALT_TIMER] - before;
    apic_write(0x80, 0);                            /* the pending one comes in now */
    int ok = held == 0 && !wait_change(&me()->vec_count[V_HALT_TIMER], before, 20000000000UL);
    lock();
    if (held == 0 && ok) puts_raw("PASS hostile_halt\n");
    else {
        puts_raw("FAIL hostile_halt: TPR 0xF0 let "); putu_raw(held);
        puts_raw(" timer interrupts in (or none came after TPR 0); TPR after the halt ");
        putx_raw(tpr_after); puts_raw(", CR8 "); putx_raw(cr8_after); puts_raw("\n");
    }
    unlock();
}

/* ---------------------------------------------------------------- start-up */

static void cpu_init(void) {
    struct cpu *c = me();
    c->rng = (seed + 1) * 0x9E3779B97F4A7C15UL ^ ((u64)my_index() << 32 | 0x5bd1e995);
    c->boot_base = apic_base_msr();
    apic_write(0xF0, 0x1FF);
    sti();
}

void ap_main(u32 idx) {
    (void)idx;
    cpu_init();
    atomic_inc(&ap_ready);
    if (!only_halt) chaos(rounds);
    restore_apic();
    atomic_inc(&ap_done);
    struct cpu *c = me();
    for (;;) {
        cli();
        if (c->alarm) { sti(); alarm_clock(); continue; }
        __asm__ volatile("sti; hlt" ::: "memory");
    }
}

static u64 parse_num(const char *s) {
    u64 v = 0;
    while (*s >= '0' && *s <= '9') v = v * 10 + (u64)(*s++ - '0');
    return v;
}
static int prefix(const char *s, const char *p) { while (*p) if (*s++ != *p++) return 0; return 1; }

static void parse_cmdline(const char *s) {
    while (*s) {
        while (*s == ' ') s++;
        if (prefix(s, "seed=")) seed = parse_num(s + 5);
        else if (prefix(s, "rounds=")) rounds = (u32)parse_num(s + 7);
        else if (prefix(s, "halt_ms=")) halt_ms = (u32)parse_num(s + 8);
        else if (prefix(s, "only=halt")) only_halt = 1;
        while (*s && *s != ' ') s++;
    }
}

static u32 fw_cfg_cpus(void) {
    outw(0x510, 5);
    u32 lo = inb(0x511), hi = inb(0x511);
    u32 n = lo | hi << 8;
    return n == 0 || n == 0xFFFF ? 1 : n;
}

void kmain(u32 mbi) {
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    const u32 *info = (const u32 *)(u64)mbi;
    if (mbi && (info[0] & 4) && info[4]) parse_cmdline((const char *)(u64)info[4]);
    cpu_init();
    ncpus = fw_cfg_cpus();
    if (ncpus > MAX_CPUS) ncpus = MAX_CPUS;
    lock();
    puts_raw("hostile: seed="); putu_raw(seed);
    puts_raw(" rounds="); putu_raw(rounds);
    puts_raw(" cpus="); putu_raw(ncpus);
    puts_raw(mode_x2(cpus[0].boot_base) ? " x2apic" : " xapic");
    puts_raw(only_halt ? " only=halt\n" : "\n");
    unlock();
    if (ncpus > 1) {
        memcpy((void *)0x8000, tramp_start, (u64)(tramp_end - tramp_start));
        send_ipi(0, 0x000C4500);                    /* INIT, all excluding self */
        send_ipi(0, 0x000C4608);                    /* SIPI 0x8000 */
        if (wait_change(&ap_ready, 0, 20000000000UL)) fatal("no AP came up", 0, 0, 0);
        u64 end = rdtsc() + 20000000000UL;
        while (ap_ready < ncpus - 1 && rdtsc() < end) pause();
        lock(); puts_raw(ap_ready == ncpus - 1 ? "PASS hostile_smp_start\n" : "FAIL hostile_smp_start: missing APs\n"); unlock();
    }
    if (!only_halt) {
        chaos(rounds);
        lock(); puts_raw("PASS hostile_chaos_bsp\n"); unlock();
    }
    restore_apic();
    restore_ioapic();
    while (ap_done < ap_ready) pause();
    if (!only_halt) {
        lock(); puts_raw("PASS hostile_chaos_all\n"); unlock();
    }
    sanity();
    halt_phase();
    lock();
    u32 gp = g_gp, irqs = g_irqs;
    puts_raw("DONE hostile seed="); putu_raw(seed);
    puts_raw(" gp="); putu_raw(gp);
    puts_raw(" irqs="); putu_raw(irqs);
    puts_raw(" eoi="); putu_raw(g_eoi);
    puts_raw(" spurious="); putu_raw(g_spurious);
    puts_raw(" nmis="); putu_raw(g_nmis);
    puts_raw(" tf_leaks="); putu_raw(g_tf_leaks);
    puts_raw(" nmi_at_hlt="); putu_raw(g_nmi_at_hlt);
    puts_raw(" cpus="); putu_raw(ncpus);
    puts_raw(" rounds="); putu_raw(rounds);
    puts_raw("\n");
    unlock();
    guest_exit(0);
}
