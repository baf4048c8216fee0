#!/usr/bin/env bash
# On the GPU machine: q4's CUDA matmul and its same-run peers (candle/cuBLAS bf16 in-process,
# PyTorch bf16 and bitsandbytes NF4 from scripts/gpu/peers.py), then the synthetic decode.
# bitsandbytes 0.50.2 travels unpacked in .device/bnb (see scripts/gpu/fetch_bnb.sh).
set -uo pipefail
cd "$(dirname "$0")/../.."
. scripts/gpu/env.sh
timeout "${LINEAR_TIMEOUT:-300}" "$B/q4" bench gpu-linear --json "$OUT/q4_linear.json" ${LINEAR_ARGS:-} | tee "$OUT/q4_linear.txt"
PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/.device/bnb" timeout "${PEERS_TIMEOUT:-300}" python3 scripts/gpu/peers.py --json "$OUT/peers.json" ${PEERS_ARGS:-} | tee "$OUT/peers.txt"
timeout "${DECODE_TIMEOUT:-300}" "$B/q4" bench decode-synthetic ${DECODE_ARGS:-} | tee "$OUT/decode.txt"
