#!/usr/bin/env bash
# On the GPU machine: q4 doctor, then every CUDA test in its own process (a kernel fault cannot
# poison the others' CUDA context). Logs to $OUT; a summary line per test on stdout.
set -uo pipefail
cd "$(dirname "$0")/../.."
. scripts/gpu/env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
"$B/q4" doctor | tee "$OUT/doctor.txt"
"$B/q4" doctor --json > "$OUT/doctor.json"
fails=0
for t in $("$B/cuda_kernels" --list 2>/dev/null | sed -n 's/: test$//p'); do
  start=$(date +%s.%N)
  if timeout "${TEST_TIMEOUT:-240}" "$B/cuda_kernels" "$t" --exact --nocapture >"$OUT/test_$t.log" 2>&1; then r=ok; else r=FAIL; fails=$((fails+1)); fi
  printf '%-55s %s %6.1fs\n' "$t" "$r" "$(echo "$(date +%s.%N) - $start" | bc)" | tee -a "$OUT/tests_summary.txt"
  [ "$r" = FAIL ] && tail -15 "$OUT/test_$t.log"
done
echo "failed tests: $fails"
