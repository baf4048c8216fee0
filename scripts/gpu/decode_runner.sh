#!/usr/bin/env bash
# On the GPU machine: decode tokens/s of the runner itself (q4 bench decode-runner: random
# weights of Qwen3-4B's shape through Model::decode_step and the host sampler, bf16 / NVFP4 / NF4)
# and, in the same call, the synthetic harness (q4 bench decode-synthetic: its own step kernels,
# a 4-bit LM head, argmax on the device). Output in $OUT/decode_runner.txt.
set -uo pipefail
. "$(dirname "$0")/env.sh"
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
  "$B/q4" -v bench decode-runner --tokens "${TOKENS:-128}" --runs "${RUNS:-3}"
  # SmolLM2-135M's shape (random weights; the real model's text checks are runner_graph.sh's).
  "$B/q4" -v bench decode-runner --config "$(dirname "$0")/smollm2_shape.json" --tokens 512 --runs "${RUNS:-3}"
  "$B/q4" bench decode-synthetic --tokens "${TOKENS:-128}"
} 2>&1 | tee "$OUT/decode_runner.txt"
