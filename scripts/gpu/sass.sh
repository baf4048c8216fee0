#!/usr/bin/env bash
# SASS of the GEMV variants one bench call compiles (needs cuobjdump on the GPU machine).
. "$(dirname "$0")/env.sh"
for v in ${VARIANTS:--}; do
  e=(); [ "$v" != - ] && e=("$v")
  d=$OUT/dump-${v//[^A-Za-z0-9]/_}
  env "${e[@]}" Q4_CUDA_DUMP_DIR=$d "$B/q4" bench gpu-linear --shapes 8192x8192 --formats nvfp4 --batches 1 --gemm-m 0 --calls 2 >/dev/null 2>&1
  for c in $d/gemv-*.cubin; do cuobjdump -sass "$c" > "${c%.cubin}.sass" 2>&1 || nvdisasm "$c" > "${c%.cubin}.sass" 2>&1; rm -f "$c"; done
  rm -f $d/*.cu
done
ls -la $OUT/dump-*
