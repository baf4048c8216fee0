#!/usr/bin/env bash
# On the GPU machine: Nsight Compute sections (speed of light, compute and memory workload,
# scheduler and warp-state statistics) of one fused prefill GEMM launch (8192x8192 NVFP4,
# M = 2048) and of cuBLAS's bf16 GEMM at the same shape in the same bench run.
set -uo pipefail
. "$(dirname "$0")/env.sh"
S="--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats --section LaunchStats --section Occupancy"
for k in "gemm_sm90" "regex:nvjet|xmma|cutlass|sm90"; do
  echo "#### $k" | tee -a "$OUT/ncu_gemm.txt"
  env "$@" timeout 240 ncu --kernel-name "$k" --launch-skip 2 --launch-count "$([ "$k" = gemm_sm90 ] && echo 1 || echo 4)" $S \
    "$B/q4" bench gpu-linear --shapes 8192x8192 --formats nvfp4 --batches 1 --gemm-m 2048 --calls 2 2>&1 \
    | grep -vE "^(==PROF==|#|shape|8192)" | grep -vE "^\s*$" | tee -a "$OUT/ncu_gemm.txt"
done
