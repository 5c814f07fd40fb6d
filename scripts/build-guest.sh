#!/usr/bin/env bash
# Build the vlapic test guest and write OUTDIR/vlapic-test-guest.elf
# (multiboot v1, ELF32 i386 container around the x86-64 kernel, like
# kvm-unit-tests does with `objcopy -O elf32-i386`).
#
# Usage: scripts/build-guest.sh OUTDIR
#
# Uses only the host toolchain (stable rustc for x86_64-unknown-linux-gnu,
# binutils objcopy). Safe to call from a cargo build script: it ignores the
# caller's RUSTFLAGS/CARGO_* settings and uses its own target directory
# (OUTDIR/guest-target, or $GUEST_TARGET_DIR) so it never waits on the
# main workspace's build lock.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GUEST="$ROOT/guest"
TARGET_DIR="${GUEST_TARGET_DIR:-$OUTDIR/guest-target}"

# Don't inherit anything from an outer cargo invocation.
unset RUSTFLAGS RUSTDOCFLAGS CARGO_BUILD_RUSTFLAGS CARGO_TARGET_DIR CARGO_BUILD_TARGET \
      CARGO_BUILD_TARGET_DIR CARGO_PROFILE_RELEASE_LTO CARGO_MAKEFLAGS CARGO_PRIMARY_PACKAGE \
      CARGO_MANIFEST_DIR CARGO_PKG_NAME RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER CARGO_BUILD_RUSTC_WRAPPER \
      CARGO_INCREMENTAL CARGO_ENCODED_RUSTFLAGS CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS \
      CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER 2>/dev/null || true
for v in $(env | sed -n 's/^\(CARGO_PROFILE_[A-Z0-9_]*\)=.*/\1/p'); do unset "$v"; done
# Codegen flags (same as guest/.cargo/config.toml), separated by 0x1f. SSE is
# disabled for the guest code *and* for `core` (re-codegened through fat LTO)
# because KVM hosts that emulate the guest instruction by instruction cannot
# execute SSE arithmetic; see guest/src/main.rs. rustc warns that -sse2 is
# being phased out for this target; that warning is expected.
CARGO_ENCODED_RUSTFLAGS=$(printf '%s\x1f' -C relocation-model=static -C no-redzone=yes -C force-unwind-tables=no -C target-feature=-sse,-sse2)
export CARGO_ENCODED_RUSTFLAGS="${CARGO_ENCODED_RUSTFLAGS%$'\x1f'}"

TARGET=$("${RUSTC:-rustc}" -vV | sed -n 's/^host: //p')
if [ "$TARGET" != "x86_64-unknown-linux-gnu" ]; then
    echo "build-guest: unsupported host target $TARGET (need x86_64-unknown-linux-gnu)" >&2
    exit 1
fi

cd "$GUEST"
# --target keeps the codegen flags away from the build script. The expected
# "-sse2 is being phased out" warning block is filtered from stderr.
cargo build --release --locked --offline --manifest-path "$GUEST/Cargo.toml" \
    --target "$TARGET" --target-dir "$TARGET_DIR" --quiet \
    2> >(awk '/^warning: target feature `sse2` must be enabled/ {skip=1}
              skip && /^$/ {skip=0; next}
              !skip' >&2)

ELF64="$TARGET_DIR/$TARGET/release/vlapic-test-guest"
OUT="$OUTDIR/vlapic-test-guest.elf"

# The image must not contain SSE/AVX instructions (see guest/src/main.rs);
# fxsave64/fxrstor64 in the interrupt entry have no XMM operand.
if command -v objdump >/dev/null 2>&1; then
    if objdump -d --no-show-raw-insn "$ELF64" | grep -qE '%[xy]mm[0-9]'; then
        echo "build-guest: $ELF64 contains SSE instructions:" >&2
        objdump -d --no-show-raw-insn "$ELF64" | grep -E '%[xy]mm[0-9]' | head -5 >&2
        exit 1
    fi
fi
objcopy -O elf32-i386 "$ELF64" "$OUT.tmp"
mv -f "$OUT.tmp" "$OUT"
echo "$OUT"
