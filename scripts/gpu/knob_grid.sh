#!/usr/bin/env bash
# On the GPU machine: `q4 bench gpu-linear` under every setting of a grid of GEMV knobs, one
# process each, against the plan's own choice (run first and last), with the plan's choices
# logged (Q4_LOG=q4=trace). GRID: space-separated settings, each a comma-separated list of
# env assignments (e.g. "Q4_GEMV_SPLIT=4,Q4_GEMV_XSTAGE=0 Q4_GEMV_MT=1"), or GRID_FILE, one
# setting a line (scripts/gpu/grids/); ARGS: the bench's
# arguments. Output: $OUT/knob_grid.txt ("== setting" then the q4 rows), $OUT/grid_plans.txt.
set -uo pipefail
. "$(dirname "$0")/env.sh"
ARGS="${ARGS:---shapes 8192x8192,28672x4096 --formats nvfp4,nf4 --batches 16 --gemm-m 0 --calls 10}"
run() { # label, env assignments (comma-separated)
  echo "== $1" >> "$OUT/knob_grid.txt"
  env ${2//,/ } timeout 90 "$B/q4" bench gpu-linear $ARGS 2>/dev/null | grep " q4-" >> "$OUT/knob_grid.txt"
}
Q4_LOG=q4=trace timeout 90 "$B/q4" bench gpu-linear $ARGS 2>&1 >/dev/null | grep "gemv plan" \
  | sed 's/\x1b\[[0-9;]*m//g; s/.*gemv plan//' | sort | uniq -c > "$OUT/grid_plans.txt"
run plan Q4_NOTHING=1
[ -n "${GRID_FILE:-}" ] && GRID="$(cat "$GRID_FILE")"
for g in ${GRID:?set GRID or GRID_FILE}; do run "$g" "$g"; done
run "plan again" Q4_NOTHING=1
