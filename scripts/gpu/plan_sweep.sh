#!/usr/bin/env bash
# On the GPU machine: the fused GEMV under forced plans — split-K slices (Q4_GEMV_SPLIT) summed
# across blocks or inside them (Q4_GEMV_WSPLIT), block size (Q4_GEMV_WARPS) — against the plan
# it makes itself, on Qwen3-4B's decode shapes (fused q/k/v, o, fused gate/up, down, LM head),
# one process per setting, the plan's own choices logged (Q4_LOG=q4=trace). Finds shapes where
# the plan leaves time on the table. SPLITS, WARPS_SET, BATCHES, FORMATS and SHAPES override.
set -uo pipefail
. "$(dirname "$0")/env.sh"
SHAPES="${SHAPES:-6144x2560,2560x4096,19456x2560,2560x9728,151936x2560}"
ARGS="--shapes $SHAPES --formats ${FORMATS:-nvfp4,nf4} --batches ${BATCHES:-1} --gemm-m 0 --calls 10"
run() { # label, env assignments...
  local label="$1"; shift
  echo "== $label" >> "$OUT/plan_sweep.txt"
  env "$@" timeout 90 "$B/q4" bench gpu-linear $ARGS 2>/dev/null | grep " q4-" >> "$OUT/plan_sweep.txt"
}
Q4_LOG=q4=trace timeout 90 "$B/q4" bench gpu-linear $ARGS 2>&1 >/dev/null | grep "gemv plan" \
  | sed 's/\x1b\[[0-9;]*m//g; s/.*gemv plan//' | sort | uniq -c > "$OUT/plans.txt"
run plan Q4_NOTHING=1
for w in ${WARPS_SET:-default 4 8}; do
  for s in ${SPLITS:-1 2 4 8 16 32}; do
    for ws in 0 1; do
      if [ "$w" = default ]; then run "split=$s wsplit=$ws" Q4_GEMV_SPLIT=$s Q4_GEMV_WSPLIT=$ws Q4_GEMV_SPLIT_BALANCE=0
      else run "warps=$w split=$s wsplit=$ws" Q4_GEMV_WARPS=$w Q4_GEMV_SPLIT=$s Q4_GEMV_WSPLIT=$ws Q4_GEMV_SPLIT_BALANCE=0; fi
    done
  done
done
run "plan again" Q4_NOTHING=1
