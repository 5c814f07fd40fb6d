#!/usr/bin/env bash
# Builds the tiny multiboot test kernels (tests/multiboot/) into OUTDIR:
#   mbinfo-elf32.elf  — multiboot v1, ELF32 (program headers)
#   mbinfo-aout.bin   — multiboot v1, a.out kludge (flat binary, addresses in the header)
# Needs gcc (with -m32 code generation) and GNU binutils. Exits 77 (the automake
# convention for "skip") with one line on stderr when that toolchain is missing; any
# other failure is a real build failure (the tests fail on it, they do not skip).
set -euo pipefail
out=${1:?usage: build-mb-kernels.sh OUTDIR}
src="$(cd "$(dirname "$0")/../tests/multiboot" && pwd)"
if ! command -v gcc >/dev/null || ! command -v ld >/dev/null || ! command -v objcopy >/dev/null; then
  echo "gcc, ld or objcopy not found" >&2; exit 77
fi
if ! echo 'int x;' | gcc -m32 -x c -c -o /dev/null - 2>/dev/null; then
  echo "gcc cannot generate 32-bit code (-m32)" >&2; exit 77
fi
if ! ld -V 2>/dev/null | grep -q elf_i386; then
  echo "ld has no elf_i386 emulation" >&2; exit 77
fi
mkdir -p "$out"
cflags=(-m32 -ffreestanding -fno-pic -fno-pie -fno-stack-protector -nostdlib -O2 -Wall -fno-asynchronous-unwind-tables)
gcc "${cflags[@]}" -c "$src/mbinfo.c" -o "$out/mbinfo.o"
gcc "${cflags[@]}" -c "$src/head.S" -o "$out/head-elf.o"
gcc "${cflags[@]}" -DAOUT_KLUDGE -c "$src/head.S" -o "$out/head-aout.o"
ld -m elf_i386 -nostdlib -T "$src/link.ld" --build-id=none --no-warn-rwx-segments -o "$out/mbinfo-elf32.elf" "$out/head-elf.o" "$out/mbinfo.o"
ld -m elf_i386 -nostdlib -T "$src/link.ld" --build-id=none --no-warn-rwx-segments -o "$out/mbinfo-aout.elf" "$out/head-aout.o" "$out/mbinfo.o"
objcopy -O binary "$out/mbinfo-aout.elf" "$out/mbinfo-aout.bin"
