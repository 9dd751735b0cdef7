#!/usr/bin/env bash
# Runs mppd across I/O backends and shard counts on loopback, drives each
# node with mpp-loadgen, and writes a markdown table (stdout and a file).
#
#   tuning/sweep.sh                          # defaults below
#   BUILD=1 DURATION=10s tuning/sweep.sh     # build first, longer windows
#   IOS=mmsg THREADS=1 OUT=/tmp/s.md tuning/sweep.sh
#
# Environment:
#   DEVICES=10000  ACCOUNTS=100 (fanout)  DURATION=5s  WARMUP=2s
#   IOS="uring mmsg"  THREADS="1 2"  SCENARIOS="heartbeat fanout"
#   WINDOW=256 (heartbeat --window)  RATE=0 (fanout --rate, 0 = max)
#   AHEAD=0 (fanout --ahead: 0 = each publish its own notify, no merging;
#     32 = the flood in which the node merges publishes per device)
#   LG_THREADS=1 (loadgen worker threads)  BASELINE=0 (1: --baseline, fills "ratio",
#     "baseline CPU %" (the in-process reflector's or raw sender's thread) and
#     "ratio per CPU-s" (each side's rate per CPU-second of its server: the
#     figure to read when the loadgen, not the server, was the bottleneck))
#   INTERLEAVE=1s (with BASELINE=1: --interleave SLICE, node and baseline
#     alternate in slices of this length for the whole DURATION and "ratio" is
#     the median of the per-round ratios with their min-max; 0 = one node
#     window, then one baseline window, as before)
#   REPEAT=1 (runs per row; with more, each run is a row "scenario #k" and a
#     row "scenario median" follows with the median rate, ratio and p99 and
#     the ratio's min-max: on a shared VM one window moves by ±10 %)
#   PORT=27099 (node UDP; HTTP control on PORT+1)  TIMEOUT=<s> (per loadgen run)
#   OUT=tuning/sweep-<date>.md  BUILD=0  KEEP=0 (1: keep logs and JSON)
#   MPPD, LOADGEN: binaries [${CARGO_TARGET_DIR:-target}/release/{mppd,mpp-loadgen}]
#   JSON_TOOL=jq|python3 (default: jq when installed)
#
# One node per run (io, threads, scenario, repeat), with no state kept from
# the run before: started, polled on /healthz (10 s at most), loaded,
# stopped with SIGTERM. A failed run becomes a row saying
# "failed" with the first line of the error, and the sweep goes on.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release

DEVICES=${DEVICES:-10000}
ACCOUNTS=${ACCOUNTS:-100}
DURATION=${DURATION:-5s}
WARMUP=${WARMUP:-2s}
IOS=${IOS:-uring mmsg}
THREADS=${THREADS:-1 2}
SCENARIOS=${SCENARIOS:-heartbeat fanout}
WINDOW=${WINDOW:-256}
RATE=${RATE:-0}
AHEAD=${AHEAD:-0}
LG_THREADS=${LG_THREADS:-1}
BASELINE=${BASELINE:-0}
INTERLEAVE=${INTERLEAVE:-1s}
REPEAT=${REPEAT:-1}
PORT=${PORT:-27099}
HTTP_PORT=$((PORT + 1))
BUILD=${BUILD:-0}
KEEP=${KEEP:-0}
MPPD=${MPPD:-$BIN/mppd}
LOADGEN=${LOADGEN:-$BIN/mpp-loadgen}
OUT=${OUT:-$ROOT/tuning/sweep-$(date +%Y-%m-%d-%H%M%S).md}

die() {
    echo "sweep.sh: $*" >&2
    exit 2
}

# Seconds in 5, 5s, 2m, 1h (what the loadgen's --duration takes).
secs() {
    local t=$1 n mult=1
    case "$t" in
        *s) n=${t%s} ;;
        *m) n=${t%m}; mult=60 ;;
        *h) n=${t%h}; mult=3600 ;;
        *) n=$t ;;
    esac
    case "$n" in '' | *[!0-9]*) die "bad duration '$t' (e.g. 5s, 2m)" ;; esac
    echo $((n * mult))
}

for v in DEVICES ACCOUNTS WINDOW LG_THREADS PORT REPEAT AHEAD; do
    case "${!v}" in '' | *[!0-9]*) die "$v must be a whole number, got '${!v}'" ;; esac
done
for t in $THREADS; do
    case "$t" in '' | 0 | *[!0-9]*) die "THREADS must list positive whole numbers, got '$t'" ;; esac
done
DUR_S=$(secs "$DURATION")
WARM_S=$(secs "$WARMUP")
# Connect phase at the default 50k/s, warmup, window, fanout's 3 s drain, a margin.
TIMEOUT=${TIMEOUT:-$((DEVICES / 20000 + WARM_S + DUR_S + 60))}
if [ "$BASELINE" = 1 ]; then
    # A baseline window after the node's, or (interleaved) the sides' warm-ups
    # and their settling between slices; fanout's second raw sender.
    TIMEOUT=$((TIMEOUT + 2 * (DUR_S + WARM_S)))
fi

command -v curl >/dev/null || die "needs curl (to poll the node's /healthz)"
JSON_TOOL=${JSON_TOOL:-}
if [ -z "$JSON_TOOL" ]; then
    if command -v jq >/dev/null; then
        JSON_TOOL=jq
    elif command -v python3 >/dev/null; then
        JSON_TOOL=python3
    else
        die "needs jq or python3 to read the loadgen's JSON"
    fi
fi
case "$JSON_TOOL" in
    jq | python3) command -v "$JSON_TOOL" >/dev/null || die "JSON_TOOL=$JSON_TOOL not found" ;;
    *) die "JSON_TOOL must be jq or python3" ;;
esac

if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --release --workspace --bin mppd --bin mpp-loadgen) ||
        die "cargo build failed"
fi
[ -x "$MPPD" ] || die "no $MPPD (BUILD=1, or set MPPD=)"
[ -x "$LOADGEN" ] || die "no $LOADGEN (BUILD=1, or set LOADGEN=)"

NCPU=$(nproc)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/mpp-sweep.XXXXXX")
DATA=$WORK/data
NODE_PID=""
LG_PID=""
WHY=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$LG_PID" ] && alive "$LG_PID"; then
        kill -TERM "$LG_PID" 2>/dev/null || true
        wait "$LG_PID" 2>/dev/null || true
    fi
    stop_node
    if [ "$KEEP" = 1 ]; then
        echo "sweep.sh: logs and JSON kept in $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Is process $1 running (not gone, not a zombie waiting to be reaped)?
alive() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state=$(sed 's/.*) //; s/ .*//' "/proc/$1/stat" 2>/dev/null || echo X)
    [ "$state" != Z ] && [ "$state" != X ]
}

# SIGTERM, then SIGKILL after 10 s.
stop_node() {
    [ -n "$NODE_PID" ] || return 0
    if alive "$NODE_PID"; then
        kill -TERM "$NODE_PID" 2>/dev/null || true
        local _
        for _ in $(seq 100); do
            alive "$NODE_PID" || break
            sleep 0.1
        done
        if alive "$NODE_PID"; then
            echo "sweep.sh: node $NODE_PID ignored SIGTERM for 10 s; SIGKILL" >&2
            kill -KILL "$NODE_PID" 2>/dev/null || true
        fi
    fi
    wait "$NODE_PID" 2>/dev/null || true
    NODE_PID=""
}

# Is anything bound to UDP port $1 (IPv4 or IPv6)? The node binds with
# SO_REUSEPORT, so a stray node on the port would silently take a share.
udp_port_busy() {
    local hex
    hex=$(printf ':%04X ' "$1")
    grep -qs -- "$hex" /proc/net/udp /proc/net/udp6
}

# The line of a log that says what went wrong: a panic's message, else the
# first line that mentions an error, else the first non-empty line. Colour
# codes stripped, '|' escaped for markdown, at most 160 characters.
error_line() { # file [any]: with "any", fall back to the first non-empty line
    local line
    line=$(sed 's/\x1b\[[0-9;]*m//g' "$1" 2>/dev/null | sed -n '
        /panicked at/{n;s/^/panicked: /;p;q}
        /[Ee]rror\|ERROR\|[Ff]ailed\|cannot\|[Uu]nable/{p;q}' || true)
    if [ -z "$line" ] && [ "${2:-}" = any ]; then
        line=$(sed 's/\x1b\[[0-9;]*m//g' "$1" 2>/dev/null | sed -n '/[^[:space:]]/{p;q}' || true)
        line=${line:-no error output}
    fi
    line=${line//|/\\|}
    printf '%s' "$line" | cut -c1-160
}

# The CPU lists: node shards on 0..T-1; the loadgen on the next LG_THREADS
# CPUs when the machine has them, otherwise unpinned (sharing the node's).
node_cpus() {
    if [ "$1" -eq 1 ]; then echo 0; else echo "0-$(($1 - 1))"; fi
}
loadgen_cpus() {
    if [ $(($1 + LG_THREADS)) -le "$NCPU" ]; then
        if [ "$LG_THREADS" -eq 1 ]; then echo "$1"; else echo "$1-$(($1 + LG_THREADS - 1))"; fi
    fi
}

# Prints "rate ratio p99 lost node_cpu loadgen_cpu baseline_cpu ratio_per_cpu"
# (tab-separated, "-" for a null) from a loadgen JSON report, or fails.
extract() {
    local json=$1
    if [ "$JSON_TOOL" = jq ]; then
        jq -er '
            def f(d): if . == null then "-" else (. * d | round) / d | tostring end;
            def pct: if . == null then "-" else (. * 100 | round | tostring) end;
            if (.rate_per_s | type) != "number" then error("no rate_per_s") else . end
            | [ (.rate_per_s | round | tostring),
                (if .interleave.comparisons[0].ratio != null then
                    (.interleave.comparisons[0].ratio
                     | "\(.median | f(1000)) (\(.min | f(1000))-\(.max | f(1000)))")
                 else (.ratio | f(1000)) end),
                (.latency_us.p99 // null | if . == null then "-" else tostring end),
                (.lost // null | if . == null then "-" else tostring end),
                (.node_cpu | pct),
                (.loadgen_cpu | pct),
                (.baseline_server_cpu | pct),
                (.ratio_per_cpu | f(1000)) ]
            | @tsv' "$json"
    else
        python3 - "$json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
if not isinstance(r.get("rate_per_s"), (int, float)):
    sys.exit("no rate_per_s")
def pct(v):
    return str(round(v * 100))
def ratio(v):
    return f"{v:.3f}".rstrip("0").rstrip(".")
def opt(v, fmt):
    return "-" if v is None else fmt(v)
lat = r.get("latency_us") or {}
il = ((r.get("interleave") or {}).get("comparisons") or [{}])[0].get("ratio")
ratio_cell = opt(r.get("ratio"), ratio)
if il:
    ratio_cell = f"{ratio(il['median'])} ({ratio(il['min'])}-{ratio(il['max'])})"
print("\t".join([
    str(round(r["rate_per_s"])),
    ratio_cell,
    opt(lat.get("p99"), str),
    opt(r.get("lost"), str),
    opt(r.get("node_cpu"), pct),
    opt(r.get("loadgen_cpu"), pct),
    opt(r.get("baseline_server_cpu"), pct),
    opt(r.get("ratio_per_cpu"), ratio),
]))
PY
    fi
}

emit() { # one markdown line to stdout and the report
    printf '%s\n' "$1" | tee -a "$OUT"
}

row() { # io threads node_cpus loadgen_cpus scenario rate ratio p99 lost node_cpu loadgen_cpu
    local line="|" cell
    for cell in "$@"; do
        line+=" $cell |"
    done
    emit "$line"
}

mkdir -p "$(dirname "$OUT")"
: >"$OUT"
commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null || true)" ]; then
    commit="$commit (modified)"
fi
cpu_model=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)
baseline_note="no baseline (BASELINE=1 adds --baseline; ratio is - without it)"
if [ "$BASELINE" = 1 ]; then
    baseline_note="--baseline --baseline-cpu <node's first CPU>"
    if [ "$INTERLEAVE" != 0 ]; then
        baseline_note+=" --interleave $INTERLEAVE (ratio: median of the per-round ratios, their min-max in brackets)"
    fi
fi

emit "# mppd sweep $(date -u '+%Y-%m-%d %H:%M UTC')"
emit ""
emit "- commit $commit; Linux $(uname -r); $NCPU CPUs (${cpu_model:-unknown model}); loopback"
emit "- devices $DEVICES, fanout accounts $ACCOUNTS, warmup $WARMUP, measured $DURATION, loadgen threads $LG_THREADS; $baseline_note"
emit "- node: \`mppd --threads T --cpus C --io IO --udp 127.0.0.1:$PORT --http 127.0.0.1:$HTTP_PORT --data-dir D --no-keep-state\`, a fresh one per row"
emit "- heartbeat: \`mpp-loadgen ... --devices $DEVICES heartbeat --window $WINDOW\`; fanout: \`mpp-loadgen ... --devices $DEVICES --accounts $ACCOUNTS fanout --rate $RATE --ahead $AHEAD\`"
for t in $THREADS; do
    if [ -z "$(loadgen_cpus "$t")" ]; then
        emit "- loadgen cpus \"unpinned\": with $t shard(s) on $NCPU CPUs no core is left over, so the loadgen shares the node's"
        break
    fi
done
emit ""
emit "| io | threads | node cpus | loadgen cpus | scenario | rate/s | ratio | p99 µs | lost | node CPU % | loadgen CPU % | baseline CPU % | ratio per CPU-s |"
emit "| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"

# Starts the node and sets NODE_PID; on failure sets WHY and returns 1.
start_node() { # io threads cpus log
    local io=$1 threads=$2 cpus=$3 log=$4 _
    WHY=""
    if udp_port_busy "$PORT"; then
        WHY="UDP port $PORT already in use (set PORT=)"
        return 1
    fi
    if curl -fs -m 1 -o /dev/null "http://127.0.0.1:$HTTP_PORT/healthz"; then
        WHY="HTTP port $HTTP_PORT already answers (set PORT=)"
        return 1
    fi
    # --no-keep-state: every run starts from an empty node. With the state
    # kept, each node restored the last run's 10,000 connections, whose
    # devices had gone: the second run fanned out to 20,000 (half of them
    # dead, every notify retransmitted), the third to 30,000.
    NO_COLOR=1 "$MPPD" --threads "$threads" --cpus "$cpus" --io "$io" --data-dir "$DATA" \
        --no-keep-state --udp "127.0.0.1:$PORT" --http "127.0.0.1:$HTTP_PORT" >"$log" 2>&1 &
    NODE_PID=$!
    for _ in $(seq 50); do
        if ! alive "$NODE_PID"; then
            wait "$NODE_PID" 2>/dev/null || true
            NODE_PID=""
            WHY="node exited: $(error_line "$log" any)"
            return 1
        fi
        if curl -fs -m 1 -o /dev/null "http://127.0.0.1:$HTTP_PORT/healthz"; then
            return 0
        fi
        sleep 0.2
    done
    stop_node
    WHY="node did not answer /healthz within 10 s"
    return 1
}

# The median of the numbers given (one per line); "-" when there are none.
median() {
    local sorted n
    sorted=$(grep -E '^-?[0-9.]+$' | sort -g || true)
    n=$(printf '%s' "$sorted" | grep -c . || true)
    if [ "$n" -eq 0 ]; then
        echo -
    elif [ $((n % 2)) -eq 1 ]; then
        printf '%s\n' "$sorted" | sed -n "$((n / 2 + 1))p"
    else
        printf '%s\n' "$sorted" | sed -n "$((n / 2)),$((n / 2 + 1))p" |
            awk '{s += $1} END {v = s / 2; if (v == int(v)) printf "%d\n", v; else printf "%.3f\n", v}'
    fi
}

# "min-max" of the numbers given, or "-".
span() {
    local sorted
    sorted=$(grep -E '^-?[0-9.]+$' | sort -g || true)
    if [ -z "$sorted" ]; then echo -; else echo "$(head -n 1 <<<"$sorted")-$(tail -n 1 <<<"$sorted")"; fi
}

failures=0
for threads in $THREADS; do
    ncpus=$(node_cpus "$threads")
    lcpus=$(loadgen_cpus "$threads")
    for io in $IOS; do
        for scenario in $SCENARIOS; do
          rates="" ratios="" p99s="" cratios=""
          for rep in $(seq "$REPEAT"); do
            tag="$io-t$threads-$scenario-$rep"
            node_log=$WORK/node-$tag.log
            json=$WORK/$tag.json
            err=$WORK/loadgen-$tag.err
            label=$scenario
            [ "$REPEAT" -eq 1 ] || label="$scenario #$rep"
            cols=("$io" "$threads" "$ncpus" "${lcpus:-unpinned}" "$label")
            echo "sweep.sh: $tag ..." >&2

            if ! start_node "$io" "$threads" "$ncpus" "$node_log"; then
                row "${cols[@]}" "failed: $WHY" - - - - - - -
                failures=$((failures + 1))
                continue
            fi

            args=(--node "127.0.0.1:$PORT" --control "http://127.0.0.1:$HTTP_PORT"
                --data-dir "$DATA" --devices "$DEVICES" --threads "$LG_THREADS"
                --node-pid "$NODE_PID" --duration "$DURATION" --warmup "$WARMUP"
                --no-progress --json "$json")
            if [ -n "$lcpus" ]; then
                args+=(--cpus "$lcpus")
            fi
            if [ "$BASELINE" = 1 ]; then
                args+=(--baseline --baseline-cpu 0)
                [ "$INTERLEAVE" = 0 ] || args+=(--interleave "$INTERLEAVE")
            fi
            case "$scenario" in
                heartbeat) args+=(heartbeat --window "$WINDOW") ;;
                fanout) args+=(--accounts "$ACCOUNTS" fanout --rate "$RATE" --ahead "$AHEAD") ;;
                *) args+=("$scenario") ;;
            esac

            rm -f "$json"
            rc=0
            timeout --kill-after=5 "$TIMEOUT" "$LOADGEN" "${args[@]}" >"$WORK/loadgen-$tag.out" 2>"$err" &
            LG_PID=$!
            wait "$LG_PID" || rc=$?
            LG_PID=""

            node_alive=1
            node_status=""
            if ! alive "$NODE_PID"; then
                node_alive=0
                st=0
                wait "$NODE_PID" 2>/dev/null || st=$?
                NODE_PID=""
                if [ "$st" -gt 128 ]; then
                    node_status="killed by signal $((st - 128))"
                else
                    node_status="exit status $st"
                fi
                why=$(error_line "$node_log")
                node_status+=${why:+: $why}
            fi
            if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
                result="failed: loadgen timed out after ${TIMEOUT} s"
            elif [ "$rc" -ne 0 ]; then
                result="failed: $(error_line "$err" any)"
            elif [ ! -s "$json" ]; then
                result="failed: loadgen wrote no JSON"
            elif ! fields=$(extract "$json" 2>"$err.json"); then
                result="failed: unreadable JSON: $(error_line "$err.json" any)"
            else
                result=""
            fi
            if [ "$node_alive" -eq 0 ]; then
                result="failed: node exited during the run ($node_status)${result:+; loadgen: ${result#failed: }}"
            fi
            if [ -n "$result" ]; then
                row "${cols[@]}" "$result" - - - - - - -
                failures=$((failures + 1))
            else
                IFS=$'\t' read -r rate ratio p99 lost ncpu lgcpu bcpu cratio <<<"$fields"
                row "${cols[@]}" "$rate" "$ratio" "$p99" "$lost" "$ncpu" "$lgcpu" "$bcpu" "$cratio"
                rates+="$rate"$'\n'
                ratios+="${ratio%% *}"$'\n'
                cratios+="$cratio"$'\n'
                p99s+="$p99"$'\n'
            fi
            stop_node
          done
          if [ "$REPEAT" -gt 1 ]; then
              ratio_cell="$(median <<<"$ratios")"
              [ "$ratio_cell" = - ] || ratio_cell+=" ($(span <<<"$ratios"))"
              cratio_cell="$(median <<<"$cratios")"
              [ "$cratio_cell" = - ] || cratio_cell+=" ($(span <<<"$cratios"))"
              row "$io" "$threads" "$ncpus" "${lcpus:-unpinned}" "$scenario median" \
                  "$(median <<<"$rates")" "$ratio_cell" "$(median <<<"$p99s")" - - - - "$cratio_cell"
          fi
        done
    done
done

emit ""
if [ "$failures" -gt 0 ]; then
    emit "$failures run(s) failed."
fi
echo "sweep.sh: table written to $OUT" >&2
