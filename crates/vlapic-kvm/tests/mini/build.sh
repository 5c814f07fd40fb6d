#!/bin/sh
# Assemble the mini guest: mini.S -> OUT (multiboot ELF32 container, x86-64 code).
set -e
OUT=${1:?usage: build.sh OUT.elf}
TMP=${OUT%.elf}
as --64 -o "$TMP.o" "$(dirname "$0")/mini.S"
ld -m elf_x86_64 -N -Ttext 0x100000 -e _start --no-warn-rwx-segments -o "$TMP.64" "$TMP.o"
objcopy -O elf32-i386 "$TMP.64" "$OUT"
