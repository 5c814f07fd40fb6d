#!/usr/bin/env bash
# Soak (issue 10): the main job (`vlapic run`: 4 vCPUs, verifier on, migrating every
# 10 ms) N times (default 20) while two busy loops saturate both cores; prints one line
# per run and the failures, exits 1 if any run failed.
# Usage: scripts/soak.sh [N]   (needs a release build: cargo build --release)
set -euo pipefail
N=${1:-20}
BIN=${VLAPIC:-target/release/vlapic}
DIR=$(mktemp -d)
(while :; do :; done) & L1=$!
(while :; do :; done) & L2=$!
trap 'kill $L1 $L2 2>/dev/null || true; rm -rf "$DIR"' EXIT
fail=0
for i in $(seq 1 "$N"); do
  rc=0
  "$BIN" run --quiet --json --timeout 300 > "$DIR/r$i.json" 2> "$DIR/r$i.err" || rc=$?
  line=$(python3 - "$DIR/r$i.json" "$rc" <<'PY'
import json, sys
path, rc = sys.argv[1], int(sys.argv[2])
try:
    d = json.load(open(path))
except Exception as e:
    print(f"exit {rc}, no summary ({e})"); sys.exit(1)
bad = [s["name"] + ": " + s.get("detail", "") for s in d.get("scenarios", []) if s.get("status") not in ("PASS", "SKIP")]
ok = rc == 0 and d["failed"] == 0 and d["violations"] == 0
print(f"{'ok  ' if ok else 'FAIL'} exit {rc}, {d['passed']} passed, {d['failed']} failed{(' ' + str(bad)) if bad else ''}, "
      f"{d['violations']} violations, nesting {d['max_nesting']}, {d['migrations']} migrations, "
      f"longest pause {d['max_downtime_us']/1000:.1f} ms, {d['elapsed_s']:.1f} s")
sys.exit(0 if ok else 1)
PY
  ) || { fail=$((fail + 1)); [ -s "$DIR/r$i.err" ] && tail -3 "$DIR/r$i.err"; }
  echo "run $i: $line"
done
echo "soak: $N runs, $fail failed, load $(cut -d' ' -f1-3 /proc/loadavg)"
[ "$fail" = 0 ]
