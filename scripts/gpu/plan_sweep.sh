#!/usr/bin/env bash
# On the GPU machine: the fused GEMV under forced plans — split-K slices (Q4_GEMV_SPLIT) summed
# across blocks or inside them (Q4_GEMV_WSPLIT), block size (Q4_GEMV_WARPS) — against the plan
# it makes itself, on Qwen3-4B's decode shapes (fused q/k/v, o, fused gate/up, down, LM head):
# the grid of these settings run by knob_grid.sh (output in $OUT/knob_grid.txt, the plan's own
# choices in $OUT/grid_plans.txt). Finds shapes where the plan leaves time on the table.
# SPLITS, WARPS_SET, BATCHES, FORMATS and SHAPES override.
set -uo pipefail
grid=""
for w in ${WARPS_SET:-default 4 8}; do
  for s in ${SPLITS:-1 2 4 8 16 32}; do
    for ws in 0 1; do
      g="Q4_GEMV_SPLIT=$s,Q4_GEMV_WSPLIT=$ws,Q4_GEMV_SPLIT_BALANCE=0"
      [ "$w" = default ] || g="Q4_GEMV_WARPS=$w,$g"
      grid="$grid $g"
    done
  done
done
SHAPES="${SHAPES:-6144x2560,2560x4096,19456x2560,2560x9728,151936x2560}"
ARGS="--shapes $SHAPES --formats ${FORMATS:-nvfp4,nf4} --batches ${BATCHES:-1} --gemm-m 0 --calls 10" \
  GRID="$grid" GRID_FILE="" exec bash "$(dirname "$0")/knob_grid.sh"
