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
 * The chaos operations are in chaos.c; hostile.h holds what the two files share.
 *
 * Built by build.sh: gcc -m64 -mgeneral-regs-only (no SSE: this host's nested KVM
 * cannot run it), ld at 1 MiB, objcopy to an ELF32 container. */

#include "hostile.h"

extern u8 stacks[];
extern u8 isr_stubs[];
extern u8 tramp_start[], tramp_end[];
extern u32 mb_info;

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
u32 ioapic_low_shadow[24];

/* ---------------------------------------------------------------- basics */

struct cpu *me(void) {
    u8 here;
    u64 i = (u64)(&here - stacks) / STACK_SIZE;
    return &cpus[i < MAX_CPUS ? i : 0];
}
u32 my_index(void) { return (u32)(me() - cpus); }

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
u64 rnd(void) {
    struct cpu *c = me();
    u64 x = c->rng;
    x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
    c->rng = x;
    return x * 0x2545F4914F6CDD1DUL;
}
u32 rn(u32 n) { return (u32)(rnd() % n); }

/* ---------------------------------------------------------------- APIC access */

u64 apic_base_msr(void) { return rdmsr(MSR_APIC_BASE); }
int mode_x2(u64 b) { return (b & (BASE_EN | BASE_EXTD)) == (BASE_EN | BASE_EXTD); }
int mode_x(u64 b) { return (b & (BASE_EN | BASE_EXTD)) == BASE_EN; }
/* The xAPIC page if it may be touched: xAPIC mode and inside the window. */
u64 xpage(u64 b) {
    u64 p = b & 0xFFFFFF000UL;
    if (!mode_x(b) || p < WIN_LO || p >= WIN_HI) return 0;
    return p;
}

/* Register `off` (xAPIC offset) in whichever mode the APIC is in; 0/ignored when
   disabled. */
u32 apic_read(u32 off) {
    u64 b = apic_base_msr();
    if (mode_x2(b)) return (u32)rdmsr(0x800 + (off >> 4));
    u64 p = xpage(b);
    if (p) return *(volatile u32 *)(p + off);
    return 0;
}
void apic_write(u32 off, u32 v) {
    u64 b = apic_base_msr();
    if (mode_x2(b)) { wrmsr(0x800 + (off >> 4), v); return; }
    u64 p = xpage(b);
    if (p) *(volatile u32 *)(p + off) = v;
}
void send_ipi(u32 dest, u32 low) {
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
