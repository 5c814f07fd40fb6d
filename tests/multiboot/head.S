/* Multiboot v1 header and entry for mbinfo. Built twice: as an ELF32 image (the
 * loader reads program headers) and, with -DAOUT_KLUDGE, as a flat binary whose
 * header carries the load addresses (flag bit 16). */
#define MB_MAGIC 0x1BADB002
#ifdef AOUT_KLUDGE
#define MB_FLAGS 0x00010003
#else
#define MB_FLAGS 0x00000003
#endif

    .section .multiboot, "a"
    .align 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
#ifdef AOUT_KLUDGE
    .long mb_header      /* header_addr */
    .long _load_start    /* load_addr */
    .long _load_end      /* load_end_addr */
    .long _bss_end       /* bss_end_addr */
    .long _start         /* entry_addr */
#endif

    .text
    .code32
    .globl _start
_start:
    cli
    mov $stack_top, %esp
    push %ebx
    push %eax
    call kmain
1:  hlt
    jmp 1b

    .bss
    .align 16
stack:
    .skip 16384
stack_top:

    .section .note.GNU-stack, "", @progbits
