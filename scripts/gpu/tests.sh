#!/usr/bin/env bash
# On the GPU machine: q4 doctor, then every CUDA test in its own process (a kernel fault cannot
# poison the others' CUDA context). Full logs in $OUT/tests.log, one summary line per test.
# TESTS=regex runs a subset.
set -uo pipefail
. "$(dirname "$0")/env.sh"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; "$B/q4" doctor; } | tee "$OUT/doctor.txt"
"$B/q4" doctor --json > "$OUT/doctor.json"
fails=0
: > "$OUT/tests.log"
for exe in cuda_kernels cuda_early_start cuda_decode; do
for t in $("$B/$exe" --list 2>/dev/null | sed -n 's/: test$//p'); do
  if [ -n "${TESTS:-}" ] && ! echo "$t" | grep -qE "$TESTS"; then continue; fi
  start=$(date +%s%N)
  if timeout "${TEST_TIMEOUT:-240}" "$B/$exe" "$t" --exact --nocapture >/tmp/q4/test.log 2>&1; then r=ok; else r=FAIL; fails=$((fails+1)); fi
  grep -q "^skipped" /tmp/q4/test.log && r="$r(skipped)"
  { echo "=== $t: $r"; cat /tmp/q4/test.log; } >> "$OUT/tests.log"
  printf '%-55s %-12s %6d ms\n' "$t" "$r" $(( ($(date +%s%N) - start) / 1000000 ))
  [ "${r%%(*}" = FAIL ] && tail -15 /tmp/q4/test.log
done
done
grep -h "device memory" "$OUT/tests.log" || true
echo "failed tests: $fails"
