#!/usr/bin/env bash
# On the GPU machine: the runner end to end on CUDA with the default model (SmolLM2-135M-Instruct
# GGUF, reassembled from parts staged by earlier calls into /tmp/q4-model, sha256-checked by q4
# itself), then the CUDA test suite. Summary on stdout, logs in $OUT.
set -uo pipefail
. "$(dirname "$0")/env.sh"
export Q4_HOME=/tmp/q4-home
mkdir -p "$Q4_HOME/models"
cat /tmp/q4-model/part.* > "$Q4_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf"
sha256sum "$Q4_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf"
Q="$B/q4"
# Each command's stdout is also kept in $OUT/e2e.txt.
run() { { echo "\$ q4 $*"; "$Q" "$@"; echo " [exit $?]"; } | tee -a "$OUT/e2e.txt"; }
FR="The capital of France is Paris. The capital of Germany is"
for quant in nvfp4 nf4 none; do
  run -v generate --device cuda --quant "$quant" --temp 0 --max-tokens 16 --prompt "$FR" 2> "$OUT/gen-$quant.err"
  grep -h "decode" "$OUT/gen-$quant.err" | tail -1
done
run -v generate --device cuda --quant nvfp4 --chat --max-tokens 64 --prompt "Write one short sentence about the sea." 2> "$OUT/chat.err"
grep -h "decode" "$OUT/chat.err" | tail -1
# Decode speed with a longer output (greedy, no EOS stop inside 128 tokens is not guaranteed).
run -v generate --device cuda --quant nvfp4 --temp 0 --max-tokens 128 --prompt "Tell me a long story about a dragon." > /dev/null 2> "$OUT/long.err"
grep -h "decode" "$OUT/long.err" | tail -1
# The same on the CPU of this machine, for reference (16 cores).
run -v generate --quant nvfp4 --temp 0 --max-tokens 16 --prompt "$FR" 2> "$OUT/cpu.err"
grep -h "decode" "$OUT/cpu.err" | tail -1
TESTS="${TESTS:-}" bash "$(dirname "$0")/tests.sh" 2>&1 | tail -16
