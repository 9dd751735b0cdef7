#!/usr/bin/env bash
# io_uring against recvmmsg/sendmmsg, interleaved (issue #13 item 4): two
# nodes, one per backend, both `--threads 1` pinned to NODE_CPU; the loadgen
# (pinned to LOADGEN_CPU) drives them in alternate slices of SLICE for the
# whole DURATION (`--interleave SLICE --versus`), so that host drift falls on
# both, and reports the median of the per-round ratios uring/mmsg with their
# range. One line per scenario and run, REPEAT runs each, two fresh nodes
# for every run.
#
#   WORK=/tmp/iov bash tuning/runs/io-versus.sh
#
# Environment: WORK=/tmp/iov (./mppd and ./mpp-loadgen there, else
# target/release), SCENARIOS="heartbeat fanout", REPEAT=3, DURATION=20s,
# WARMUP=2s, SLICE=1s, DEVICES=10000, ACCOUNTS=100 (fanout), NODE_CPU=0,
# LOADGEN_CPU=1. Fanout runs at --rate 0 --ahead 0 (each publish its own
# notify); heartbeat at --window 256.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
WORK="${WORK:-/tmp/iov}"
SCENARIOS="${SCENARIOS:-heartbeat fanout}"
REPEAT="${REPEAT:-3}"
DURATION="${DURATION:-20s}"
WARMUP="${WARMUP:-2s}"
SLICE="${SLICE:-1s}"
DEVICES="${DEVICES:-10000}"
ACCOUNTS="${ACCOUNTS:-100}"
NODE_CPU="${NODE_CPU:-0}"
LOADGEN_CPU="${LOADGEN_CPU:-1}"
bin() { if [[ -x "$WORK/$1" ]]; then echo "$WORK/$1"; else echo "$ROOT/target/release/$1"; fi; }
MPPD="$(bin mppd)"
LOADGEN="$(bin mpp-loadgen)"
mkdir -p "$WORK/out"
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT

source "$(dirname "$0")/lib.sh"

start() { # start IO UDP_PORT [KEY_FROM] -> pid in $started
    local io="$1" port="$2" data="$WORK/data-$1"
    rm -rf "$data"
    mkdir -p "$data"
    # Both nodes share one master key (the devices' credentials are minted
    # once); each has its own admin token (--versus-data-dir).
    [[ -z "${3:-}" ]] || cp -p "$3/master.key" "$data/master.key"
    "$MPPD" --threads 1 --cpus "$NODE_CPU" --io "$io" --data-dir "$data" \
        --udp "127.0.0.1:$port" --http "127.0.0.1:$((port + 1))" --log-level warn \
        >"$WORK/out/mppd-$io.log" 2>&1 &
    started=$!
    PIDS+=("$started")
    wait_healthz "$((port + 1))" "$started" || { echo "mppd --io $io did not start: $(tail -1 "$WORK/out/mppd-$io.log")" >&2; exit 1; }
}

# stop PID: stops one node and waits for it.
stop() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

echo "commit $(git -C "$ROOT" rev-parse --short HEAD), $(date -u +%FT%TZ); nodes on CPU $NODE_CPU, loadgen on CPU $LOADGEN_CPU; $DURATION in $SLICE slices"
for scenario in $SCENARIOS; do
    for run in $(seq "$REPEAT"); do
        json="$WORK/out/$scenario-$run.json"
        case "$scenario" in
        heartbeat) extra=(heartbeat --window 256) ;;
        fanout) extra=(--accounts "$ACCOUNTS" fanout --rate 0 --ahead 0) ;;
        *) echo "unknown scenario $scenario" >&2; exit 2 ;;
        esac
        # Fresh nodes for every run: a node keeps the devices of the run
        # before, gone but held until they time out (fan-out read 431k,
        # 295k, 196k/s on the same two nodes).
        start uring 27300
        uring_pid=$started
        start mmsg 27310 "$WORK/data-uring"
        mmsg_pid=$started
        taskset -c "$LOADGEN_CPU" "$LOADGEN" --no-progress --cpus "$LOADGEN_CPU" \
            --node 127.0.0.1:27300 --control http://127.0.0.1:27301 --data-dir "$WORK/data-uring" \
            --node-pid "$uring_pid" \
            --versus 127.0.0.1:27310 --versus-control http://127.0.0.1:27311 --versus-pid "$mmsg_pid" \
            --versus-data-dir "$WORK/data-mmsg" \
            --interleave "$SLICE" --devices "$DEVICES" --duration "$DURATION" --warmup "$WARMUP" \
            --json "$json" "${extra[@]}" >"$WORK/out/$scenario-$run.txt" 2>&1 ||
            { echo "$scenario #$run failed: $(tail -2 "$WORK/out/$scenario-$run.txt")"; stop "$uring_pid"; stop "$mmsg_pid"; continue; }
        stop "$uring_pid"
        stop "$mmsg_pid"
        python3 - "$scenario" "$run" "$json" <<'PY'
import json, sys
scenario, run, path = sys.argv[1:]
r = json.load(open(path))
c = ((r.get("interleave") or {}).get("comparisons") or [{}])[0]
ratio, per_cpu = c.get("ratio") or {}, c.get("ratio_per_cpu") or {}
def spread(s):
    return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}, n={s['n']})" if s else "-"
print(f"{scenario:<9} #{run}  uring {r['rate_per_s']:>9,.0f}/s  mmsg {c.get('rate_per_s', 0):>9,.0f}/s"
      f"  uring/mmsg {spread(ratio)}  per node CPU-s {spread(per_cpu)}  lost {r['lost']}", flush=True)
PY
    done
done
