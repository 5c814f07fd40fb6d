#!/usr/bin/env bash
# Live migration between two processes: downtime and total time of the test guest
# (4 vCPUs, 256 MiB, migrated 700 ms in) over a unix socket and TCP loopback, N runs
# each (default 10), medians; with LOAD=1, two busy loops saturate both cores meanwhile.
# Usage: scripts/bench-live-migration.sh [N]   (needs a release build: cargo build --release)
set -euo pipefail
N=${1:-10}
BIN=${VLAPIC:-target/release/vlapic}
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"; [ -n "${L1:-}" ] && kill $L1 $L2 2>/dev/null || true' EXIT
if [ "${LOAD:-0}" = 1 ]; then
  (while :; do :; done) & L1=$!
  (while :; do :; done) & L2=$!
fi
for transport in unix tcp; do
  for i in $(seq 1 "$N"); do
    if [ $transport = unix ]; then addr="unix:$DIR/s$i.sock"; else
      port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
      addr="tcp:127.0.0.1:$port"; fi
    "$BIN" run --incoming "$addr" --quiet --json --timeout 120 > "$DIR/d$i.json" 2>/dev/null &
    dpid=$!
    sleep 0.2
    "$BIN" run --vcpus 4 --quiet --json --timeout 120 --migrate-to "$addr" --migrate-after 700 > "$DIR/s$i.json" 2>/dev/null
    wait $dpid || true
  done
  python3 - "$DIR" "$N" "$transport" <<'PY'
import json, sys, statistics as st
d, n, t = sys.argv[1], int(sys.argv[2]), sys.argv[3]
src = [json.load(open(f"{d}/s{i}.json"))["live_migration_out"] for i in range(1, n + 1)]
dst = [json.load(open(f"{d}/d{i}.json")) for i in range(1, n + 1)]
ok = sum(1 for v in dst if v["exit_code"] == 0 and v["failed"] == 0)
med = lambda xs: st.median(xs)
print(f"{t}: {n} runs, destination passed everything in {ok}")
print(f"  downtime (source, pause to RUNN): median {med([s['downtime_us'] for s in src])/1000:.1f} ms, "
      f"min {min(s['downtime_us'] for s in src)/1000:.1f}, max {max(s['downtime_us'] for s in src)/1000:.1f}")
print(f"  downtime (destination clock):     median {med([v['live_migration_in']['downtime_us'] for v in dst])/1000:.1f} ms")
print(f"  total (connect to handover):      median {med([s['total_ms'] for s in src]):.1f} ms")
print(f"  rounds: {sorted(set(s['rounds'] for s in src))}; bytes: median {med([s['bytes'] for s in src]):.0f}")
print(f"  per round (pages/bytes, last = paused), run 1: {list(zip(src[0]['round_pages'], src[0]['round_bytes']))}")
PY
done
