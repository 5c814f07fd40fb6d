#!/usr/bin/env bash
# Run the vlapic test guest under QEMU (TCG, no KVM) with serial output on
# stdout. Builds the guest first if needed.
#
# Usage: scripts/qemu-guest.sh [extra qemu args...]
#   e.g. scripts/qemu-guest.sh -smp 4
#        scripts/qemu-guest.sh -smp 2 -append "only=ipi-fixed,esr"
#        scripts/qemu-guest.sh -append bench
#
# Environment:
#   GUEST_OUT     build output dir (default: target/guest under the repo)
#   GUEST_ELF     use this image instead of building
#   QEMU          qemu binary (default: qemu-system-x86_64)
#   QEMU_ACCEL    accelerator (default: tcg)
#   QEMU_TIMEOUT  seconds before the run is killed (default: 300)
#
# Exit status: the guest's status (0 = all passed, 1 = failures), decoded
# from isa-debug-exit ((code << 1) | 1); 124 on timeout; 125 if QEMU ended
# without the guest writing the exit port (crash/triple fault).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="${GUEST_OUT:-$ROOT/target/guest}"
ELF="${GUEST_ELF:-}"
if [ -z "$ELF" ]; then
    "$ROOT/scripts/build-guest.sh" "$OUT" >/dev/null || exit 2
    ELF="$OUT/vlapic-test-guest.elf"
fi

# -smp 1 unless the caller passes -smp.
SMP=(-smp 1)
for a in "$@"; do
    if [ "$a" = "-smp" ]; then SMP=(); fi
done

timeout --foreground -k 5 "${QEMU_TIMEOUT:-300}" "${QEMU:-qemu-system-x86_64}" \
    -M pc -accel "${QEMU_ACCEL:-tcg}" -cpu max -m 64 "${SMP[@]}" \
    -nodefaults -nographic -no-reboot \
    -serial stdio -monitor none \
    -device isa-debug-exit,iobase=0xf4,iosize=0x4 \
    -device pc-testdev \
    -kernel "$ELF" "$@"
rc=$?
if [ $rc -eq 124 ]; then
    echo "qemu-guest: timed out" >&2
    exit 124
fi
if [ $((rc & 1)) -eq 1 ]; then
    exit $((rc >> 1))
fi
echo "qemu-guest: QEMU exited with status $rc without the guest's exit code" >&2
exit 125
