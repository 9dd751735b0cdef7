#!/usr/bin/env bash
# Fan-out against mosquitto: one publish to N subscribers, same N, same
# payload size, through mosquitto at MQTT QoS 0 and QoS 1 and through mppd
# (fanout, where every device acknowledges every notify: the guarantee of
# QoS 1). Each side is measured twice:
#   max     publishing as fast as it takes them (mqtt: --max-in-flight
#           publishes not yet delivered everywhere; mppd: --pipeline 4,
#           --ahead AHEAD);
#   p99<=   the highest rate it sustains with p99 publish → subscriber
#           latency ≤ P99_MS (default 10 ms) and nothing lost: rates of
#           90, 75, 60, 50, 40, 30, 20, 10, 5, 2 and 1 % of its own max
#           publish rate are tried in turn, SWEEP_DURATION each, and the
#           first that passes is reported.
#
# Usage: benches/peers/mosquitto.sh [--devices N] [--duration 10s]
#            [--warmup 2s] [--bytes 16] [--only theirs|ours] [--out DIR]
#            [--no-sweep]
#   or the same through the environment: N=200 DURATION=10s WARMUP=2s
#   SWEEP_DURATION=5s P99_MS=10 BYTES=16 ONLY= OUT= NODE_CPU=0 LOADGEN_CPU=1
#   SKIP_BUILD=1 AHEAD=0 QOS="0 1" (mosquitto's QoS levels to run)
#   FRACTIONS="0.90 0.75 …" (the sweep's shares of max, highest first)
#
# Both servers run pinned to NODE_CPU (taskset; mppd with --threads 1), the
# loadgen to LOADGEN_CPU. mosquitto keeps its defaults but for what a
# benchmark needs (no persistence, unlimited connections, 100,000 queued
# messages per client; max_inflight_messages stays 20). AHEAD (fanout
# --ahead, default 0): the next publish to the account once every device
# has the last, so each publish reaches each device in a datagram of its
# own, as mosquitto sends every message. Reports go to OUT (default: a
# temporary directory, removed on exit), one JSON per run:
# {mosquitto-qos0,mosquitto-qos1,mppd}-{max,RATE,sustained}.json. Prints
# each run's line and a summary: notifications delivered/s and latency of
# each side at max and at p99 ≤ P99_MS, and the ratios ours/theirs
# (docs/BENCHMARKS.md's bar: ours ≥ 2× mosquitto QoS 1 at equal p99).
# Installs mosquitto with apt-get if it is missing. Exits non-zero if a
# run failed.
set -euo pipefail
# shellcheck source=benches/peers/lib.sh
source "$(dirname "$0")/lib.sh"

N="${N:-200}"
DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
SWEEP_DURATION="${SWEEP_DURATION:-5s}"
P99_MS="${P99_MS:-10}"
BYTES="${BYTES:-16}"
AHEAD="${AHEAD:-0}"
ONLY="${ONLY:-}"
OUT="${OUT:-}"
SWEEP=1
while [[ $# -gt 0 ]]; do
    case "$1" in
    -n | --devices) N="$2"; shift 2 ;;
    -d | --duration) DURATION="$2"; shift 2 ;;
    --warmup) WARMUP="$2"; shift 2 ;;
    --bytes) BYTES="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --no-sweep) SWEEP=0; shift ;;
    -h | --help) sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
    esac
done
[[ "$N" =~ ^[0-9]+$ && "$N" -ge 1 && "$N" -le 50000 ]] || die "N must be 1 to 50000"
[[ "$BYTES" =~ ^[0-9]+$ && "$BYTES" -ge 16 && "$BYTES" -le 32 ]] ||
    die "BYTES must be 16 to 32 (MQTT payload: 16 bytes of send time and sequence; mppd bitmask: at most 32)"
[[ "$AHEAD" =~ ^[0-9]+$ && "$AHEAD" -le 32 ]] || die "AHEAD must be 0 to 32 (fanout --ahead)"
[[ "$P99_MS" =~ ^[0-9]+$ && "$P99_MS" -ge 1 ]] || die "P99_MS must be a whole number of milliseconds, at least 1"
[[ -z "$ONLY" || "$ONLY" == theirs || "$ONLY" == ours ]] || die "--only takes theirs or ours"
[[ -n "$OUT" ]] || OUT="$TMP/out"
mkdir -p "$OUT"
BOUND=$(($(secs "$DURATION") + $(secs "$WARMUP") + 90))
SWEEP_BOUND=$(($(secs "$SWEEP_DURATION") + $(secs "$WARMUP") + 90))
read -r -a FRACTIONS <<<"${FRACTIONS:-0.90 0.75 0.60 0.50 0.40 0.30 0.20 0.10 0.05 0.02 0.01}"
read -r -a QOS <<<"${QOS:-0 1}"
ulimit -n $((N + 4096)) 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

build
failed=0
mpid="" port="" npid="" udp="" http="" data=""

# One run of one side: run_side SIDE RATE (0 = max) DURATION BOUND. Its
# report is $OUT/SIDE-max.json or $OUT/SIDE-RATE.json; its line is printed.
# Returns non-zero when the loadgen failed.
run_side() {
    local side="$1" rate="$2" duration="$3" bound="$4" tag json
    tag="$([[ "$rate" == 0 ]] && echo max || echo "$rate")"
    json="$OUT/$side-$tag.json"
    local args=(--devices "$N" --duration "$duration" --warmup "$WARMUP" --json "$json")
    case "$side" in
    mosquitto-qos*)
        run_loadgen "$bound" "$OUT/$side-$tag.txt" "${args[@]}" --node-pid "$mpid" \
            mqtt --broker "127.0.0.1:$port" --payload-bytes "$BYTES" \
            --qos "${side#mosquitto-qos}" --rate "$rate" >/dev/null ;;
    mppd)
        run_loadgen "$bound" "$OUT/$side-$tag.txt" "${args[@]}" --node-pid "$npid" \
            --node "127.0.0.1:$udp" --control "http://127.0.0.1:$http" --data-dir "$data" \
            --accounts 1 fanout --rate "$rate" --ahead "$AHEAD" --bitmask-bytes "$BYTES" \
            >/dev/null ;;
    esac || { rm -f "$json"; return 1; }
    line "$side $tag" "$json"
}

# One line per run: line NAME FILE
line() {
    python3 - "$1" "$2" <<'PY'
import json, sys
name, path = sys.argv[1:]
r = json.load(open(path))
lat = r.get("latency_us") or {}
f = r.get("figures", {})
print(f"  {name:<22} {r['rate_per_s']:>10,.0f} deliveries/s  {f.get('publishes_per_s', 0):>9,.0f} publishes/s"
      f"  p50 {lat.get('p50', '-'):>7} µs  p99 {lat.get('p99', '-'):>7} µs  lost {r['lost']}"
      f"  node CPU {100 * (r.get('node_cpu') or 0):.0f} %", flush=True)
PY
}

# Prints "yes" when a run's p99 is within P99_MS and it lost nothing.
within() {
    python3 - "$1" "$P99_MS" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
p99 = (r.get("latency_us") or {}).get("p99")
ok = p99 is not None and p99 <= 1000 * float(sys.argv[2]) and r["lost"] == 0
print("yes" if ok else "no")
PY
}

# The max run, then the sweep down to the first rate within the p99 bound:
# measure SIDE. Leaves $OUT/SIDE-max.json and, when a run passed,
# $OUT/SIDE-sustained.json (a copy of it).
measure() {
    local side="$1" max_pub rate f
    note "$side: max"
    run_side "$side" 0 "$DURATION" "$BOUND" || { note "$side: the max run failed"; failed=1; return 0; }
    if [[ "$(within "$OUT/$side-max.json")" == yes ]]; then
        cp "$OUT/$side-max.json" "$OUT/$side-sustained.json"
        return 0
    fi
    [[ $SWEEP == 1 ]] || return 0
    max_pub="$(json_field "$OUT/$side-max.json" .figures.publishes_per_s)"
    note "$side: the highest rate with p99 ≤ $P99_MS ms (max: $max_pub publishes/s)"
    for f in "${FRACTIONS[@]}"; do
        rate="$(python3 -c "print(max(1, round(float('$max_pub') * $f)))")"
        run_side "$side" "$rate" "$SWEEP_DURATION" "$SWEEP_BOUND" || { failed=1; continue; }
        if [[ "$(within "$OUT/$side-$rate.json")" == yes ]]; then
            cp "$OUT/$side-$rate.json" "$OUT/$side-sustained.json"
            return 0
        fi
    done
    note "$side: no rate down to ${FRACTIONS[-1]} of max kept p99 ≤ $P99_MS ms"
}

# --- theirs: mosquitto --------------------------------------------------
if [[ "$ONLY" != ours ]]; then
    need_package mosquitto mosquitto
    port="$(free_port tcp)"
    cat >"$TMP/mosquitto.conf" <<CONF
listener $port 127.0.0.1
allow_anonymous true
persistence false
max_connections -1
max_queued_messages 100000
connection_messages false
log_dest stderr
log_type error
log_type warning
CONF
    taskset -c "$NODE_CPU" mosquitto -c "$TMP/mosquitto.conf" >"$TMP/mosquitto.log" 2>&1 &
    mpid=$!
    PIDS+=("$mpid")
    wait_tcp "$port" "$mpid" || { cat "$TMP/mosquitto.log" >&2; die "mosquitto did not start on 127.0.0.1:$port"; }
    note "mosquitto $(mosquitto -h 2>/dev/null | head -1 | awk '{print $3}') pid $mpid on 127.0.0.1:$port (CPU $NODE_CPU); $N subscribers, $BYTES-byte payload"
    for q in "${QOS[@]}"; do
        [[ "$q" == 0 || "$q" == 1 ]] || die "QOS lists 0 and/or 1"
        measure "mosquitto-qos$q"
    done
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
    measure mppd
    stop_server "$npid"
fi

# --- summary ------------------------------------------------------------
echo
echo "fan-out of one publish to $N subscribers, $BYTES-byte payload; max runs $DURATION, sweep runs $SWEEP_DURATION; servers on CPU $NODE_CPU, loadgen on CPU $LOADGEN_CPU"
header "notifications"
for side in mppd mosquitto-qos1 mosquitto-qos0; do
    [[ -f "$OUT/$side-max.json" ]] && row "$side max" "$OUT/$side-max.json"
    [[ -f "$OUT/$side-sustained.json" ]] && row "$side p99≤${P99_MS}ms" "$OUT/$side-sustained.json"
done
for theirs in mosquitto-qos1 mosquitto-qos0; do
    bar=2
    [[ "$theirs" == mosquitto-qos0 ]] && bar=2.5
    if [[ -f "$OUT/mppd-max.json" && -f "$OUT/$theirs-max.json" ]]; then
        printf '%-34s' "at max, vs $theirs:"
        ratio "$OUT/mppd-max.json" "$OUT/$theirs-max.json" "$bar"
    fi
    if [[ -f "$OUT/mppd-sustained.json" && -f "$OUT/$theirs-sustained.json" ]]; then
        printf '%-34s' "at p99 ≤ $P99_MS ms, vs $theirs:"
        ratio "$OUT/mppd-sustained.json" "$OUT/$theirs-sustained.json" "$bar"
    fi
done
exit "$failed"
