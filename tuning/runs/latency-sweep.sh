#!/usr/bin/env bash
# Publish → device latency at 1, 10, 25 and 50 % of the maximum rate (issue
# #13 item 3, docs/BENCHMARKS.md "Latency at every load"), with the node's
# own hop histograms beside each run: pick-up (router → the shard taking the
# publish) and send (router → the last notify of the publish sealed), from
# `mpp_publish_{pickup,send}_seconds` (their means over the run; one fresh
# node per run).
#
#   WORK=/tmp/lat bash tuning/runs/latency-sweep.sh
#
# For each account size in SIZES (devices per account; DEVICES devices in
# all): one run at --rate 0 --ahead 0 gives the maximum notifications/s, then
# each percentage in PERCENTS runs at that share of it (fanout --rate is
# publishes/s: share × max ÷ size), REPEAT times, the percentages in turn so
# that drift spreads over all of them.
#
# Environment: WORK=/tmp/lat (./mppd and ./mpp-loadgen there, else
# target/release), SIZES="100 10", PERCENTS="1 10 25 50", REPEAT=2,
# DEVICES=10000, DURATION=10s, WARMUP=2s, NODE_CPU=0, LOADGEN_CPU=1,
# MPPD_ARGS="" (extra node flags, e.g. "--io mmsg" or "--spin-us 50").
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${WORK:-/tmp/lat}"
SIZES="${SIZES:-100 10}"
PERCENTS="${PERCENTS:-1 10 25 50}"
REPEAT="${REPEAT:-2}"
DEVICES="${DEVICES:-10000}"
DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
NODE_CPU="${NODE_CPU:-0}"
LOADGEN_CPU="${LOADGEN_CPU:-1}"
read -r -a EXTRA <<<"${MPPD_ARGS:-}"
NODE_ARGS="${MPPD_ARGS:-}"
# mppd refuses MPPD_* variables it does not know: do not hand this one down.
unset MPPD_ARGS
bin() { if [[ -x "$WORK/$1" ]]; then echo "$WORK/$1"; else echo "$ROOT/target/release/$1"; fi; }
MPPD="$(bin mppd)"
LOADGEN="$(bin mpp-loadgen)"
mkdir -p "$WORK/out"
NODE=""
trap '[[ -z "$NODE" ]] || kill "$NODE" 2>/dev/null || true; wait 2>/dev/null || true' EXIT

source "$(dirname "$0")/lib.sh"

# run SIZE RATE TAG: one fresh node, one loadgen run; prints one line.
run() {
    local size="$1" rate="$2" tag="$3" data="$WORK/data" json="$WORK/out/$1-$3.json" extra=()
    rm -rf "$data"
    mkdir -p "$data"
    local udp http
    udp="$(free_port udp)"
    http="$(free_port tcp)"
    "$MPPD" --threads 1 --cpus "$NODE_CPU" --data-dir "$data" --udp "127.0.0.1:$udp" \
        --http "127.0.0.1:$http" --log-level warn "${EXTRA[@]}" >"$WORK/out/mppd.log" 2>&1 &
    NODE=$!
    wait_healthz "$http" "$NODE" || { echo "mppd did not start: $(tail -1 "$WORK/out/mppd.log")" >&2; exit 1; }
    [[ "$rate" == 0 ]] && extra=(--ahead 0)
    taskset -c "$LOADGEN_CPU" "$LOADGEN" --no-progress --cpus "$LOADGEN_CPU" \
        --node "127.0.0.1:$udp" --control "http://127.0.0.1:$http" --data-dir "$data" \
        --devices "$DEVICES" --accounts $((DEVICES / size)) --duration "$DURATION" \
        --warmup "$WARMUP" --node-pid "$NODE" --json "$json" \
        fanout --rate "$rate" "${extra[@]}" >"$WORK/out/$size-$tag.txt" 2>&1 ||
        { echo "size $size $tag failed: $(tail -2 "$WORK/out/$size-$tag.txt")" >&2; }
    curl -s "http://127.0.0.1:$http/metrics" >"$WORK/out/$size-$tag.metrics" || true
    kill "$NODE"
    wait "$NODE" 2>/dev/null || true
    NODE=""
    [[ -f "$json" ]] || return 0
    python3 - "$size" "$tag" "$json" "$WORK/out/$size-$tag.metrics" <<'PY'
import json, re, sys
size, tag, path, metrics = sys.argv[1:]
r = json.load(open(path))
m = open(metrics).read()
def mean(hop):
    s = sum(float(v) for v in re.findall(rf"^mpp_publish_{hop}_seconds_sum\S* (\S+)$", m, re.M))
    n = sum(float(v) for v in re.findall(rf"^mpp_publish_{hop}_seconds_count\S* (\S+)$", m, re.M))
    return f"{1e6 * s / n:.0f}" if n else "-"
l = r.get("latency_us") or {}
f = r.get("figures", {})
print(f"{size:>4} dev/acct  {tag:>4}  {r['rate_per_s']:>9,.0f} notif/s  p50 {l.get('p50', '-'):>6}  "
      f"p90 {l.get('p90', '-'):>6}  p99 {l.get('p99', '-'):>6}  p99.9 {l.get('p999', '-'):>6}  "
      f"lost {r['lost']}  node CPU {100 * (r.get('node_cpu') or 0):.0f} %  "
      f"http p50 {f.get('http_rtt_p50_us', '-')}  pickup {mean('pickup')}  send {mean('send')} (µs)", flush=True)
PY
}

echo "commit $(git -C "$ROOT" rev-parse --short HEAD), $(date -u +%FT%TZ); node --threads 1 --cpus $NODE_CPU $NODE_ARGS, loadgen --cpus $LOADGEN_CPU; $DEVICES devices"
for size in $SIZES; do
    run "$size" 0 max
    max="$(python3 -c "import json; print(json.load(open('$WORK/out/$size-max.json'))['rate_per_s'])")"
    for _ in $(seq "$REPEAT"); do
        for pct in $PERCENTS; do
            rate="$(python3 -c "print(max(1, round($max * $pct / 100 / $size)))")"
            run "$size" "$rate" "$pct%"
        done
    done
done
