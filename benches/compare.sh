#!/usr/bin/env bash
# Side by side: the same openmesh-loadtest scenarios against openmesh-relay and a NATS server, on
# free loopback ports of this machine, in one run. Prints one table with the ratios.
#
#   benches/compare.sh [DURATION]      # default 5s per scenario; finishes in a few minutes
#   PINNED=1 benches/compare.sh 5s     # server on CPU 0 (relay --cores 1), generator on CPU 1
#   RELAY=path/to/openmesh-relay benches/compare.sh 5s   # another relay build (A/B)
#   NO_BUILD=1 benches/compare.sh 5s   # use the binaries as built (a series of runs while the
#                                      # tree changes measures the same binaries)
#
# OpenMesh runs TLS 1.3 on every link with at-least-once delivery (ACKed custody); NATS runs in
# plaintext core mode (no acknowledgements).
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-5s}
OUT=$(mktemp -d -t openmesh-compare.XXXX)

if ! command -v nats-server >/dev/null 2>&1; then
  echo "installing nats-server (Debian package)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nats-server >/dev/null
fi
if [ "${NO_BUILD:-0}" != 1 ]; then
  cargo build --release -p openmesh-relay -p openmesh-loadtest >/dev/null 2>&1 || cargo build --release -p openmesh-relay -p openmesh-loadtest
fi

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

RP=$(free_port); MP=$(free_port); NP=$(free_port)
if [ "${PINNED:-0}" = 1 ]; then
  RELAY_ARGS=(--cores 1); SERVER_CPU=(taskset -c 0); GEN_CPU=(taskset -c 1)
else
  RELAY_ARGS=(); SERVER_CPU=(); GEN_CPU=()
fi
"${RELAY:-target/release/openmesh-relay}" --listen 127.0.0.1:$RP --metrics 127.0.0.1:$MP --data-dir "$OUT/relay" \
  "${RELAY_ARGS[@]}" >"$OUT/relay.out" 2>"$OUT/relay.log" &
RPID=$!
"${SERVER_CPU[@]}" nats-server -a 127.0.0.1 -p $NP >"$OUT/nats.log" 2>&1 &
NPID=$!
cleanup() { kill $RPID $NPID 2>/dev/null || true; wait $RPID $NPID 2>/dev/null || true; }
trap cleanup EXIT
wait_port $RP || { cat "$OUT/relay.log"; echo "relay did not start"; exit 1; }
wait_port $NP || { cat "$OUT/nats.log"; echo "nats-server did not start"; exit 1; }

LT=("${GEN_CPU[@]}" target/release/openmesh-loadtest)
for s in small bulk latency fan; do
  echo "== $s: openmesh" >&2
  "${LT[@]}" run --scenario $s --duration "$DUR" --relay 127.0.0.1:$RP --ca "$OUT/relay/tls/dev-ca.pem" \
    --quiet --json "$OUT/om-$s.json" --plot "$OUT/om-$s.svg" >"$OUT/om-$s.txt" || true
  echo "== $s: nats" >&2
  "${LT[@]}" run --scenario $s --duration "$DUR" --target nats://127.0.0.1:$NP \
    --quiet --json "$OUT/nats-$s.json" --plot "$OUT/nats-$s.svg" >"$OUT/nats-$s.txt" || true
done

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(n):
    p = os.path.join(out, n)
    return json.load(open(p)) if os.path.exists(p) else None
rows = []
def row(name, om, nt, key, fmt, better="higher"):
    a = om and om.get(key) if key != "p99" else (om and om.get("latency") and om["latency"]["p99_us"])
    b = nt and nt.get(key) if key != "p99" else (nt and nt.get("latency") and nt["latency"]["p99_us"])
    if a is None or b is None or not b:
        rows.append((name, fmt(a) if a is not None else "-", fmt(b) if b is not None else "-", "-"))
        return
    r = a / b if better == "higher" else b / a
    rows.append((name, fmt(a), fmt(b), f"{r:.2f}x"))
for s in ["small", "bulk", "latency", "fan"]:
    om, nt = load(f"om-{s}.json"), load(f"nats-{s}.json")
    if s == "bulk":
        row("bulk Gbit/s (16 KiB)", om, nt, "gbit_per_s", lambda v: f"{v:.2f}")
    elif s == "latency":
        row("latency p99 us (20k/s)", om, nt, "p99", lambda v: f"{v:.1f}", better="lower")
    else:
        row(f"{s} envelopes/s", om, nt, "envelopes_per_s", lambda v: f"{v:,.0f}")
    if (om and (om.get("lost") or om.get("duplicates"))) or (nt and (nt.get("lost") or nt.get("duplicates"))):
        f = lambda o: f"lost {o['lost']}, dup {o['duplicates']}" if o else "-"
        rows.append((f"  {s}: lost / duplicated", f(om), f(nt), ""))
w = max(len(r[0]) for r in rows)
print(f"{'metric':<{w}}  {'openmesh (TLS, at-least-once)':>30}  {'NATS (plaintext)':>18}  {'ratio':>7}")
for r in rows:
    print(f"{r[0]:<{w}}  {r[1]:>30}  {r[2]:>18}  {r[3]:>7}")
print(f"\nreports and plots: {out}")
PY
