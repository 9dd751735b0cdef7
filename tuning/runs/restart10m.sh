#!/bin/bash
# 10M held devices, SIGTERM + restart of the node mid-run: save/restore times, reconnects.
set -u
cd "${WORK:-/tmp/soak}"; rm -rf d10; mkdir -p out
N=${N:-10000000}
MPPD_SOCKET_BUFFER=33554432 ./mppd --threads 1 --cpus 0 --data-dir d10 --max-connections 10500000 --log-format json > out/r10-node1.log 2>&1 &
NODE=$!
for i in $(seq 1 50); do curl -sf http://127.0.0.1:15099/healthz >/dev/null && break; sleep 0.2; done
./mpp-loadgen --data-dir d10 --cpus 1 --devices $N --sockets 16 --duration ${DUR:-150s} --no-progress --json out/r10.json \
   hold --connect-rate ${CR:-50000} --window 16384 --tries 10 --timeout-ms 2000 > out/r10.txt 2>&1 &
LG=$!
# wait until all are held (connections gauge) + 40 s into the measured window
T9=$(date +%s); while :; do c=$(curl -s http://127.0.0.1:15099/metrics | awk '/^mpp_connections\{/ {s+=$2} END {print s+0}'); [ "$c" -ge "$N" ] && break; [ $(( $(date +%s)-T9 )) -gt 700 ] && break; sleep 2; done
echo "held $(date -u +%T)"; sleep ${PRE:-40}
echo "node $(grep VmRSS /proc/$NODE/status) with $(curl -s http://127.0.0.1:15099/metrics | awk '/^mpp_connections\{/ {s+=$2} END {print s+0}') connections"
T0=$(date +%s.%N)
kill -TERM $NODE; wait $NODE; T1=$(date +%s.%N)
MPPD_SOCKET_BUFFER=33554432 ./mppd --threads 1 --cpus 0 --data-dir d10 --max-connections 10500000 --log-format json > out/r10-node2.log 2>&1 &
NODE=$!
for i in $(seq 1 500); do curl -sf http://127.0.0.1:15099/healthz >/dev/null && break; sleep 0.05; done
T2=$(date +%s.%N)
# The devices are served again once every shard has restored its state.
for i in $(seq 1 1200); do grep -q '"state restored"' out/r10-node2.log && break; sleep 0.05; done
T3=$(date +%s.%N)
echo "stop took $(echo "$T1-$T0"|bc) s, start to healthz $(echo "$T2-$T1"|bc) s, SIGTERM to state restored $(echo "$T3-$T0"|bc) s"
grep -h '"state saved"\|"saved state read"\|"state restored"' out/r10-node1.log out/r10-node2.log
wait $LG
curl -s http://127.0.0.1:15099/metrics > out/r10-metrics.txt
kill -TERM $NODE; wait $NODE
echo done
