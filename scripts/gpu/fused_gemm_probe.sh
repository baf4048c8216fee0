#!/usr/bin/env bash
# On the GPU machine: where the fused prefill GEMM's time goes. `q4 bench gpu-linear` at
# M = 2048 with Q4_GEMM_PROBE = 0 (normal), 2 (no decode), 3 (no wgmma), 4 (copies only),
# Q4_GEMM_STAGES 3 / 5 and the chunked path; the probes give wrong results (their rel_err says so).
set -uo pipefail
. "$(dirname "$0")/env.sh"
for v in "PROBE=0" "PROBE=2" "PROBE=3" "PROBE=4" "STAGES=3" "STAGES=5" "FUSED=0"; do
  echo "=== Q4_GEMM_$v"
  env "Q4_GEMM_$v" "$B/q4" bench gpu-linear --formats nvfp4 --batches 1 --gemm-m 2048 "$@" 2>&1 | grep " 2048 "
done | tee "$OUT/fused_gemm_probe.txt"
