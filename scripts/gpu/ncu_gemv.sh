#!/usr/bin/env bash
# On the GPU machine: Nsight Compute metrics of one fused GEMV launch (8192x8192 NVFP4, batch
# $BATCH, default 1) under each env setting in $VARIANTS (`-` for none): duration, DRAM and
# L1TEX/LSU/shared-memory pipe use, instruction count, occupancy and the warp-stall breakdown.
# SHAPE (8192x8192), FORMAT (nvfp4) and KERNEL (gemv) pick the launch; METRICS_EXTRA adds metrics.
set -uo pipefail
. "$(dirname "$0")/env.sh"
M="gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum"
M="$M,l1tex__throughput.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum"
M="$M,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum"
M="$M,smsp__inst_executed.sum,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread"
M="$M,smsp__issue_active.avg.pct_of_peak_sustained_active"
M="$M,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
[ -n "${METRICS_EXTRA:-}" ] && M="$M,$METRICS_EXTRA"
for v in ${VARIANTS:--}; do
  echo "## $v" | tee -a "$OUT/ncu_gemv.txt"
  e=(); [ "$v" != - ] && e=("$v")
  env "${e[@]}" timeout 200 ncu --kernel-name "${KERNEL:-gemv}" --launch-skip 3 --launch-count 1 --metrics "$M" \
    "$B/q4" bench gpu-linear --shapes "${SHAPE:-8192x8192}" --formats "${FORMAT:-nvfp4}" --batches "${BATCH:-1}" --gemm-m 0 --calls 2 2>&1 \
    | grep -E "^ +[a-z0-9_]+__" | awk '$NF+0 > 0.05 || $1 !~ /stalled/' | tee -a "$OUT/ncu_gemv.txt"
done
