#!/usr/bin/env bash
# Runs one multiboot kernel twice under KVM — with vlapic's userspace LAPIC/IOAPIC
# and with KVM's in-kernel ones — and prints pass/fail lines and numbers side by side.
#
# Usage: scripts/compare-apic.sh KERNEL [vlapic run options, e.g. --vcpus 4 --append bench]
#   KERNEL may be the word `test-guest` for the project's own guest (built on demand).
# Understands the test guest's `PASS/FAIL/SKIP name` and `BENCH name cycles=N` lines,
# kvm-unit-tests' `PASS: name` / `FAIL: name` / `SKIP: name` lines, and `name NUMBER` lines.
# Environment: VLAPIC=/path/to/vlapic to skip the cargo build.
set -euo pipefail
cd "$(dirname "$0")/.."
kernel=${1:?usage: scripts/compare-apic.sh KERNEL [vlapic run options...]}
shift
if [ "$kernel" = test-guest ]; then
  scripts/build-guest.sh target/guest >/dev/null
  kernel=target/guest/vlapic-test-guest.elf
fi
bin=${VLAPIC:-}
if [ -z "$bin" ]; then
  cargo build --release -q -p vlapic-cli
  bin=target/release/vlapic
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for mode in user kernel; do
  set +e
  "$bin" run --kernel "$kernel" --irqchip "$mode" --json "$@" >"$tmp/$mode.json" 2>"$tmp/$mode.console"
  echo $? >"$tmp/$mode.rc"
  set -e
done
python3 - "$tmp" "$kernel" <<'PY'
import json, re, sys
tmp, kernel = sys.argv[1], sys.argv[2]

def load(mode):
    console = open(f"{tmp}/{mode}.console", errors="replace").read()
    rc = open(f"{tmp}/{mode}.rc").read().strip()
    try:
        js = json.loads(open(f"{tmp}/{mode}.json").read() or "{}")
    except ValueError:
        js = {}
    status, numbers = {}, {}
    for line in console.splitlines():
        line = line.strip()
        # kvm-unit-tests: `PASS: name` (names contain colons); ours: `PASS name[: detail]`.
        m = re.match(r"^(PASS|FAIL|SKIP):\s+(.+)$", line) or \
            re.match(r"^(PASS|FAIL|SKIP)\s+([^:]+?)(?::.*)?$", line)
        if m:
            name, k = m.group(2).strip(), 1
            while (name if k == 1 else f"{name} #{k}") in status:
                k += 1  # a repeated name is a separate check, not an overwrite
            status[name if k == 1 else f"{name} #{k}"] = m.group(1)
            continue
        m = re.match(r"^BENCH (\S+) cycles=(\d+)", line)
        if m:
            numbers[m.group(1)] = int(m.group(2))
            continue
        m = re.match(r"^([A-Za-z_][\w.-]*)\s+(\d+)$", line)
        if m:
            numbers[m.group(1)] = int(m.group(2))
    return dict(console=console, rc=rc, js=js, status=status, numbers=numbers)

u, k = load("user"), load("kernel")
print(f"kernel: {kernel}")
print(f"{'':34} {'vlapic (userspace)':>20} {'KVM in-kernel':>20}")
def outcome(js):
    # run --json schema 1: outcome is {kind, code, message, text}.
    o = js.get("outcome")
    if not isinstance(o, dict):
        return "-"
    return o["kind"] if o.get("code") is None else f"{o['kind']} {o['code']}"

print(f"{'outcome':34} {outcome(u['js']):>20} {outcome(k['js']):>20}")
for label, key in [("passed", "passed"), ("failed", "failed"),
                   ("max nesting (verifier)", "max_nesting"), ("violations", "violations")]:
    print(f"{label:34} {str(u['js'].get(key, '-')):>20} {str(k['js'].get(key, '-')):>20}")
print(f"{'exit status':34} {u['rc']:>20} {k['rc']:>20}")
ue, ke = u["js"].get("exits", {}), k["js"].get("exits", {})
print(f"{'exits to userspace':34} {sum(ue.values()) if ue else '-':>20} {sum(ke.values()) if ke else '-':>20}")
names = sorted(set(u["status"]) | set(k["status"]))
if names:
    print()
    print(f"{'scenario':34} {'vlapic':>20} {'KVM':>20}")
    for n in names:
        a, b = u["status"].get(n, "-"), k["status"].get(n, "-")
        mark = "" if a == b else "   <- differs"
        print(f"{n:34} {a:>20} {b:>20}{mark}")
nums = sorted(set(u["numbers"]) | set(k["numbers"]))
if nums:
    print()
    print(f"{'figure':34} {'vlapic':>20} {'KVM':>20} {'ratio ours/KVM':>15}")
    for n in nums:
        a, b = u["numbers"].get(n), k["numbers"].get(n)
        ratio = f"{a / b:.2f}" if a is not None and b else "-"
        print(f"{n:34} {str(a if a is not None else '-'):>20} {str(b if b is not None else '-'):>20} {ratio:>15}")
PY
