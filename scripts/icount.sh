#!/usr/bin/env bash
# Instruction counts per operation for vlapic (issue 14), measured with callgrind.
#
# Builds crates/vlapic/examples/icount.rs twice (default features, and with the
# `verify` feature compiled out: --no-default-features --features std), runs every
# scenario under `valgrind --tool=callgrind` with N1 and N2 iterations, and prints
# (Ir(N2) - Ir(N1)) / (N2 - N1): instructions per iteration, start-up and setup excluded.
#
# Usage: scripts/icount.sh [N1 N2]      (default 1000 2000)
# Needs valgrind (apt-get install valgrind).
set -euo pipefail
cd "$(dirname "$0")/.."
N1=${1:-1000}
N2=${2:-2000}
command -v valgrind >/dev/null || { echo "icount.sh: valgrind not found" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
target=${CARGO_TARGET_DIR:-target}

build() { # $1 = name, rest = cargo feature flags
    local name=$1; shift
    cargo build -q --release -p vlapic --example icount "$@" >&2
    cp "$target/release/examples/icount" "$tmp/$name"
}
build verify
build noverify --no-default-features --features std
build trace --features trace

# Instructions of one run: callgrind's "Collected" total.
ir() { # $1 = binary, $2 = scenario, $3 = N
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$tmp/$1" "$2" "$3" 2>&1 \
        | awk '/Collected :/ { print $NF }'
}
per() { # $1 = binary, $2 = scenario (ICOUNT_TRACE from the environment)
    local a b
    a=$(ir "$1" "$2" "$N1")
    b=$(ir "$1" "$2" "$N2")
    awk -v a="$a" -v b="$b" -v n1="$N1" -v n2="$N2" 'BEGIN { printf "%.1f", (b - a) / (n2 - n1) }'
}

echo "instructions per cycle: deliver -> pending_vector -> acknowledge -> EOI (MMIO 0xB0)"
echo "callgrind, (Ir(N=$N2) - Ir(N=$N1)) / $((N2 - N1)); bhyve column: issue 14's figures"
echo
echo "| depth | bhyve vlapic.c (gcc -O2) | vlapic, verify compiled out | vlapic, verifier off at run time | vlapic, verifier on | on/off |"
echo "|---|---|---|---|---|---|"
declare -A bhyve=([1]=337 [4]=308 [15]=196)
for d in 1 4 15; do
    out=$(per noverify "cycle-off-$d")
    off=$(per verify "cycle-off-$d")
    on=$(per verify "cycle-on-$d")
    ratio=$(awk -v a="$on" -v b="$off" 'BEGIN { printf "%.2f", a / b }')
    echo "| $d | ${bhyve[$d]} | $out | $off | $on | $ratio |"
done
echo
echo "fabric (SharedFabric, 2 vCPUs, default features), instructions per operation"
echo
echo "| operation | instructions |"
echo "|---|---|"
echo "| unicast fixed IPI, xAPIC: MMIO ICR low write -> target IRR -> Wake | $(per verify ipi-xapic) |"
echo "| unicast fixed IPI, x2APIC: WRMSR 0x830 -> target IRR -> Wake | $(per verify ipi-x2apic) |"
echo "| IOAPIC edge: line rises (-> target IRR -> Wake) and falls | $(per verify ioapic-edge) |"
echo
echo "trace feature (issue 17): default features, then with \`trace\` compiled in but off,"
echo "then recording (ICOUNT_TRACE=1: the cycle drains its ring every iteration, the"
echo "fabric operations drain the target's every 32)"
echo
echo "| operation | default features | trace compiled in, off | trace recording |"
echo "|---|---|---|---|"
for s in cycle-off-1 cycle-off-4 cycle-on-4 ipi-xapic ipi-x2apic ioapic-edge; do
    echo "| $s | $(per verify "$s") | $(per trace "$s") | $(ICOUNT_TRACE=1 per trace "$s") |"
done
