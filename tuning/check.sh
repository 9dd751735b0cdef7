#!/usr/bin/env bash
# Compares this host's settings with what mppd and mpp-loadgen want.
#
#   tuning/check.sh                 print the table (exit 0)
#   tuning/check.sh --strict        exit 1 when any row is LOW
#   sudo tuning/check.sh --apply    raise the LOW sysctls with `sysctl -w`
#                                   (exit 1 if not root or a write fails)
#   tuning/check.sh --devices N     size the memory check for N devices (default 10M)
#
# Status: OK, LOW (below or other than the recommendation), n/a (the host does
# not have or does not show the setting), info (reported, nothing to meet).
# Only coreutils and procps; reads /proc and /sys, never lowers a setting.
set -euo pipefail

usage() {
    sed -n '2,12s/^# \{0,1\}//p' "$0"
}

APPLY=0
STRICT=0
DEVICES=10000000
while [ $# -gt 0 ]; do
    case "$1" in
        --apply) APPLY=1 ;;
        --strict) STRICT=1 ;;
        --devices)
            [ $# -ge 2 ] || { echo "check.sh: --devices needs a number" >&2; exit 2; }
            DEVICES=$2
            shift
            ;;
        --devices=*) DEVICES=${1#--devices=} ;;
        -h | --help) usage; exit 0 ;;
        *) echo "check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
case "$DEVICES" in
    '' | *[!0-9]*) echo "check.sh: --devices wants a whole number, got '$DEVICES'" >&2; exit 2 ;;
esac

# Bytes per device (the node's bar in docs/BENCHMARKS.md; the loadgen's
# compact device record, sockets' share and histograms).
NODE_BYTES_PER_DEVICE=100
LOADGEN_BYTES_PER_DEVICE=600

LOW_COUNT=0
NOFILE_LOW=0
# sysctl names and values `--apply` would write, in order.
APPLY_KEYS=()
APPLY_VALUES=()

FMT='%-30s %-22s %-24s %-6s %s'
row() { # setting host recommended status note
    local line
    # shellcheck disable=SC2059 # FMT is ours
    printf -v line "$FMT" "$1" "$2" "$3" "$4" "${5:-}"
    printf '%s\n' "${line%"${line##*[! ]}"}"
    if [ "$4" = LOW ]; then
        LOW_COUNT=$((LOW_COUNT + 1))
    fi
}

# The value of sysctl $1 with whitespace squeezed, or nothing when the host
# does not have it (or does not let us read it).
sysctl_get() {
    local file="/proc/sys/${1//.//}"
    if [ -r "$file" ]; then
        tr -s ' \t' '  ' <"$file" 2>/dev/null | head -n 1 || true
    fi
}

# A number of bytes as a short human figure (powers of 1024).
human() {
    local n=$1
    if [ "$n" -ge $((1 << 30)) ]; then
        printf '%d.%d GiB' $((n >> 30)) $(((n % (1 << 30)) * 10 >> 30))
    elif [ "$n" -ge $((1 << 20)) ]; then
        printf '%d MiB' $((n >> 20))
    elif [ "$n" -ge 1024 ]; then
        printf '%d KiB' $((n >> 10))
    else
        printf '%d B' "$n"
    fi
}

is_number() {
    case "$1" in '' | *[!0-9]*) return 1 ;; *) return 0 ;; esac
}

# A sysctl that should be at least $2 (every field, for multi-field ones such
# as udp_mem). Queues it for --apply when LOW.
check_min() { # key recommended note
    local key=$1 want=$2 note=${3:-} have status=OK
    have=$(sysctl_get "$key")
    if [ -z "$have" ]; then
        row "$key" "n/a" ">= $want" "n/a" "$note"
        return
    fi
    local -a h w
    read -r -a h <<<"$have"
    read -r -a w <<<"$want"
    local i out=()
    for i in "${!w[@]}"; do
        local hv=${h[$i]:-0}
        if ! is_number "$hv"; then
            status=info
            break
        fi
        if [ "$hv" -lt "${w[$i]}" ]; then
            status=LOW
            out+=("${w[$i]}")
        else
            out+=("$hv")
        fi
    done
    row "$key" "$have" ">= $want" "$status" "$note"
    if [ "$status" = LOW ]; then
        APPLY_KEYS+=("$key")
        APPLY_VALUES+=("${out[*]}")
    fi
}

# A ulimit (soft and hard) that should be at least $3 (or unlimited).
check_ulimit() { # label flag recommended unit note
    local label=$1 flag=$2 want=$3 unit=$4 note=$5 soft hard status=OK shown
    soft=$(ulimit -S "$flag" 2>/dev/null || echo "?")
    hard=$(ulimit -H "$flag" 2>/dev/null || echo "?")
    local v
    for v in "$soft" "$hard"; do
        if [ "$v" = unlimited ]; then
            continue
        elif ! is_number "$v"; then
            status=n/a
        elif [ "$v" -lt "$want" ]; then
            status=LOW
        fi
    done
    shown="$soft / $hard"
    row "$label" "$shown" ">= $want$unit" "$status" "$note"
    if [ "$flag" = -n ] && [ "$status" = LOW ]; then
        NOFILE_LOW=1
    fi
}

kernel_at_least() { # major minor
    local rel major minor
    rel=$(uname -r)
    major=${rel%%.*}
    minor=${rel#*.}
    minor=${minor%%[!0-9]*}
    is_number "$major" && is_number "$minor" || return 1
    [ "$major" -gt "$1" ] || { [ "$major" -eq "$1" ] && [ "$minor" -ge "$2" ]; }
}

CPUS=$(nproc --all 2>/dev/null || getconf _NPROCESSORS_ONLN)
ONLINE=$(nproc 2>/dev/null || echo "$CPUS")
echo "mppd host check: $(uname -n), Linux $(uname -r), $ONLINE usable CPU(s), running as $(id -un) (uid $(id -u))"
echo
row setting host recommended status note
row "-------" "----" "-----------" "------" "----"

echo "# socket buffers and queues (mppd and mpp-loadgen alike)"
check_min net.core.rmem_max 16777216 "cap on SO_RCVBUF; both ask 8 MiB (root forces it)"
check_min net.core.wmem_max 16777216 "cap on SO_SNDBUF; same"
check_min net.core.rmem_default 1048576 "sockets that ask for no size"
check_min net.core.wmem_default 1048576 "same, send side"
check_min net.core.netdev_max_backlog 16384 "per-CPU queue; loopback goes through it too"
check_min net.ipv4.udp_mem "65536 131072 262144" "pages: min pressure max, all UDP sockets"
check_min net.ipv4.udp_rmem_min 4096 "per-socket floor under memory pressure"
check_min net.ipv4.udp_wmem_min 4096 "same, send side"

echo "# descriptors, mappings, locked memory"
check_ulimit "ulimit -n (soft / hard)" -n 1048576 "" "loadgen: --sockets, mqtt subscribers; raise soft up to hard"
check_min fs.nr_open 1048576 "ceiling for ulimit -n"
check_min fs.file-max 1048576 "system-wide open files"
check_ulimit "ulimit -l (soft / hard)" -l 8192 " KiB" "io_uring rings on kernels < 5.12; root ignores it"
check_min vm.max_map_count 65530 "mappings per process (allocator segments)"
range=$(sysctl_get net.ipv4.ip_local_port_range)
if [ -n "$range" ]; then
    read -r lo hi <<<"$range"
    row net.ipv4.ip_local_port_range "$range" "-" info "$((hi - lo + 1)) ephemeral ports for loadgen sockets"
else
    row net.ipv4.ip_local_port_range "n/a" "-" n/a
fi

echo "# io_uring"
if kernel_at_least 6 0; then
    row "kernel" "$(uname -r)" ">= 6.0" OK "multishot recvmsg (--io uring)"
else
    row "kernel" "$(uname -r)" ">= 6.0" LOW "--io auto falls back to mmsg"
fi
disabled=$(sysctl_get kernel.io_uring_disabled)
if [ -z "$disabled" ]; then
    row kernel.io_uring_disabled "n/a" "0" n/a "(kernel < 6.6: io_uring always on)"
elif [ "$disabled" = 0 ]; then
    row kernel.io_uring_disabled "$disabled" "0" OK
else
    row kernel.io_uring_disabled "$disabled" "0" LOW "1: only kernel.io_uring_group; 2: off (mmsg)"
    APPLY_KEYS+=(kernel.io_uring_disabled)
    APPLY_VALUES+=(0)
fi

echo "# CPUs"
if [ "$ONLINE" -ge 2 ]; then
    row "CPUs" "$ONLINE" ">= 2" OK "node and loadgen on their own cores"
else
    row "CPUs" "$ONLINE" ">= 2" LOW "node and loadgen will share a core"
fi
governors=""
for g in /sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor; do
    [ -r "$g" ] || continue
    governors+="$(cat "$g" 2>/dev/null || true) "
done
if [ -z "$governors" ]; then
    row "scaling_governor" "n/a" "performance" n/a "no cpufreq (VM or fixed clock)"
else
    distinct=$(tr ' ' '\n' <<<"$governors" | sed '/^$/d' | sort -u | tr '\n' ' ')
    distinct=${distinct% }
    if [ "$distinct" = performance ]; then
        row "scaling_governor" "$distinct" "performance" OK
    else
        row "scaling_governor" "$distinct" "performance" LOW "cpupower frequency-set -g performance"
    fi
fi
thp=/sys/kernel/mm/transparent_hugepage/enabled
if [ -r "$thp" ]; then
    mode=$(sed -n 's/.*\[\(.*\)\].*/\1/p' "$thp")
    row "transparent_hugepage" "${mode:-?}" "madvise" info "always: fewer TLB misses, RSS rounded up"
else
    row "transparent_hugepage" "n/a" "madvise" n/a
fi
irq="not running"
for comm in /proc/[0-9]*/comm; do
    if [ "$(cat "$comm" 2>/dev/null || true)" = irqbalance ]; then
        irq="running"
        break
    fi
done
row "irqbalance" "$irq" "-" info "NICs only: keep IRQs off the shards' cores"

echo "# memory for $DEVICES devices"
node_need=$((DEVICES * NODE_BYTES_PER_DEVICE))
lg_need=$((DEVICES * LOADGEN_BYTES_PER_DEVICE))
avail_kib=$(sed -n 's/^MemAvailable: *\([0-9]*\) kB$/\1/p' /proc/meminfo)
row "node (${NODE_BYTES_PER_DEVICE} B/device)" "-" "$(human "$node_need")" info
row "loadgen (${LOADGEN_BYTES_PER_DEVICE} B/device)" "-" "$(human "$lg_need")" info
if is_number "${avail_kib:-}"; then
    avail=$((avail_kib * 1024))
    total=$((node_need + lg_need))
    if [ "$avail" -ge "$total" ]; then
        row "MemAvailable" "$(human "$avail")" ">= $(human "$total")" OK "node + loadgen on this host"
    elif [ "$avail" -ge "$node_need" ]; then
        row "MemAvailable" "$(human "$avail")" ">= $(human "$total")" LOW "enough for the node alone"
    else
        row "MemAvailable" "$(human "$avail")" ">= $(human "$total")" LOW "not even for the node"
    fi
else
    row "MemAvailable" "n/a" ">= $(human $((node_need + lg_need)))" n/a
fi

echo
if [ "$LOW_COUNT" -eq 0 ]; then
    echo "All checked settings meet the recommendations."
else
    echo "$LOW_COUNT setting(s) LOW."
    if [ "${#APPLY_KEYS[@]}" -gt 0 ] && [ "$APPLY" -eq 0 ]; then
        echo "Sysctls: sudo $0 --apply (not persistent; see tuning/README.md)"
    fi
    if [ "$NOFILE_LOW" -eq 1 ]; then
        echo "nofile: ulimit -n 1048576 in the shell that starts the loadgen (hard limit: /etc/security/limits.conf or LimitNOFILE=)."
    fi
fi

if [ "$APPLY" -eq 1 ]; then
    echo
    if [ "${#APPLY_KEYS[@]}" -eq 0 ]; then
        echo "--apply: no sysctl to change."
    elif [ "$(id -u)" -ne 0 ]; then
        echo "--apply: needs root (sudo $0 --apply); nothing changed." >&2
        exit 1
    else
        failed=0
        for i in "${!APPLY_KEYS[@]}"; do
            key=${APPLY_KEYS[$i]}
            value=${APPLY_VALUES[$i]}
            before=$(sysctl_get "$key")
            if sysctl -q -w "$key=$value" >/dev/null 2>&1; then
                echo "--apply: $key: $before -> $(sysctl_get "$key")"
            else
                echo "--apply: $key: could not set $value (read-only here?), still $before" >&2
                failed=1
            fi
        done
        if [ "$failed" -ne 0 ]; then
            exit 1
        fi
        echo "--apply: done. To keep these across reboots, put key = value lines in /etc/sysctl.d/90-mppd.conf."
    fi
fi

if [ "$STRICT" -eq 1 ] && [ "$LOW_COUNT" -gt 0 ]; then
    exit 1
fi
exit 0
