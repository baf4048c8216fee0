#!/usr/bin/env bash
# On the GPU machine: the fused GEMV's tuning knobs (Q4_GEMV_DEPTH, Q4_GEMV_WARPS,
# Q4_GEMV_MIN_STEPS) on Qwen3-4B's projection shapes and the synthetic Qwen3-4B decode (nvfp4),
# every setting twice, alternating, in one device call. Settings: KNOBS="depth:warps:minsteps ...".
set -uo pipefail
. "$(dirname "$0")/env.sh"
SHAPES="6144x2560,2560x4096,19456x2560,2560x9728"
for round in 1 2; do
  for s in ${KNOBS:-2:8:4 4:8:4 2:4:4 4:4:2 3:8:2}; do
    IFS=: read -r d w m <<<"$s"
    echo "## round $round depth=$d warps=$w min_steps=$m" | tee -a "$OUT/knob_sweep.txt"
    export Q4_GEMV_DEPTH=$d Q4_GEMV_WARPS=$w Q4_GEMV_MIN_STEPS=$m
    timeout 120 "$B/q4" bench gpu-linear --shapes "$SHAPES" --formats nvfp4 --batches 1 --gemm-m 0 \
      | grep q4-nvfp4 | tee -a "$OUT/knob_sweep.txt"
    timeout 180 "$B/q4" bench decode-synthetic --formats nvfp4 2>&1 | tail -1 | tee -a "$OUT/knob_sweep.txt"
  done
done
