#!/bin/bash
# One line per target from logs/: wall time, executions, coverage, corpus, crashes.
cd "$(dirname "$0")"
printf "| target | wall time | executions | exec/s (mean) | cov (edges) | ft (features) | corpus (files, size) | crashes/timeouts/ooms |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n"
for t in ${*:-jsonb_decode packet_open stun aes_gcm_diff state_file http_bodies reassembler}; do
  [ -f logs/$t.log ] || continue
  last=$(grep -E '^#[0-9]+: cov:' logs/$t.log | tail -1)
  [ -n "$last" ] || continue
  runs=$(echo "$last" | sed -E 's/^#([0-9]+):.*/\1/')
  cov=$(echo "$last" | sed -E 's/.* cov: ([0-9]+) .*/\1/')
  ft=$(echo "$last" | sed -E 's/.* ft: ([0-9]+) .*/\1/')
  secs=$(echo "$last" | sed -E 's/.* time: ([0-9]+)s.*/\1/')
  oct=$(echo "$last" | sed -E 's/.*oom\/timeout\/crash: ([0-9]+)\/([0-9]+)\/([0-9]+).*/\3\/\2\/\1/')
  files=$(echo "$last" | sed -E "s/.* corp: ([0-9]+) .*/\1/"); size=$(du -sh --apparent-size corpus/$t | cut -f1)
  printf "| \`%s\` | %d min %02d s | %s | %d | %s | %s | %s, %s | %s |\n" $t $((secs/60)) $((secs%60)) $runs $((runs/(secs>0?secs:1))) $cov $ft $files $size $oct
done
