#!/bin/bash
# Fanout across the nodes of a cluster (issue #15 item 5) against the same
# fanout on one node: devices dealt to every node, each account's publishes
# entering one node (so publishes enter every node), nats-server between
# them. Per configuration (1 node, no bus; 2 nodes; 3 nodes), alternating,
# REPEAT runs each of
#   - a fixed publish rate (RATE publishes/s): publish -> device latency,
#     all deliveries and those that crossed the bus, and the CPU time per
#     publish of the nodes (the loadgen's --node-pid, all nodes summed) and
#     of nats-server (/proc, over the whole loadgen run);
#   - as fast as it goes (--rate 0 --ahead 0: each publish its own notify
#     to each device, so notifications/s = deliveries/s): throughput.
# Prints one line per run and the medians (min-max) per configuration.
#
#   mkdir -p /tmp/cluster-fanout && cp target/release/{mppd,mpp-loadgen} /tmp/cluster-fanout/
#   WORK=/tmp/cluster-fanout bash tuning/runs/cluster-fanout.sh
#
# Nothing is pinned (the machine is shared); every node has one shard.
set -u
COMMIT=$(git -C "$(dirname "$0")" rev-parse --short HEAD 2>/dev/null || echo unknown)
cd "${WORK:-/tmp/cluster-fanout}"
mkdir -p out
DEVICES=${DEVICES:-10000}
ACCOUNTS=${ACCOUNTS:-1000}
RATE=${RATE:-5000}
DUR=${DUR:-10s}
WARMUP=${WARMUP:-2s}
REPEAT=${REPEAT:-3}
SIZES=${SIZES:-"1 2 3"}
NATS_PORT=${NATS_PORT:-24222}
NATS_BIN=${NATS_BIN:-$(command -v nats-server || echo /usr/sbin/nats-server)}

# One master key and admin token for every node (the loadgen mints
# credentials and publishes with one data directory's).
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > master.key
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > admin.token

"$NATS_BIN" -a 127.0.0.1 -p "$NATS_PORT" -l out/nats.log &
NATS=$!
trap 'kill $NATS 2>/dev/null' EXIT
for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$NATS_PORT) 2>/dev/null && break; sleep 0.1; done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run K RATE TAG [FANOUT FLAGS]: K fresh nodes (a cluster when K > 1), one
# loadgen run.
run() {
    local k=$1 rate=$2 tag=$3 pids=() nodes="" controls="" i
    shift 3
    for i in $(seq 1 "$k"); do
        rm -rf "n$i"; install -d -m 700 "n$i"
        (umask 077; cp master.key admin.token "n$i/")
        local cluster=()
        [ "$k" -gt 1 ] && cluster=(--cluster "nats://127.0.0.1:$NATS_PORT" --node-id "n$i")
        ./mppd --data-dir "n$i" --udp "127.0.0.1:2710$i" --http "127.0.0.1:2720$i" \
            --threads 1 --no-pin --no-keep-state "${cluster[@]}" > "out/$tag-node$i.log" 2>&1 &
        pids+=($!)
        nodes+="${nodes:+,}127.0.0.1:2710$i"
        controls+="${controls:+,}http://127.0.0.1:2720$i"
    done
    for i in $(seq 1 "$k"); do
        for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:2720$i/healthz" >/dev/null && break; sleep 0.1; done
    done
    local n0; n0=$(cpu_ticks $NATS)
    ./mpp-loadgen --node "$nodes" --control "$controls" --data-dir n1 \
        --node-pid "$(IFS=,; echo "${pids[*]}")" --devices "$DEVICES" --accounts "$ACCOUNTS" \
        --duration "$DUR" --warmup "$WARMUP" --no-progress --json "out/$tag.json" \
        fanout --rate "$rate" "$@" > "out/$tag.txt" 2>&1 || echo "$tag: loadgen failed (out/$tag.txt)"
    local n1; n1=$(cpu_ticks $NATS)
    echo $(( n1 - n0 )) > "out/$tag.nats-ticks"
    for i in $(seq 1 "$k"); do curl -s "http://127.0.0.1:2720$i/metrics" > "out/$tag-node$i.metrics"; done
    for p in "${pids[@]}"; do kill -TERM "$p"; done
    wait "${pids[@]}" 2>/dev/null
}

echo "fanout, $DEVICES devices in $ACCOUNTS accounts; fixed rate $RATE publishes/s and --rate 0"
echo "start $(date -u +%FT%TZ), commit $COMMIT (the binaries in $PWD are the caller's)"
for r in $(seq 1 "$REPEAT"); do
    for k in $SIZES; do
        run "$k" "$RATE" "k$k-fixed-$r"
        run "$k" 0 "k$k-max-$r" --ahead 0
    done
done
echo "end $(date -u +%FT%TZ)"

HZ=$(getconf CLK_TCK) SIZES="$SIZES" REPEAT="$REPEAT" python3 - <<'EOF'
import json, os, statistics
hz = int(os.environ["HZ"])
sizes = os.environ["SIZES"].split()
repeat = int(os.environ["REPEAT"])

def load(tag):
    try:
        r = json.load(open(f"out/{tag}.json"))
    except (OSError, ValueError):
        return None
    f = r["figures"]
    lat = r.get("latency_us") or {}
    cross = r.get("cross_node_latency_us") or {}
    ticks = int(open(f"out/{tag}.nats-ticks").read())
    # The bus's trouble, summed over the nodes (docs/PROTOCOL.md §10.3).
    bus = {}
    for i in range(1, 4):
        try:
            lines = open(f"out/{tag}-node{i}.metrics").read().splitlines()
        except OSError:
            continue
        for line in lines:
            name = line.split("{")[0].split(" ")[0]
            if name in TROUBLE:
                bus[TROUBLE[name]] = bus.get(TROUBLE[name], 0) + int(float(line.rsplit(" ", 1)[1]))
    pub = f["published"]
    return {
        "pub/s": f["publishes_per_s"],
        "notif/s": r["rate_per_s"],
        "p50": lat.get("p50"),
        "p99": lat.get("p99"),
        "x p50": cross.get("p50"),
        "x p99": cross.get("p99"),
        "node µs/pub": f.get("node_cpu_us_per_publish"),
        # Only a cluster has a bus (nats-server idles beside one node).
        "nats µs/pub": round(ticks / hz * 1e6 / pub, 1) if pub and not tag.startswith("k1-") else None,
        "lost": r["lost"],
        "wrong": r["wrong"],
        "bus": " ".join(f"{k} {v}" for k, v in bus.items() if v) or None,
    }

TROUBLE = {
    "mpp_cluster_received_dropped_total": "dropped",
    "mpp_cluster_disconnects_total": "disconnects",
    "mpp_cluster_publish_retries_total": "retries",
    "mpp_cluster_publish_failed_total": "failed",
    "mpp_cluster_gap_resyncs_total": "gap-resyncs",
}

def num(x):
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:g}"

def show(rows, keys):
    for tag, v in rows:
        print(f"{tag:<12}", "  ".join(f"{k} {num(v[k])}" for k in keys))

fixed = ["p50", "p99", "x p50", "x p99", "node µs/pub", "nats µs/pub", "lost", "wrong", "bus"]
most = ["pub/s", "notif/s", "p50", "p99", "x p50", "x p99", "node µs/pub", "nats µs/pub", "lost", "wrong", "bus"]
print("runs:")
for kind, keys in (("fixed", fixed), ("max", most)):
    for r in range(1, repeat + 1):
        show([(f"k{k}-{kind}-{r}", v) for k in sizes if (v := load(f"k{k}-{kind}-{r}"))], keys)
print("medians (min-max) of", repeat, "runs:")
for kind, keys in (("fixed", fixed), ("max", most)):
    for k in sizes:
        runs = [v for r in range(1, repeat + 1) if (v := load(f"k{k}-{kind}-{r}"))]
        cells = []
        for key in keys:
            xs = [x[key] for x in runs if x[key] is not None]
            if not xs or key == "bus":
                continue
            cells.append(f"{key} {num(statistics.median(xs))} ({num(min(xs))}-{num(max(xs))})")
        print(f"{k} node{'s' if k != '1' else ''} {kind}:", "  ".join(cells))
EOF
