#!/usr/bin/env bash
# On the GPU machine: q4's CUDA matmul and its same-run peers (candle/cuBLAS bf16 in-process,
# PyTorch bf16 and bitsandbytes NF4 from scripts/gpu/peers.py), then the synthetic decode.
# bitsandbytes 0.50.2 travels unpacked in $Q4_DEVICE_DIR/bnb (see fetch_bnb.sh).
set -uo pipefail
. "$(dirname "$0")/env.sh"
timeout "${LINEAR_TIMEOUT:-300}" "$B/q4" bench gpu-linear --json "$OUT/q4_linear.json" ${LINEAR_ARGS:-} | tee "$OUT/q4_linear.txt"
PYTHONUNBUFFERED=1 PYTHONPATH="$Q4_DEVICE_DIR/bnb" timeout "${PEERS_TIMEOUT:-300}" python3 "$SCRIPT_DIR/peers.py" --json "$OUT/peers.json" ${PEERS_ARGS:-} | tee "$OUT/peers.txt"
timeout "${DECODE_TIMEOUT:-300}" "$B/q4" bench decode-synthetic ${DECODE_ARGS:-} | tee "$OUT/decode.txt"
# Optional GEMM chunk-size sweep (prefill only): EXTRA_GEMM_CHUNKS="4096 8192".
for c in ${EXTRA_GEMM_CHUNKS:-}; do
  echo "# Q4_GEMM_CHUNK_ROWS=$c" | tee -a "$OUT/q4_linear.txt"
  Q4_GEMM_CHUNK_ROWS=$c timeout 120 "$B/q4" bench gpu-linear --batches 1 --calls 5 | grep -E " (2048) " | tee -a "$OUT/q4_linear.txt"
done
# Optional Nsight Compute profile of one fused GEMV launch (NCU=1): speed of light, stalls,
# instruction mix.
if [ -n "${NCU:-}" ]; then
  timeout 240 ncu --kernel-name gemv --launch-skip 3 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section InstructionStats --section Occupancy \
    --section MemoryWorkloadAnalysis --section SchedulerStats \
    "$B/q4" bench gpu-linear --shapes 8192x8192 --formats nvfp4 --batches 1 --gemm-m 0 --calls 2 \
    > "$OUT/ncu.txt" 2>&1
  grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Executed Ipc|Issue Slots|Achieved Occupancy|Theoretical Occupancy|Stall|Registers|Block Limit|No Eligible|Eligible Warps|Active Warps" "$OUT/ncu.txt" | head -60
fi
