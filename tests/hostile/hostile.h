/* hostile.h: what hostile.c and chaos.c share: types, constants, the small inline
   instructions (port I/O, MSRs, CR8, ...), and the functions and globals each uses. */

#ifndef HOSTILE_H
#define HOSTILE_H

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

/* hostile.c */
extern u32 ioapic_low_shadow[24];
struct cpu *me(void);
u32 my_index(void);
u64 rnd(void);
u32 rn(u32 n);
u64 apic_base_msr(void);
int mode_x2(u64 b);
int mode_x(u64 b);
u64 xpage(u64 b);
u32 apic_read(u32 off);
void apic_write(u32 off, u32 v);
void send_ipi(u32 dest, u32 low);

/* chaos.c */
void ioapic_w(u32 reg, u32 v);
void chaos(u32 n);

#endif
