#!/bin/bash
# 1M held devices, kill -9 of the node, immediate restart: time until all are back, socket drops.
set -u
cd "${WORK:-/tmp/soak}"; rm -rf d1; mkdir -p out
N=${N:-1000000}
./mppd --threads 1 --cpus 0 --data-dir d1 --log-format json > out/c1-node1.log 2>&1 &
NODE=$!
for i in $(seq 1 50); do curl -sf http://127.0.0.1:15099/healthz >/dev/null && break; sleep 0.2; done
./mpp-loadgen --data-dir d1 --cpus 1 --devices $N --duration ${DUR:-120s} --no-progress --json out/c1.json \
   hold --heartbeat 20s --window 16384 --connect-rate 50000 > out/c1.txt 2>&1 &
LG=$!
T9=$(date +%s); while :; do c=$(curl -s http://127.0.0.1:15099/metrics | awk '/^mpp_connections\{/ {s+=$2} END {print s+0}'); [ "$c" -ge "$N" ] && break; [ $(( $(date +%s)-T9 )) -gt 600 ] && break; sleep 1; done
echo "held $(date -u +%T)"; sleep ${PRE:-30}
echo "kill -9 at $(date -u +%T.%N)"
kill -KILL $NODE; wait $NODE 2>/dev/null
./mppd --threads 1 --cpus 0 --data-dir d1 --log-format json > out/c1-node2.log 2>&1 &
NODE=$!
T0=$(date +%s)
while :; do c=$(curl -s http://127.0.0.1:15099/metrics | awk '/^mpp_connections\{/ {s+=$2} END {print s+0}'); echo "$(( $(date +%s)-T0 )) s: $c"; [ "$c" -ge "$N" ] && break; [ $(( $(date +%s)-T0 )) -gt 200 ] && break; sleep 1; done > out/c1-back.log
echo "all back after $(tail -1 out/c1-back.log)"
wait $LG
curl -s http://127.0.0.1:15099/metrics > out/c1-metrics.txt
kill -TERM $NODE; wait $NODE
echo done
