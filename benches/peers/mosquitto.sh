#!/usr/bin/env bash
# Fan-out against mosquitto: one publish to N subscribers, same N, same
# payload size, through mosquitto (MQTT QoS 0) and through mppd (fanout).
#
# Usage: benches/peers/mosquitto.sh [--devices N] [--duration 10s]
#            [--warmup 2s] [--bytes 16] [--only theirs|ours] [--out DIR]
#   or the same through the environment: N=200 DURATION=10s WARMUP=2s
#   BYTES=16 ONLY= OUT= NODE_CPU=0 LOADGEN_CPU=1 SKIP_BUILD=1 AHEAD=0
#
# Both servers run pinned to NODE_CPU (taskset; mppd with --threads 1), the
# loadgen to LOADGEN_CPU; the mppd half publishes with fanout's default
# --pipeline 4 (requests in flight on the control connection) and --ahead
# AHEAD (default 0: the next publish once every subscriber has the last, so
# each publish reaches each device in a datagram of its own, as mosquitto
# sends every message; more lets the node merge publishes into one notify,
# and the per publish × subscriber line below counts those). Reports go to
# OUT (default: a temporary directory, removed on exit): mosquitto.json and
# mppd.json. Prints both loadgen tables and a summary: notifications
# delivered/s, ours, theirs and the ratio (docs/BENCHMARKS.md's bar: ours ≥ 2.5×
# mosquitto). Installs mosquitto with apt-get if it is missing. Exits
# non-zero if either half failed.
set -euo pipefail
# shellcheck source=benches/peers/lib.sh
source "$(dirname "$0")/lib.sh"

N="${N:-200}"
DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
BYTES="${BYTES:-16}"
AHEAD="${AHEAD:-0}"
ONLY="${ONLY:-}"
OUT="${OUT:-}"
while [[ $# -gt 0 ]]; do
    case "$1" in
    -n | --devices) N="$2"; shift 2 ;;
    -d | --duration) DURATION="$2"; shift 2 ;;
    --warmup) WARMUP="$2"; shift 2 ;;
    --bytes) BYTES="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h | --help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
    esac
done
[[ "$N" =~ ^[0-9]+$ && "$N" -ge 1 && "$N" -le 50000 ]] || die "N must be 1 to 50000"
[[ "$BYTES" =~ ^[0-9]+$ && "$BYTES" -ge 16 && "$BYTES" -le 32 ]] ||
    die "BYTES must be 16 to 32 (MQTT payload: 16 bytes of send time and sequence; mppd bitmask: at most 32)"
[[ "$AHEAD" =~ ^[0-9]+$ && "$AHEAD" -le 32 ]] || die "AHEAD must be 0 to 32 (fanout --ahead)"
[[ -z "$ONLY" || "$ONLY" == theirs || "$ONLY" == ours ]] || die "--only takes theirs or ours"
[[ -n "$OUT" ]] || OUT="$TMP/out"
mkdir -p "$OUT"
BOUND=$(($(secs "$DURATION") + $(secs "$WARMUP") + 90))
ulimit -n $((N + 4096)) 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

build
failed=0

# --- theirs: mosquitto --------------------------------------------------
if [[ "$ONLY" != ours ]]; then
    need_package mosquitto mosquitto
    port="$(free_port tcp)"
    cat >"$TMP/mosquitto.conf" <<EOF
listener $port 127.0.0.1
allow_anonymous true
persistence false
max_connections -1
max_queued_messages 100000
connection_messages false
log_dest stderr
log_type error
log_type warning
EOF
    taskset -c "$NODE_CPU" mosquitto -c "$TMP/mosquitto.conf" >"$TMP/mosquitto.log" 2>&1 &
    mpid=$!
    PIDS+=("$mpid")
    wait_tcp "$port" "$mpid" || { cat "$TMP/mosquitto.log" >&2; die "mosquitto did not start on 127.0.0.1:$port"; }
    note "mosquitto $(mosquitto -h 2>/dev/null | head -1 | awk '{print $3}') pid $mpid on 127.0.0.1:$port (CPU $NODE_CPU); $N subscribers, $BYTES-byte payload"
    run_loadgen "$BOUND" "$OUT/mosquitto.txt" \
        --devices "$N" --duration "$DURATION" --warmup "$WARMUP" \
        --node-pid "$mpid" --json "$OUT/mosquitto.json" \
        mqtt --broker "127.0.0.1:$port" --payload-bytes "$BYTES" ||
        { note "the mosquitto half failed (see above)"; failed=1; rm -f "$OUT/mosquitto.json"; }
    stop_server "$mpid"
fi

# --- ours: mppd ---------------------------------------------------------
if [[ "$ONLY" != theirs ]]; then
    udp="$(free_port udp)"
    http="$(free_port tcp)"
    data="$TMP/mppd-data"
    mkdir -p "$data"
    taskset -c "$NODE_CPU" "$MPPD" --threads 1 --cpus "$NODE_CPU" --data-dir "$data" \
        --udp "127.0.0.1:$udp" --http "127.0.0.1:$http" --log-level warn \
        >"$TMP/mppd.log" 2>&1 &
    npid=$!
    PIDS+=("$npid")
    wait_tcp "$http" "$npid" || { tail -20 "$TMP/mppd.log" >&2; die "mppd did not start (udp $udp, http $http)"; }
    note "mppd pid $npid on udp 127.0.0.1:$udp, http 127.0.0.1:$http (CPU $NODE_CPU); $N devices in 1 account, $BYTES-byte bitmask"
    run_loadgen "$BOUND" "$OUT/mppd.txt" \
        --node "127.0.0.1:$udp" --control "http://127.0.0.1:$http" --data-dir "$data" \
        --devices "$N" --accounts 1 --duration "$DURATION" --warmup "$WARMUP" \
        --node-pid "$npid" --json "$OUT/mppd.json" \
        fanout --rate 0 --ahead "$AHEAD" --bitmask-bytes "$BYTES" ||
        { note "the mppd half failed: mpp-loadgen fanout exited non-zero (see above; node log: $(tail -3 "$TMP/mppd.log" | tr '\n' ' '))"; failed=1; rm -f "$OUT/mppd.json"; }
    stop_server "$npid"
fi

# --- summary ------------------------------------------------------------
echo
echo "fan-out of one publish to $N subscribers, $BYTES-byte payload, $DURATION measured; servers on CPU $NODE_CPU, loadgen on CPU $LOADGEN_CPU"
header "notifications"
[[ -f "$OUT/mppd.json" ]] && row "mppd (ours)" "$OUT/mppd.json"
[[ -f "$OUT/mosquitto.json" ]] && row "mosquitto (theirs)" "$OUT/mosquitto.json"
if [[ -f "$OUT/mppd.json" && -f "$OUT/mosquitto.json" ]]; then
    ratio "$OUT/mppd.json" "$OUT/mosquitto.json" 2.5
    # The rate above counts datagrams: a device with several publishes
    # pending gets them in one notify (their bitmasks merged, docs/PROTOCOL.md §6),
    # while mosquitto sends every message on its own. Counted per publish
    # and subscriber instead (each subscriber learning of each publish):
    python3 - "$(json_field "$OUT/mppd.json" .figures.publishes_delivered_per_s)" \
        "$(json_field "$OUT/mosquitto.json" .rate_per_s)" <<'PY'
import sys
try:
    ours, theirs = (float(x) for x in sys.argv[1:])
except ValueError:
    sys.exit(0)
if theirs > 0:
    print(f"per publish x subscriber: ours {ours:,.0f}/s, theirs {theirs:,.0f}/s, "
          f"ratio {ours / theirs:.2f} (publishes merged per notify; not the bar's datagram count)")
PY
fi
exit "$failed"
