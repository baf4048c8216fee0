#!/usr/bin/env bash
# On the GPU machine: the fused Hopper prefill GEMM against the chunked dequantize + cuBLAS path
# in one call: `q4 bench gpu-linear` with Q4_GEMM_FUSED=0 / 1 alternating, two rounds, at each
# M in $GEMM_MS (default "512 1024 2048"), candle's cuBLAS bf16 in the same processes. Extra
# arguments go to the bench (e.g. --shapes 8192x8192).
set -uo pipefail
. "$(dirname "$0")/env.sh"
for m in ${GEMM_MS:-512 1024 2048}; do
  for round in 1 2; do
    for fused in 0 1; do
      echo "=== M=$m round $round Q4_GEMM_FUSED=$fused"
      Q4_GEMM_FUSED=$fused timeout 120 "$B/q4" bench gpu-linear --formats "${FORMATS:-nvfp4}" --batches 1 \
        --gemm-m "$m" "$@" 2>&1 | grep -E "^# q4 bench| $m "
    done
  done
done | tee "$OUT/fused_gemm_ab.txt"
