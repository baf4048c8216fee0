#!/usr/bin/env bash
# On the GPU machine: the prefill GEMM (m = 2048) with its decoded chunk kept in an L2 set-aside
# (`Q4_GEMM_L2_MIB`, access-policy window over the reused chunk buffer) at several chunk heights
# (`Q4_GEMM_CHUNK_ROWS`), against the default (no window, 128 MB chunks), alternating, ROUNDS
# rounds, one device call. Prints the m = 2048 rows of `q4 bench gpu-linear` (cuBLAS bf16 in the
# same process).
set -uo pipefail
. "$(dirname "$0")/env.sh"
F="$OUT/l2_sweep.txt"
run() { # label, env...
  local label="$1"; shift
  echo "## $label" | tee -a "$F"
  env "$@" timeout 120 "$B/q4" bench gpu-linear --shapes "${SHAPES:-8192x8192,28672x4096}" \
    --formats "${FORMATS:-nvfp4}" --batches 1 --calls 10 2>&1 | grep -E "2048|GB/s|L2 window|rror" | tee -a "$F"
}
for round in $(seq 1 "${ROUNDS:-2}"); do
  run "round $round default" Q4_X=0
  for rows in ${ROWS:-1024 2048 4096}; do
    run "round $round rows=$rows no window" Q4_GEMM_CHUNK_ROWS=$rows
    run "round $round rows=$rows L2 ${MIB:-48} MiB" Q4_GEMM_CHUNK_ROWS=$rows Q4_GEMM_L2_MIB=${MIB:-48} RUST_LOG=q4=info
  done
done
