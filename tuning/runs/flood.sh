#!/bin/bash
# 100k hostile packets/s from the devices' address, against none: hold and fanout.
set -u
cd "${WORK:-/tmp/soak}"; rm -rf df; mkdir -p out
./mppd --data-dir df > out/f-node.log 2>&1 &
NODE=$!
for i in $(seq 1 50); do curl -sf http://127.0.0.1:15099/healthz >/dev/null && break; sleep 0.2; done
for h in 0 100000; do
  ./mpp-loadgen --data-dir df --duration 20s --node-pid $NODE --no-progress --json out/f-hold-$h.json --hostile $h hold --heartbeat 5s > out/f-hold-$h.txt 2>&1
  ./mpp-loadgen --data-dir df --duration 20s --node-pid $NODE --no-progress --json out/f-fan-$h.json --hostile $h fanout > out/f-fan-$h.txt 2>&1
done
curl -s http://127.0.0.1:15099/metrics > out/f-metrics.txt
kill -TERM $NODE; wait $NODE
echo done
