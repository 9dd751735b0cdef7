# shellcheck shell=bash
# Shared helpers of benches/peers/*.sh (sourced, not run).
#
# Every server these scripts start listens on 127.0.0.1 only and is killed
# on exit; every load run is bounded by `timeout`.

PEERS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$PEERS_DIR/../.." && pwd)"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
LOADGEN="$BIN/mpp-loadgen"
MPPD="$BIN/mppd"

NODE_CPU="${NODE_CPU:-0}"
LOADGEN_CPU="${LOADGEN_CPU:-1}"

PIDS=()
TMP="$(mktemp -d "${TMPDIR:-/tmp}/mpp-peers.XXXXXX")"

die() {
    echo "${0##*/}: $*" >&2
    exit 1
}

note() {
    echo "${0##*/}: $*" >&2
}

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Stops one server we started (and forgets it).
stop_server() {
    local pid="$1" rest=() p
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${PIDS[@]}"; do
        [[ "$p" == "$pid" ]] || rest+=("$p")
    done
    PIDS=("${rest[@]}")
}

# Installs a Debian package when `command` is missing.
need_package() {
    local command="$1" package="$2"
    command -v "$command" >/dev/null 2>&1 && return 0
    note "installing $package"
    local sudo=()
    [[ "$(id -u)" == 0 ]] || sudo=(sudo)
    "${sudo[@]}" apt-get install -y -qq "$package" >"$TMP/apt.log" 2>&1 ||
        { "${sudo[@]}" apt-get update -qq >>"$TMP/apt.log" 2>&1 &&
            "${sudo[@]}" apt-get install -y -qq "$package" >>"$TMP/apt.log" 2>&1; } ||
        { tail -5 "$TMP/apt.log" >&2; die "cannot install $package"; }
    command -v "$command" >/dev/null 2>&1 || die "$package installed but $command is not on PATH"
}

# Builds the release binaries unless SKIP_BUILD=1.
build() {
    if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
        note "building mppd and mpp-loadgen (release)"
        (cd "$ROOT" && cargo build --release -q --bin mppd -p mpp &&
            cargo build --release -q -p mpp-loadgen) ||
            die "cargo build failed"
    fi
    [[ -x "$LOADGEN" ]] || die "no $LOADGEN (build it or unset SKIP_BUILD)"
    [[ -x "$MPPD" ]] || die "no $MPPD (build it or unset SKIP_BUILD)"
}

# A free port on 127.0.0.1 (tcp or udp).
free_port() {
    python3 - "$1" <<'EOF'
import socket, sys
kind = socket.SOCK_STREAM if sys.argv[1] == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET, kind)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
EOF
}

# Waits up to 10 s until something listens on TCP 127.0.0.1:$1; fails if
# process $2 died first.
wait_tcp() {
    local port="$1" pid="$2" i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# Waits up to 10 s until UDP 127.0.0.1:$1 is bound by process $2.
wait_udp() {
    local port="$1" pid="$2" hex i
    hex="$(printf '%04X' "$port")"
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        if grep -q "^ *[0-9]*: 0100007F:$hex " /proc/net/udp 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# Seconds in a duration such as 10s, 2m, 1h (for run-time bounds).
secs() {
    local d="$1"
    case "$d" in
    *ms) echo 1 ;;
    *s) echo "${d%s}" ;;
    *m) echo $((${d%m} * 60)) ;;
    *h) echo $((${d%h} * 3600)) ;;
    *) echo "$d" ;;
    esac
}

# Reads a field of a report: json_field FILE EXPR (EXPR in jq syntax, e.g.
# .rate_per_s or .latency_us.p99). Prints "-" when absent.
json_field() {
    local file="$1" expr="$2"
    if command -v jq >/dev/null 2>&1; then
        jq -r "($expr) // \"-\"" "$file"
    else
        python3 - "$file" "$expr" <<'EOF'
import json, sys
v = json.load(open(sys.argv[1]))
for part in sys.argv[2].lstrip(".").split("."):
    v = v.get(part) if isinstance(v, dict) else None
print("-" if v is None else v)
EOF
    fi
}

# Runs the loadgen on LOADGEN_CPU within a time bound: run_loadgen BOUND_S
# LOG ARGS...; its table goes to stdout and LOG.
run_loadgen() {
    local bound="$1" log="$2"
    shift 2
    local rc=0
    # --foreground keeps the loadgen in our process group: Ctrl-C reaches it.
    timeout --foreground --signal=INT --kill-after=10 "$bound" \
        taskset -c "$LOADGEN_CPU" "$LOADGEN" --no-progress "$@" >"$log" 2>"$log.err" || rc=$?
    cat "$log"
    if [[ $rc != 0 ]]; then
        tail -5 "$log.err" >&2
        if [[ $rc == 124 ]]; then
            note "the loadgen did not finish within ${bound} s"
        elif [[ $rc == 130 || $rc == 143 ]]; then
            # Interrupted (Ctrl-C reaches the loadgen, not always our trap).
            note "interrupted"
            exit "$rc"
        elif [[ $rc -gt 128 ]]; then
            note "the loadgen was stopped by signal $((rc - 128))"
        fi
    fi
    return $rc
}

# One row of the summary: row NAME FILE
row() {
    local name="$1" file="$2" rate cpu
    rate="$(json_field "$file" .rate_per_s)"
    cpu="$(json_field "$file" .node_cpu)"
    python3 - "$name" "$rate" "$cpu" "$(json_field "$file" .latency_us.p50)" \
        "$(json_field "$file" .latency_us.p99)" "$(json_field "$file" .lost)" \
        "$(json_field "$file" .loadgen_cpu)" <<'EOF'
import sys
name, rate, cpu, p50, p99, lost, lcpu = sys.argv[1:]
def num(x):
    try:
        return float(x)
    except ValueError:
        return None
r, c, l = num(rate), num(cpu), num(lcpu)
per_cpu = f"{r / c:,.0f}" if r is not None and c else "-"
print(f"{name:<26} {r or 0:>14,.0f} {per_cpu:>16} {p50:>9} {p99:>9} {lost:>8} "
      f"{(c or 0) * 100:>8.0f}% {(l or 0) * 100:>8.0f}%")
EOF
}

header() {
    printf '%-26s %14s %16s %9s %9s %8s %9s %9s\n' "" "$1/s" "per node CPU-s" \
        "p50 µs" "p99 µs" "lost" "node CPU" "lg CPU"
}

# ratio OURS_FILE THEIRS_FILE BAR
ratio() {
    python3 - "$(json_field "$1" .rate_per_s)" "$(json_field "$2" .rate_per_s)" "$3" <<'EOF'
import sys
ours, theirs, bar = (float(x) for x in sys.argv[1:])
if theirs <= 0:
    print("ratio ours/theirs  - (the peer delivered nothing)")
else:
    r = ours / theirs
    print(f"ratio ours/theirs  {r:.2f}  (bar ≥ {bar:g}: {'met' if r >= bar else 'NOT met'})")
EOF
}
