#!/usr/bin/env bash
# On the GPU machine: the fused GEMV's split-K threshold (`Q4_GEMV_MIN_STEPS`, fewest 128-wide K
# steps per slice) on Qwen3-4B's projection shapes (fused q/k/v 6144x2560, o 2560x4096, fused
# gate/up 19456x2560, down 2560x9728) and the synthetic Qwen3-4B decode, alternating settings,
# two rounds, one device call.
set -uo pipefail
. "$(dirname "$0")/env.sh"
SHAPES="6144x2560,2560x4096,19456x2560,2560x9728"
echo "## bf16 reference" | tee -a "$OUT/split_sweep.txt"
timeout 180 "$B/q4" bench decode-synthetic --formats bf16 2>&1 | tail -3 | tee -a "$OUT/split_sweep.txt"
for round in 1 2; do
  for m in ${SWEEP:-4 2 1}; do
    echo "## round $round Q4_GEMV_MIN_STEPS=$m" | tee -a "$OUT/split_sweep.txt"
    Q4_GEMV_MIN_STEPS=$m timeout 120 "$B/q4" bench gpu-linear --shapes "$SHAPES" --formats nvfp4 \
      --batches 1 --gemm-m 0 | tee -a "$OUT/split_sweep.txt"
    Q4_GEMV_MIN_STEPS=$m timeout 180 "$B/q4" bench decode-synthetic --formats nvfp4 2>&1 \
      | tail -3 | tee -a "$OUT/split_sweep.txt"
  done
done
