/* mbinfo: a tiny multiboot v1 kernel that prints what the loader handed it
 * (magic, flags, command line, memory, memory map, modules) on COM1 and exits
 * through the debug-exit port 0xF4. Used to test `vlapic run --kernel` loaders.
 *
 * Command-line words (anywhere after argv[0], the kernel's file name):
 *   exit=N    write N to the debug-exit port instead of 0
 *   testdev   exercise QEMU's pc-testdev: data register 0xE0 at widths 1/2/4,
 *             page flush 0xE4 on a page the kernel then reads and writes
 *   pci       probe PCI configuration mechanism #1 (0xCF8/0xCFC) on bus 0 */

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static void putc(char c) {
    for (int i = 0; i < 100000 && !(inb(0x3FD) & 0x20); i++) {}
    outb(0x3F8, (u8)c);
}
static void puts(const char *s) { while (*s) putc(*s++); }
static void putu(u32 v) {
    char b[11]; int i = 10; b[i] = 0;
    do { b[--i] = (char)('0' + v % 10); v /= 10; } while (v);
    puts(&b[i]);
}
static void putx(u32 v) {
    puts("0x");
    for (int s = 28; s >= 0; s -= 4) putc("0123456789abcdef"[(v >> s) & 0xF]);
}
/* Prints at most `max` printable bytes of a NUL-terminated string. */
static void putstr(const char *s, u32 max) {
    for (u32 i = 0; i < max && s[i]; i++) putc(s[i] >= 0x20 && s[i] < 0x7F ? s[i] : '?');
}
static void exit_with(u32 code) {
    outl(0xF4, code);
    for (;;) __asm__ volatile("cli; hlt");
}

/* Does the command line (after argv[0]) hold the word `w`, or `w=VALUE`
 * (then *val gets VALUE as a decimal number)? */
static int has_word(const char *cmd, const char *w, u32 *val) {
    const char *p = cmd;
    while (*p == ' ') p++;
    while (*p && *p != ' ') p++; /* skip argv[0] */
    while (*p) {
        while (*p == ' ') p++;
        const char *a = p, *b = w;
        while (*b && *a == *b) { a++; b++; }
        if (!*b && (*a == ' ' || *a == 0)) return 1;
        if (!*b && *a == '=' && val) {
            u32 v = 0;
            for (a++; *a >= '0' && *a <= '9'; a++) v = v * 10 + (u32)(*a - '0');
            *val = v;
            return 1;
        }
        while (*p && *p != ' ') p++;
    }
    return 0;
}

static volatile u8 flush_page[4096] __attribute__((aligned(4096)));

static void testdev(void) {
    outl(0xE0, 0x11223344);
    outb(0xE1, 0xAA);
    puts("MB testdev ioport="); putx(inl(0xE0));
    outw(0xE2, 0xBEEF);
    puts(" after_outw="); putx(inl(0xE0));
    puts(" inw_e2="); putx(inw(0xE2));
    puts(" inb_e3="); putx(inb(0xE3)); puts("\n");
    for (u32 i = 0; i < 4096; i++) flush_page[i] = (u8)(i * 7);
    outl(0xE4, (u32)(unsigned long)&flush_page[100]);
    u32 bad = 0;
    for (u32 i = 0; i < 4096; i++) bad += flush_page[i] != (u8)(i * 7);
    flush_page[5] = 0x5A; /* still writable after the flush */
    puts("MB testdev flush bad_bytes="); putu(bad);
    puts(" write_ok="); putu(flush_page[5] == 0x5A); puts("\n");
}

static void pci(void) {
    outl(0xCF8, 0x80000000);
    puts("MB pci addr_readback="); putx(inl(0xCF8));
    outl(0xCF8, 0xFFFFFFFF);
    puts(" all_ones_readback="); putx(inl(0xCF8));
    u32 found = 0;
    for (u32 devfn = 0; devfn < 256; devfn++) {
        outl(0xCF8, 0x80000000 | (devfn << 8));
        if (inl(0xCFC) != 0xFFFFFFFF) found++;
    }
    outl(0xCF8, 0x80000000);
    puts(" devices="); putu(found);
    puts(" id_word="); putx(inw(0xCFE)); puts("\n");
}

struct mb_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
    u32 syms[4], mmap_length, mmap_addr;
};
struct mb_module { u32 start, end, string, reserved; };

void kmain(u32 magic, const struct mb_info *mbi) {
    puts("MB magic="); putx(magic); puts(" flags="); putx(mbi->flags); puts("\n");
    if (magic != 0x2BADB002) { puts("MB bad magic\n"); exit_with(1); }
    const char *cmd = "";
    if (mbi->flags & (1u << 2)) {
        cmd = (const char *)mbi->cmdline;
        puts("MB cmdline="); putstr(cmd, 200); puts("\n");
        /* argv[0] as kvm-unit-tests takes it: the first word. */
        const char *a = cmd;
        while (*a == ' ') a++;
        puts("MB argv0=");
        for (u32 i = 0; i < 200 && a[i] && a[i] != ' '; i++) putc(a[i]);
        puts("\n");
    }
    if (mbi->flags & (1u << 0)) {
        puts("MB mem_lower="); putu(mbi->mem_lower); puts(" mem_upper="); putu(mbi->mem_upper); puts("\n");
    }
    if (mbi->flags & (1u << 6)) {
        u32 n = 0, avail_kib = 0, off = 0;
        while (off + 4 <= mbi->mmap_length && n < 64) {
            const u8 *e = (const u8 *)(mbi->mmap_addr + off);
            u32 size = *(const u32 *)e;
            u32 len_lo = *(const u32 *)(e + 12), len_hi = *(const u32 *)(e + 16), type = *(const u32 *)(e + 20);
            if (type == 1) avail_kib += (len_lo >> 10) + (len_hi << 22);
            n++;
            off += size + 4;
        }
        puts("MB mmap entries="); putu(n); puts(" available_kib="); putu(avail_kib); puts("\n");
    }
    if (mbi->flags & (1u << 3)) {
        const struct mb_module *m = (const struct mb_module *)mbi->mods_addr;
        puts("MB modules="); putu(mbi->mods_count); puts("\n");
        for (u32 i = 0; i < mbi->mods_count && i < 16; i++) {
            puts("MB module "); putu(i); puts(" size="); putu(m[i].end - m[i].start);
            puts(" aligned="); putu((m[i].start & 0xFFF) == 0);
            puts(" cmdline="); if (m[i].string) putstr((const char *)m[i].string, 100);
            puts(" text=");
            const char *t = (const char *)m[i].start;
            for (u32 j = 0; j < 40 && j < m[i].end - m[i].start && t[j] != '\n'; j++)
                putc(t[j] >= 0x20 && t[j] < 0x7F ? t[j] : '?');
            puts("\n");
        }
    }
    if (has_word(cmd, "testdev", 0)) testdev();
    if (has_word(cmd, "pci", 0)) pci();
    u32 code = 0;
    has_word(cmd, "exit", &code);
    puts("MB done\n");
    exit_with(code);
}
