#!/bin/bash
# 30-minute soak: 1M devices, steady publishes, churn; RSS sampled every 30 s.
set -u
cd "${WORK:-/tmp/soak}"
rm -rf data; mkdir -p out
ulimit -n 1048576
./mppd --data-dir data > out/node.log 2>&1 &
NODE=$!
for i in $(seq 1 50); do [ -f data/admin.token ] && curl -sf http://127.0.0.1:15099/metrics >/dev/null && break; sleep 0.2; done
echo "node pid $NODE"
( while kill -0 $NODE 2>/dev/null; do echo "$(date -u +%T) $(grep VmRSS /proc/$NODE/status | awk '{print $2}')"; sleep 30; done ) > out/rss.log &
RSSLOOP=$!
./mpp-loadgen --data-dir data --devices 1000000 --accounts 100000 --duration 30m --node-pid $NODE --no-progress --json out/fanout.json fanout --rate 1000 > out/fanout.txt 2>&1 &
FAN=$!
sleep 60
./mpp-loadgen --data-dir data --devices 20000 --duration 28m --no-progress --json out/churn.json churn --rate 200 --rebind-rate 200 > out/churn.txt 2>&1 &
CHURN=$!
wait $FAN; wait $CHURN
curl -s http://127.0.0.1:15099/metrics > out/metrics.txt
kill -TERM $NODE; wait $NODE; kill $RSSLOOP
echo done
