#!/usr/bin/env bash
# On the GPU machine: the fused Hopper prefill GEMM against the chunked dequantize + cuBLAS path
# (or other variants) in one call: `q4 bench gpu-linear` under each setting of $VARIANTS in turn
# (default "Q4_GEMM_FUSED=0 Q4_GEMM_FUSED=1"; a variant may join several settings with commas,
# "-" is none; Q4_BIN=path runs another q4 binary), two rounds, at each M in $GEMM_MS (default "512 1024 2048"), candle's cuBLAS
# bf16 in the same processes. Extra arguments go to the bench (e.g. --shapes 8192x8192).
set -uo pipefail
. "$(dirname "$0")/env.sh"
for m in ${GEMM_MS:-512 1024 2048}; do
  for round in 1 2; do
    for v in ${VARIANTS:-Q4_GEMM_FUSED=0 Q4_GEMM_FUSED=1}; do
      echo "=== M=$m round $round $v"
      settings=() bin="$B/q4"
      [ "$v" != "-" ] && IFS=, read -ra settings <<< "$v"
      # Q4_BIN=path (a setting like the others) runs another build of q4, e.g. a previous one.
      for s in "${settings[@]}"; do [ "${s%%=*}" = Q4_BIN ] && bin="${s#*=}"; done
      env "${settings[@]}" timeout 120 "$bin" bench gpu-linear --formats "${FORMATS:-nvfp4}" --batches 1 \
        --gemm-m "$m" "$@" 2>&1 | grep -E "^# q4 bench| $m "
    done
  done
done | tee "$OUT/fused_gemm_ab${TAG:-}.txt"
