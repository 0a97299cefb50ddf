#!/usr/bin/env bash
# Side by side: the same openmesh-loadtest scenarios against openmesh-relay, a NATS server and an
# iroh-relay, on free loopback ports of this machine, in one run. Prints the rates with ratios
# against the better of the two peers, then what each server spent per envelope (its CPU time
# from /proc, which survives a noisy machine better than the rates) and the generator's.
#
#   benches/compare.sh [DURATION]      # default 5s per scenario; finishes in a few minutes
#   PINNED=1 benches/compare.sh 5s     # servers on CPU 0 (relay --cores 1), generator on CPU 1
#   RELAY=path/to/openmesh-relay benches/compare.sh 5s   # another relay build (A/B)
#   NO_BUILD=1 benches/compare.sh 5s   # use the binaries as built (a series of runs while the
#                                      # tree changes measures the same binaries)
#   SUITE=durable benches/compare.sh 5s  # durable envelopes (each fsync'ed before its ACK) against
#                                      # NATS JetStream with file storage (publishes acked)
#   PLACEMENT=across benches/compare.sh 5s  # each OpenMesh pair's agents on different relay cores
#                                      # (or `one`: on one core); default: as their ids fall,
#                                      # but the small and latency pairs run twice, on one relay
#                                      # core and across two (extra rows), on a relay of 2+ cores
#   PEERS="nats" benches/compare.sh 5s # only these peers (default "nats iroh")
#
# OpenMesh runs TLS 1.3 on every link with at-least-once delivery (ACKed custody); NATS runs in
# plaintext core mode and iroh-relay over plain HTTP (`--dev`), neither acknowledging anything.
# A missing nats-server is installed from Debian, a missing iroh-relay 1.4.1 with `cargo install`
# (several minutes, once).
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
PEERS=${PEERS:-nats iroh}
SUITE=${SUITE:-live}
if [ "$SUITE" != durable ] && [[ " $PEERS " == *" iroh "* ]] && ! command -v iroh-relay >/dev/null 2>&1; then
  echo "installing iroh-relay 1.4.1 (cargo install, several minutes)"
  cargo install iroh-relay --version 1.4.1 --features server --locked >/dev/null 2>&1 \
    || cargo install iroh-relay --version 1.4.1 --features server --locked
fi
if [ "${NO_BUILD:-0}" != 1 ]; then
  cargo build --release -p openmesh-relay -p openmesh-loadtest >/dev/null 2>&1 || cargo build --release -p openmesh-relay -p openmesh-loadtest
fi

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

RP=$(free_port); MP=$(free_port); NP=$(free_port); IP=$(free_port)
if [ "$SUITE" = durable ]; then
  # Backlogs as large as the run makes: the queue bounds are raised for the backlog scenario.
  cat >"$OUT/relay.toml" <<'TOML'
[limits]
memory_budget = 8589934592
send_queue_envelopes = 8000000
send_queue_bytes = 4294967296
absent_bytes = 4294967296
TOML
  CONFIG=(--config "$OUT/relay.toml"); NATS_JS=(-js -sd "$OUT/jetstream")
else
  CONFIG=(); NATS_JS=()
fi
if [ "${PINNED:-0}" = 1 ]; then
  RELAY_ARGS=(--cores 1); SERVER_CPU=(taskset -c 0); GEN_CPU=(taskset -c 1)
else
  RELAY_ARGS=(); SERVER_CPU=(); GEN_CPU=()
fi
"${RELAY:-target/release/openmesh-relay}" --listen 127.0.0.1:$RP --metrics 127.0.0.1:$MP --data-dir "$OUT/relay" \
  "${RELAY_ARGS[@]}" "${CONFIG[@]}" >"$OUT/relay.out" 2>"$OUT/relay.log" &
RPID=$!
"${SERVER_CPU[@]}" nats-server -a 127.0.0.1 -p $NP "${NATS_JS[@]}" >"$OUT/nats.log" 2>&1 &
NPID=$!
IPID=
if [ "$SUITE" != durable ] && [[ " $PEERS " == *" iroh "* ]]; then
  # Plain HTTP on a loopback port; no QUIC address discovery, no metrics listener.
  printf 'http_bind_addr = "127.0.0.1:%s"\nenable_quic_addr_discovery = false\nenable_metrics = false\n' "$IP" >"$OUT/iroh.toml"
  "${SERVER_CPU[@]}" iroh-relay --dev --config-path "$OUT/iroh.toml" >"$OUT/iroh.log" 2>&1 &
  IPID=$!
fi
cleanup() { kill $RPID $NPID $IPID 2>/dev/null || true; wait $RPID $NPID $IPID 2>/dev/null || true; }
trap cleanup EXIT
wait_port $RP || { cat "$OUT/relay.log"; echo "relay did not start"; exit 1; }
wait_port $NP || { cat "$OUT/nats.log"; echo "nats-server did not start"; exit 1; }
if [ -n "$IPID" ]; then wait_port $IP || { cat "$OUT/iroh.log"; echo "iroh-relay did not start"; exit 1; }; fi

LT=("${GEN_CPU[@]}" target/release/openmesh-loadtest)
# Where OpenMesh pairs live among the relay's cores (the relay runs one core per CPU unless pinned).
if [ -n "${PLACEMENT:-}" ]; then
  OM_PLACE=(--placement "$PLACEMENT" --relay-cores "$([ "${PINNED:-0}" = 1 ] && echo 1 || nproc)")
else
  OM_PLACE=()
fi
if [ "$SUITE" = durable ]; then
  CA="$OUT/relay/tls/dev-ca.pem"
  om() { local name=$1; shift; echo "== $name: openmesh" >&2
    "${LT[@]}" run "$@" "${OM_PLACE[@]}" --duration "$DUR" --relay 127.0.0.1:$RP --ca "$CA" --quiet \
      --json "$OUT/om-$name.json" >"$OUT/om-$name.txt" || true; }
  js() { local name=$1; shift; echo "== $name: jetstream" >&2
    "${LT[@]}" run "$@" --duration "$DUR" --target nats://127.0.0.1:$NP --quiet \
      --json "$OUT/js-$name.json" >"$OUT/js-$name.txt" || true; }
  store() { curl -s "http://127.0.0.1:$MP/metrics" | python3 -c '
import sys
v = {}
for l in sys.stdin:
    if l.startswith("openmesh_store_") and " " in l and not l.startswith("#"):
        k, x = l.rsplit(" ", 1); v[k] = float(x)
g = lambda n: v.get(n, 0.0)
print(g("openmesh_store_group_envelopes_sum"), g("openmesh_store_group_envelopes_count"),
      g("openmesh_store_sync_seconds_sum"), g("openmesh_store_sync_seconds_count"))' >"$OUT/store-$1.txt"; }
  store start
  om small-1 --scenario small --class durable
  store small-1
  js small-1 --scenario small --class durable
  om fan-32 --scenario fan --class durable
  store fan-32
  js fan-32 --scenario fan --class durable
  HALF=$(python3 -c "import json;print(int(json.load(open('$OUT/om-small-1.json'))['envelopes_per_s']/2))" 2>/dev/null || echo 20000)
  om latency-half --scenario latency --class durable --rate "$HALF"
  om latency-20k --scenario latency --class durable --rate 20000
  om latency-20k-alo --scenario latency --class at-least-once --rate 20000
  om backlog --scenario backlog --class durable
  om live-small --scenario small --class at-least-once
  python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(n):
    p = os.path.join(out, n)
    try:
        return json.load(open(p))
    except Exception:
        return None
def store(n):
    try:
        return [float(x) for x in open(os.path.join(out, f"store-{n}.txt")).read().split()]
    except Exception:
        return None
def rate(r):
    return f"{r['envelopes_per_s']:,.0f}" if r else "-"
def lat(r):
    l = r and r.get("latency")
    return f"p50 {l['p50_us']:.0f} / p99 {l['p99_us']:.0f} us" if l else "-"
rows = []
for name, label in [("small-1", "durable 256 B, one destination, env/s"), ("fan-32", "durable 256 B, 32 destinations, env/s")]:
    om, js = load(f"om-{name}.json"), load(f"js-{name}.json")
    ratio = f"{om['envelopes_per_s'] / js['envelopes_per_s']:.2f}x" if om and js and js['envelopes_per_s'] else "-"
    rows.append((label, rate(om), rate(js), ratio))
s0, s1, s2 = store("start"), store("small-1"), store("fan-32")
for label, a, b in [("one destination", s0, s1), ("32 destinations", s1, s2)]:
    if a and b and b[1] > a[1]:
        rows.append((f"  group size / fsync, {label}", f"{(b[0]-a[0])/(b[1]-a[1]):.0f} env, {(b[2]-a[2])/(b[3]-a[3])*1e6:.0f} us", "", ""))
for name, label in [("latency-half", "durable at half that rate"), ("latency-20k", "durable at 20k/s"), ("latency-20k-alo", "at-least-once at 20k/s")]:
    r = load(f"om-{name}.json")
    rows.append((f"latency {label}", lat(r) + (f" ({r['rate']:,.0f}/s)" if r and r.get("rate") else ""), "", ""))
bl, live = load("om-backlog.json"), load("om-live-small.json")
ratio = f"{bl['envelopes_per_s'] / live['envelopes_per_s']:.2f}x live" if bl and live and live['envelopes_per_s'] else "-"
rows.append(("backlog drain env/s (durable)", rate(bl) + (f" ({bl['delivered']:,} queued)" if bl else ""), "", ratio))
rows.append(("live small env/s (at-least-once)", rate(live), "", ""))
for n in ["om-small-1", "om-fan-32", "om-backlog", "js-small-1", "js-fan-32"]:
    r = load(n + ".json")
    if r and (r.get("lost") or r.get("duplicates") or not r.get("ok")):
        rows.append((f"  {n}: {r['verdict']}", "", "", ""))
w = max(len(r[0]) for r in rows)
print(f"{'metric':<{w}}  {'openmesh (TLS, fsync per ACK)':>38}  {'JetStream (file)':>16}  {'ratio':>10}")
for r in rows:
    print(f"{r[0]:<{w}}  {r[1]:>38}  {r[2]:>16}  {r[3]:>10}")
print(f"\nreports: {out}")
PY
  exit 0
fi
peer() { local name=$1 s=$2; shift 2; echo "== $s: $name" >&2
  "${LT[@]}" run --scenario "$s" --duration "$DUR" "$@" \
    --quiet --json "$OUT/$name-$s.json" --plot "$OUT/$name-$s.svg" >"$OUT/$name-$s.txt" || true; }
# The small and latency pairs run twice on a relay of several cores (unless PLACEMENT says
# where): with both agents on one relay core, and on different cores (each envelope then crosses
# to a second core, and at a low rate wakes it). As their ids fall, one pair lands either way,
# and the two differ by more than the machine's noise.
SPLIT=0
if [ -z "${PLACEMENT:-}" ] && [ "${PINNED:-0}" != 1 ] && [ "$(nproc)" -ge 2 ]; then SPLIT=1; fi
om_run() { local s=$1 name=$2; shift 2; echo "== $name: openmesh" >&2
  "${LT[@]}" run --scenario $s "$@" --duration "$DUR" --relay 127.0.0.1:$RP --ca "$OUT/relay/tls/dev-ca.pem" \
    --quiet --json "$OUT/om-$name.json" --plot "$OUT/om-$name.svg" >"$OUT/om-$name.txt" || true; }
for s in small bulk latency fan; do
  if { [ "$s" = small ] || [ "$s" = latency ]; } && [ "$SPLIT" = 1 ]; then
    om_run $s $s --placement one --relay-cores "$(nproc)"
    om_run $s $s-across --placement across --relay-cores "$(nproc)"
  else
    om_run $s $s "${OM_PLACE[@]}"
  fi
  if [[ " $PEERS " == *" nats "* ]]; then peer nats $s --target nats://127.0.0.1:$NP; fi
  if [ -n "$IPID" ]; then peer iroh $s --target iroh://127.0.0.1:$IP; fi
done

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(n):
    p = os.path.join(out, n)
    return json.load(open(p)) if os.path.exists(p) else None
servers = [("om", "openmesh"), ("nats", "NATS"), ("iroh", "iroh-relay")]
runs = {s: {k: load(f"{k}-{s}.json") for k, _ in servers} for s in ["small", "bulk", "latency", "fan"]}
# OpenMesh's small and latency pairs across relay cores, against the same peers' runs.
split = []
for s in ["small", "latency"]:
    across = load(f"om-{s}-across.json")
    if across:
        runs[f"{s}-across"] = dict(runs[s], om=across)
        split.append(s)
def one_core(s):
    return " [OpenMesh pair on one relay core]" if s in split else ""
def own(s, k):
    """A run of server k for scenario s (the across-cores rows are OpenMesh's alone)."""
    return runs[s][k] if not s.endswith("-across") or k == "om" else None
present = [(k, n) for k, n in servers if any(runs[s][k] for s in runs)]
def p(r, q):
    l = r and r.get("latency")
    return l and l.get(f"{q}_us")
metrics = [
    ("small envelopes/s (256 B)" + one_core("small"), "small", lambda r: r.get("envelopes_per_s"), "{:,.0f}", True),
] + ([
    ("  OpenMesh pair across relay cores", "small-across", lambda r: r.get("envelopes_per_s"), "{:,.0f}", True),
] if "small" in split else []) + [
    ("bulk Gbit/s (16 KiB)", "bulk", lambda r: r.get("gbit_per_s"), "{:.2f}", True),
    ("latency p50 us (20k/s)" + one_core("latency"), "latency", lambda r: p(r, "p50"), "{:.0f}", False),
    ("latency p99 us (20k/s)" + one_core("latency"), "latency", lambda r: p(r, "p99"), "{:.0f}", False),
] + ([
    ("  OpenMesh pair across relay cores: p50", "latency-across", lambda r: p(r, "p50"), "{:.0f}", False),
    ("  OpenMesh pair across relay cores: p99", "latency-across", lambda r: p(r, "p99"), "{:.0f}", False),
] if "latency" in split else []) + [
    ("fan envelopes/s (32 pairs)", "fan", lambda r: r.get("envelopes_per_s"), "{:,.0f}", True),
]
def cells(rows, title):
    w = max(len(r[0]) for r in rows + [(title,)])
    print(f"{title:<{w}}  " + "  ".join(f"{n:>12}" for _, n in present) + f"  {'vs better peer':>14}")
    for r in rows:
        print(f"{r[0]:<{w}}  " + "  ".join(f"{c:>12}" for c in r[1]) + f"  {r[2]:>14}")
rows = []
for label, s, get, fmt, higher in metrics:
    vals = {k: (get(runs[s][k]) if runs[s][k] else None) for k, _ in present}
    peers = [v for k, v in vals.items() if k != "om" and v]
    ratio = "-"
    if vals.get("om") and peers:
        best = max(peers) if higher else min(peers)
        ratio = f"{(vals['om'] / best if higher else best / vals['om']):.2f}x"
    rows.append((label, [fmt.format(vals[k]) if vals[k] is not None else "-" for k, _ in present], ratio))
cells(rows, "rate (same run)")
print()
# What each server and the generator spent: CPU seconds from /proc over what was delivered.
rows = []
for s in ["small"] + [f"{s}-across" for s in split if s == "small"] + ["bulk", "latency"] + [f"{s}-across" for s in split if s == "latency"] + ["fan"]:
    per_env, per_gb, gen = [], [], []
    for k, _ in present:
        r = own(s, k)
        d = r and r.get("delivered")
        if not d or r.get("relay_cpu_s") is None:
            per_env.append("-"); per_gb.append("-"); gen.append("-")
            continue
        gb = r["mb_per_s"] * r["duration_s"] / 1e3
        per_env.append(f"{r['relay_cpu_s'] * 1e6 / d:.2f}")
        per_gb.append(f"{r['relay_cpu_s'] / gb:.2f}" if gb else "-")
        gen.append(f"{r['generator_cpu_s'] * 1e6 / d:.2f}")
    rows.append((f"{s}: server CPU us/envelope", per_env, ""))
    rows.append((f"{s}: server CPU s/GB", per_gb, ""))
    rows.append((f"{s}: generator CPU us/envelope", gen, ""))
cells(rows, "efficiency (same run)")
for s in runs:
    for k, n in present:
        r = own(s, k)
        if r and (r.get("lost") or r.get("duplicates")):
            print(f"  {s} on {n}: lost {r['lost']:,}, duplicated {r['duplicates']:,} of {r['sent']:,} sent")
print(f"\nreports and plots: {out}")
PY
