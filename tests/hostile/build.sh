#!/bin/sh
# Build the hostile guest: head.S + every .c here -> OUT (multiboot ELF32 container
# around x86-64 code, loaded at 1 MiB). Needs gcc (x86-64), as, ld, objcopy.
# No SSE (-mgeneral-regs-only): this project's nested-KVM host cannot run it.
# Exits 77 (automake's "skip") with one line on stderr when that toolchain is
# missing; any other failure is a real build failure (the tests fail on it).
set -e
OUT=${1:?usage: build.sh OUT.elf}
DIR=$(dirname "$0")
for tool in gcc ld objcopy; do
  command -v "$tool" >/dev/null || { echo "$tool not found" >&2; exit 77; }
done
echo 'int x;' | gcc -m64 -x c -c -o /dev/null - 2>/dev/null ||
  { echo "gcc cannot generate x86-64 code" >&2; exit 77; }
TMP=${OUT%.elf}
CFLAGS="-m64 -O2 -ffreestanding -fno-pic -fno-pie -mno-red-zone -mgeneral-regs-only \
  -fno-stack-protector -fno-asynchronous-unwind-tables -fno-builtin -fcf-protection=none \
  -mcmodel=small -Wall -Wextra -Werror"
# Every .c file in DIR (hostile.c, chaos.c, ...); "$@" collects their objects.
set --
for src in "$DIR"/*.c; do
  obj="$TMP.$(basename "$src" .c).o"
  gcc $CFLAGS -c -o "$obj" "$src"
  set -- "$@" "$obj"
done
gcc -m64 -c -o "$TMP.S.o" "$DIR/head.S"
ld -m elf_x86_64 -N -nostdlib -no-pie -T "$DIR/link.ld" --no-warn-rwx-segments \
  -o "$TMP.64" "$TMP.S.o" "$@"
objcopy -O elf32-i386 "$TMP.64" "$OUT"
rm -f "$@" "$TMP.S.o" "$TMP.64"
