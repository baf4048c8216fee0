#!/usr/bin/env bash
# On the GPU machine: one fused batch-1 GEMV launch of $SHAPE (NVFP4) under Nsight Compute, for
# each env setting in $VARIANTS (`-` for none; several joined by commas): pipe use (ALU, FMA,
# FMA-heavy, tensor, LSU), issue slots, scheduler and warp-state statistics. One launch in
# isolation (cold caches, no early start).
set -uo pipefail
. "$(dirname "$0")/env.sh"
M="sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active"
M="$M,sm__inst_executed_pipe_fmaheavy.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"
M="$M,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active"
M="$M,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_fmaheavy_cycles_active.avg.pct_of_peak_sustained_active"
M="$M,sm__pipe_shared_cycles_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum,smsp__inst_executed.sum"
M="$M,sm__warps_active.avg.per_cycle_active"
for v in ${VARIANTS:--}; do
  e=(); [ "$v" != - ] && e=(${v//,/ })
  echo "## $v ${SHAPE:-8192x8192}"
  env "${e[@]}" timeout 200 ncu --kernel-name gemv --launch-skip 3 --launch-count 1 --clock-control none \
    --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats --metrics "$M" \
    "$B/q4" bench gpu-linear --shapes "${SHAPE:-8192x8192}" --formats nvfp4 --batches 1 --gemm-m 0 --calls 2 2>&1 \
    | grep -vE "^==PROF==|^\s*$" \
    | grep -E "pipe|Pipe|Issue|issue|Stall|stall|Duration|duration|inst_executed|warps_active|Eligible|Active Warps|Ipc|SM Busy" | head -60
done
