#!/usr/bin/env bash
# Through 1, 2 and 3 relays: the same openmesh-loadtest scenarios with the senders on the first
# relay of a line fleet (deploy/local-fleet --line N) and the receivers on the last, in one run.
# Prints throughput and latency per path length and the latency each relay link adds.
#
#   benches/fleet.sh [DURATION]     # default 5s per scenario
#   NO_BUILD=1 benches/fleet.sh 5s  # use the binaries as built
#   RATE=5000 benches/fleet.sh 5s   # the latency scenario's rate (default 20000/s)
#
# Every relay runs one core, unpinned, on this machine with the generator (2 cores here: three
# relays and the generator share them, so throughput through 3 relays measures the machine as
# much as the relays).
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-5s}
RATE=${RATE:-20000}
OUT=$(mktemp -d -t openmesh-fleet.XXXX)
if [ "${NO_BUILD:-0}" != 1 ]; then
  cargo build --release -p openmesh-relay -p openmesh-loadtest >/dev/null 2>&1 || cargo build --release -p openmesh-relay -p openmesh-loadtest
fi
# Ports outside the ephemeral range.
BASE=${BASE:-27410}
LT=target/release/openmesh-loadtest

for n in 1 2 3; do
  dir="$OUT/line-$n"
  deploy/local-fleet start --dir "$dir" --line "$n" --base "$BASE" >/dev/null
  trap 'deploy/local-fleet stop --dir "$dir" >/dev/null 2>&1 || true' EXIT
  # Wait for every link (n - 1 of them, each counted at both ends).
  for _ in $(seq 1 100); do
    up=0
    for i in $(seq 0 $((n - 1))); do
      v=$(curl -s "http://127.0.0.1:$((BASE + 2000 + i))/metrics" | awk '/^openmesh_link_up\{/ {s += $2} END {print s + 0}')
      up=$((up + ${v%.*}))
    done
    [ "$up" -ge $((2 * (n - 1))) ] && break
    sleep 0.1
  done
  first=127.0.0.1:$BASE
  last=127.0.0.1:$((BASE + n - 1))
  ca="$dir/fleet-ca/ca.pem"
  pid=$(awk 'NR==1 {print $2}' "$dir/pids")
  pids=$(awk '{print $2}' "$dir/pids")
  cpu() { local t=0; for p in $pids; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
  for s in small latency; do
    extra=()
    [ "$s" = latency ] && extra=(--rate "$RATE")
    echo "== $n relay(s): $s" >&2
    c0=$(cpu)
    "$LT" run --scenario "$s" --duration "$DUR" --relay "$first" --receive-relay "$last" \
      --ca "$ca" --relay-pid "$pid" --quiet "${extra[@]}" --json "$OUT/$s-$n.json" >"$OUT/$s-$n.txt" || true
    # CPU of every relay of the path, clock ticks.
    echo $(( $(cpu) - c0 )) "$(getconf CLK_TCK)" >"$OUT/$s-$n.cpu"
  done
  deploy/local-fleet stop --dir "$dir" >/dev/null
  trap - EXIT
done

python3 - "$OUT" "$RATE" <<'PY'
import json, os, sys
out, rate = sys.argv[1], sys.argv[2]
def load(n):
    try:
        return json.load(open(os.path.join(out, n)))
    except Exception:
        return None
rows = []
base = {}
for n in (1, 2, 3):
    s, l = load(f"small-{n}.json"), load(f"latency-{n}.json")
    lat = l and l.get("latency")
    if n == 1 and lat:
        base = lat
    add = ""
    if lat and base and n > 1:
        add = f"+{(lat['p50_us'] - base['p50_us']) / (n - 1):.0f} / +{(lat['p99_us'] - base['p99_us']) / (n - 1):.0f} us"
    ok = all(r and r.get("ok") for r in (s, l))
    try:
        ticks, hz = open(os.path.join(out, f"small-{n}.cpu")).read().split()
        cpu = f"{int(ticks) / int(hz) * 1e6 / s['delivered']:.2f} us" if s and s.get("delivered") else "-"
    except Exception:
        cpu = "-"
    rows.append((f"{n} relay{'s' if n > 1 else ''} ({n - 1} link{'s' if n != 2 else ''})",
                 f"{s['envelopes_per_s']:,.0f}" if s else "-", cpu,
                 f"{lat['p50_us']:.0f} / {lat['p99_us']:.0f} us" if lat else "-",
                 add, "" if ok else "NOT OK"))
print(f"{'path':<20} {'small env/s':>12} {'relays CPU/env':>15} {'latency p50 / p99 at ' + rate + '/s':>30} {'per link added p50 / p99':>26}")
for r in rows:
    print(f"{r[0]:<20} {r[1]:>12} {r[2]:>15} {r[3]:>30} {r[4]:>26} {r[5]}")
print(f"\nreports: {out}")
PY
