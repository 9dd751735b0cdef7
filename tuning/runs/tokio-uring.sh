#!/usr/bin/env bash
# An echo server on tokio-uring (tuning/tokio-uring-echo/) against our raw
# recvmmsg/sendmmsg reflector and against the node's heartbeat, the same
# `mpp-loadgen` window load, alternating REPEAT times (README,
# "Dependencies": why the io-uring crate directly). Servers on CPU 0,
# loadgen on CPU 1.
#
#   bash tuning/runs/tokio-uring.sh
#
# Environment: REPEAT=3, DURATION=8s, DEVICES=10000, TASKS=256 (echo tasks),
# BIN=target/release, ECHO=target/tokio-uring-echo/release/tokio-uring-echo
# (build: cd tuning/tokio-uring-echo && CARGO_TARGET_DIR=../../target/tokio-uring-echo cargo build --release).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
REPEAT="${REPEAT:-3}"
DURATION="${DURATION:-8s}"
DEVICES="${DEVICES:-10000}"
TASKS="${TASKS:-256}"
BIN="${BIN:-$ROOT/target/release}"
ECHO="${ECHO:-$ROOT/target/tokio-uring-echo/release/tokio-uring-echo}"
TMP="$(mktemp -d)"
SERVER=""
trap '[[ -z "$SERVER" ]] || kill "$SERVER" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$TMP"' EXIT
source "$(dirname "$0")/lib.sh"
line() { # NAME JSON
    python3 - "$1" "$2" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
l = r.get("latency_us") or {}
print(f"{sys.argv[1]:<22} {r['rate_per_s']:>10,.0f} round trips/s  server CPU {100 * (r.get('node_cpu') or 0):>3.0f} %"
      f"  per server CPU-s {r['rate_per_s'] / max(r.get('node_cpu') or 1e-9, 1e-9):>10,.0f}  p99 {l.get('p99', '-')} µs", flush=True)
PY
}
load() { # NAME PID SCENARIO-ARGS...
    local name="$1" pid="$2"
    shift 2
    taskset -c 1 "$BIN/mpp-loadgen" --no-progress --cpus 1 --devices "$DEVICES" --duration "$DURATION" \
        --warmup 2s --node-pid "$pid" --json "$TMP/r.json" "$@" >"$TMP/out.txt" 2>&1 ||
        { echo "$name failed: $(tail -2 "$TMP/out.txt")"; return 0; }
    line "$name" "$TMP/r.json"
}
stop() { kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; SERVER=""; }
echo "commit $(git -C "$ROOT" rev-parse --short HEAD), $(date -u +%FT%TZ); servers on CPU 0, loadgen on CPU 1, $DEVICES devices, $DURATION"
for _ in $(seq "$REPEAT"); do
    p="$(free_port udp)"
    taskset -c 0 "$ECHO" "127.0.0.1:$p" "$TASKS" 2>"$TMP/echo.log" &
    SERVER=$!
    sleep 0.3
    load "tokio-uring echo" "$SERVER" --node "127.0.0.1:$p" echo
    stop
    p="$(free_port udp)"
    "$BIN/mpp-loadgen" reflector --listen "127.0.0.1:$p" --cpu 0 >/dev/null 2>&1 &
    SERVER=$!
    sleep 0.3
    load "raw mmsg reflector" "$SERVER" --node "127.0.0.1:$p" echo
    stop
    p="$(free_port udp)"
    h="$(free_port tcp)"
    mkdir -p "$TMP/data"
    "$BIN/mppd" --threads 1 --cpus 0 --data-dir "$TMP/data" --udp "127.0.0.1:$p" --http "127.0.0.1:$h" \
        --log-level warn >/dev/null 2>&1 &
    SERVER=$!
    wait_healthz "$h" "$SERVER" || exit 1
    load "mppd heartbeat" "$SERVER" --node "127.0.0.1:$p" --control "http://127.0.0.1:$h" --data-dir "$TMP/data" heartbeat
    stop
done
