#!/usr/bin/env bash
# Does a publish to a 100,000-device account stall the shard's other
# accounts? (issue #13 item 5) One node (`--threads 1 --cpus 0`); one loadgen
# holds 100,000 devices in one account and publishes to it every 2 s
# (`fanout --rate 0.5 --ahead 0`); a second loadgen (devices 100,000.. of
# the same space) holds 10,000 devices in 100 accounts heartbeating every
# second and reports their round-trip latency. NOBIG=1 runs the second
# alone, for comparison. Both loadgens on CPU 1.
#
#   bash tuning/runs/big-account.sh; NOBIG=1 bash tuning/runs/big-account.sh
#
# Environment: BIN=target/release, WORK=/tmp/big, BIGRATE=0.5, WAIT=12 (s
# for the big account's devices to connect first), NOBIG=.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BIN="${BIN:-$ROOT/target/release}"
WORK="${WORK:-/tmp/big}"
rm -rf "$WORK/data"
mkdir -p "$WORK/data"
source "$(dirname "$0")/lib.sh"
udp="$(free_port udp)"
http="$(free_port tcp)"
"$BIN/mppd" --threads 1 --cpus 0 --data-dir "$WORK/data" --udp "127.0.0.1:$udp" \
    --http "127.0.0.1:$http" --log-level warn >"$WORK/mppd.log" 2>&1 &
NP=$!
BIGP=""
trap 'kill $BIGP $NP 2>/dev/null || true; wait 2>/dev/null || true' EXIT
wait_healthz "$http" "$NP" || exit 1
C=(--node "127.0.0.1:$udp" --control "http://127.0.0.1:$http" --data-dir "$WORK/data" --no-progress --cpus 1)
echo "commit $(git -C "$ROOT" rev-parse --short HEAD), $(date -u +%FT%TZ); big account: ${NOBIG:+none}${NOBIG:-100,000 devices, ${BIGRATE:-0.5} publishes/s}"
if [[ -z "${NOBIG:-}" ]]; then
    "$BIN/mpp-loadgen" "${C[@]}" --devices 100000 --accounts 1 --duration 60s --warmup 1s \
        fanout --rate "${BIGRATE:-0.5}" --ahead 0 >"$WORK/big.txt" 2>&1 &
    BIGP=$!
    sleep "${WAIT:-12}"
fi
"$BIN/mpp-loadgen" "${C[@]}" --first-device 100000 --devices 10000 --accounts 100 \
    --duration 20s --warmup 2s --node-pid "$NP" hold --heartbeat 1s | grep -E "^(devices held|heartbeat round|latency|lost|node CPU)"
curl -s "http://127.0.0.1:$http/metrics" | grep -E "^mpp_publish_send_seconds_(sum|count)|^mpp_connections\{"
