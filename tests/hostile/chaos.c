/* chaos.c: the random operations every CPU runs on its own local APIC (and the BSP
   on the IOAPIC) during the chaos phase; chaos(n) runs n of them. */

#include "hostile.h"

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

void ioapic_w(u32 reg, u32 v) {
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

void chaos(u32 n) {
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
