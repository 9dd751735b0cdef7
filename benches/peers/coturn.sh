#!/usr/bin/env bash
# STUN against coturn: the same STUN Binding load (mpp-loadgen stun, a fixed
# window of requests in flight) against coturn --stun-only and against mppd.
#
# Usage: benches/peers/coturn.sh [--duration 10s] [--warmup 2s]
#            [--window 256] [--only theirs|ours] [--out DIR]
#   or the same through the environment: DURATION=10s WARMUP=2s WINDOW=256
#   ONLY= OUT= NODE_CPU=0 LOADGEN_CPU=1 SKIP_BUILD=1 INTERLEAVE=
#
# INTERLEAVE=SLICE (e.g. 1s): both servers run at once and take turns in
# one loadgen run (mpp-loadgen --versus coturn --interleave SLICE stun),
# then mppd and the in-process reflector likewise (--baseline): each ratio
# is the median of the per-round ratios, with their range, so that the
# host's drift falls on both sides (docs/BENCHMARKS.md "How to measure
# well"). Reports: interleaved-coturn.json, interleaved-echo.json.
#
# Both servers run pinned to NODE_CPU (taskset; mppd with --threads 1 and
# --stun-rate 0, i.e. without its per-source answer limit, which the
# loadgen's few source ports would hit), the loadgen to LOADGEN_CPU.
# Reports go to OUT (default: a temporary directory, removed on exit):
# coturn.json and mppd.json. Prints both loadgen tables and a summary:
# binding responses/s, ours, theirs and the ratio (docs/BENCHMARKS.md's bar:
# ours ≥ 1.5× coturn). Installs coturn with apt-get if it is missing.
# Exits non-zero if either half failed.
set -euo pipefail
# shellcheck source=benches/peers/lib.sh
source "$(dirname "$0")/lib.sh"

DURATION="${DURATION:-10s}"
WARMUP="${WARMUP:-2s}"
WINDOW="${WINDOW:-256}"
ONLY="${ONLY:-}"
OUT="${OUT:-}"
INTERLEAVE="${INTERLEAVE:-}"
while [[ $# -gt 0 ]]; do
    case "$1" in
    -d | --duration) DURATION="$2"; shift 2 ;;
    --warmup) WARMUP="$2"; shift 2 ;;
    --window) WINDOW="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --interleave) INTERLEAVE="$2"; shift 2 ;;
    -h | --help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
    esac
done
[[ "$WINDOW" =~ ^[0-9]+$ && "$WINDOW" -ge 1 ]] || die "WINDOW must be a positive number"
[[ -z "$ONLY" || "$ONLY" == theirs || "$ONLY" == ours ]] || die "--only takes theirs or ours"
[[ -z "$INTERLEAVE" || -z "$ONLY" ]] || die "INTERLEAVE runs both servers: leave --only out"
[[ -n "$OUT" ]] || OUT="$TMP/out"
mkdir -p "$OUT"
BOUND=$(($(secs "$DURATION") + $(secs "$WARMUP") + 90))

build
failed=0

# --- theirs: coturn -----------------------------------------------------
if [[ "$ONLY" != ours ]]; then
    need_package turnserver coturn
    port="$(free_port udp)"
    mkdir -p "$TMP/coturn"
    taskset -c "$NODE_CPU" turnserver --stun-only \
        --listening-ip 127.0.0.1 --listening-port "$port" \
        --no-cli --no-tls --no-dtls --no-tcp \
        --userdb "$TMP/coturn/turndb" --pidfile "$TMP/coturn/turnserver.pid" \
        --log-file "$TMP/coturn/turn.log" --simple-log --no-stdout-log \
        >"$TMP/coturn.log" 2>&1 &
    tpid=$!
    PIDS+=("$tpid")
    wait_udp "$port" "$tpid" || { cat "$TMP/coturn.log" >&2; die "coturn did not start on udp 127.0.0.1:$port"; }
    note "coturn $(turnserver --version 2>/dev/null | head -1) pid $tpid on udp 127.0.0.1:$port (CPU $NODE_CPU)"
fi
if [[ "$ONLY" != ours && -z "$INTERLEAVE" ]]; then
    run_loadgen "$BOUND" "$OUT/coturn.txt" \
        --node "127.0.0.1:$port" --duration "$DURATION" --warmup "$WARMUP" \
        --node-pid "$tpid" --json "$OUT/coturn.json" \
        stun --window "$WINDOW" ||
        { note "the coturn half failed (see above)"; failed=1; rm -f "$OUT/coturn.json"; }
    stop_server "$tpid"
fi

# --- ours: mppd ---------------------------------------------------------
if [[ "$ONLY" != theirs ]]; then
    udp="$(free_port udp)"
    http="$(free_port tcp)"
    data="$TMP/mppd-data"
    mkdir -p "$data"
    taskset -c "$NODE_CPU" "$MPPD" --threads 1 --cpus "$NODE_CPU" --data-dir "$data" \
        --udp "127.0.0.1:$udp" --http "127.0.0.1:$http" --stun-rate 0 --log-level warn \
        >"$TMP/mppd.log" 2>&1 &
    npid=$!
    PIDS+=("$npid")
    wait_tcp "$http" "$npid" || { tail -20 "$TMP/mppd.log" >&2; die "mppd did not start (udp $udp, http $http)"; }
    note "mppd pid $npid on udp 127.0.0.1:$udp (CPU $NODE_CPU)"
fi
if [[ "$ONLY" != theirs && -z "$INTERLEAVE" ]]; then
    run_loadgen "$BOUND" "$OUT/mppd.txt" \
        --node "127.0.0.1:$udp" --duration "$DURATION" --warmup "$WARMUP" \
        --node-pid "$npid" --json "$OUT/mppd.json" \
        stun --window "$WINDOW" ||
        { note "the mppd half failed: mpp-loadgen stun exited non-zero (see above)"; failed=1; rm -f "$OUT/mppd.json"; }
    stop_server "$npid"
fi

# --- interleaved: both servers up, one loadgen run per comparison ------
if [[ -n "$INTERLEAVE" ]]; then
    BOUND=$((2 * $(secs "$WARMUP") + $(secs "$DURATION") + 90))
    run_loadgen "$BOUND" "$OUT/interleaved-coturn.txt" \
        --node "127.0.0.1:$udp" --node-pid "$npid" --versus "127.0.0.1:$port" --versus-pid "$tpid" \
        --interleave "$INTERLEAVE" --duration "$DURATION" --warmup "$WARMUP" \
        --json "$OUT/interleaved-coturn.json" stun --window "$WINDOW" ||
        { note "the interleaved run against coturn failed (see above)"; failed=1; rm -f "$OUT/interleaved-coturn.json"; }
    run_loadgen "$BOUND" "$OUT/interleaved-echo.txt" \
        --node "127.0.0.1:$udp" --node-pid "$npid" --baseline --baseline-cpu "$NODE_CPU" \
        --interleave "$INTERLEAVE" --duration "$DURATION" --warmup "$WARMUP" \
        --json "$OUT/interleaved-echo.json" stun --window "$WINDOW" ||
        { note "the interleaved run against the reflector failed (see above)"; failed=1; rm -f "$OUT/interleaved-echo.json"; }
    stop_server "$npid"
    stop_server "$tpid"
    echo
    echo "STUN Binding requests, window $WINDOW, $DURATION in $INTERLEAVE slices; servers on CPU $NODE_CPU, loadgen on CPU $LOADGEN_CPU"
    for f in coturn echo; do
        j="$OUT/interleaved-$f.json"
        [[ -f "$j" ]] || continue
        python3 - "$j" "$f" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
name = "coturn" if sys.argv[2] == "coturn" else r.get("baseline")
c = r["interleave"]["comparisons"][0]
def spread(k):
    s = c.get(k)
    return "-" if not s else f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}, {s['n']} rounds)"
pct = lambda v: "-" if v is None else f"{100 * v:.0f} %"
print(f"mppd vs {name}: mppd {r['rate_per_s']:,.0f} responses/s (node CPU {pct(r.get('node_cpu'))}), "
      f"{name} {c['rate_per_s']:,.0f}/s (CPU {pct(c.get('server_cpu'))})")
print(f"  ratio {spread('ratio')}; per CPU-s {spread('ratio_per_cpu')}")
EOF
    done
    exit "$failed"
fi

# --- summary ------------------------------------------------------------
echo
echo "STUN Binding requests, window $WINDOW, $DURATION measured; servers on CPU $NODE_CPU, loadgen on CPU $LOADGEN_CPU"
header "responses"
[[ -f "$OUT/mppd.json" ]] && row "mppd (ours)" "$OUT/mppd.json"
[[ -f "$OUT/coturn.json" ]] && row "coturn (theirs)" "$OUT/coturn.json"
if [[ -f "$OUT/mppd.json" && -f "$OUT/coturn.json" ]]; then
    ratio "$OUT/mppd.json" "$OUT/coturn.json" 1.5
fi
exit "$failed"
