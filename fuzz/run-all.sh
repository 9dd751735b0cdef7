#!/bin/bash
# Runs each target in turn, niced, for SECS seconds (default 1200), in fork
# mode so that a crash is saved to artifacts/<target>/ and fuzzing goes on.
# Usage: fuzz/run-all.sh [SECS] [target...]   (from anywhere)
set -u
cd "$(dirname "$0")"
secs=${1:-1200}; shift || true
targets=${*:-jsonb_decode packet_open stun aes_gcm_diff state_file http_bodies reassembler}
mkdir -p logs bin
for t in $targets; do
  mkdir -p corpus/$t artifacts/$t
  cp target/x86_64-unknown-linux-gnu/release/$t bin/$t
  echo "$t start $(date -u +%FT%TZ)" >> logs/queue.log
  nice -n 19 bin/$t corpus/$t -max_total_time=$secs -fork=1 -ignore_crashes=1 \
    -ignore_timeouts=1 -ignore_ooms=1 -timeout=10 -artifact_prefix=artifacts/$t/ \
    -print_final_stats=1 > logs/$t.log 2>&1
  echo "$t end $(date -u +%FT%TZ) rc=$?" >> logs/queue.log
done
