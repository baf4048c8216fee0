#!/usr/bin/env bash
# On the GPU machine: the on-disk kernel cache end to end. Greedy SmolLM2 (staged in
# /tmp/q4-model as for e2e.sh) three times on a fresh cache, then once with the cache off, each
# process timed whole; doctor before and after. Same 16 tokens expected from every run.
set -uo pipefail
. "$(dirname "$0")/env.sh"
export Q4_HOME=/tmp/q4-home-cache
rm -rf "$Q4_HOME"; mkdir -p "$Q4_HOME/models"
cat /tmp/q4-model/part.* > "$Q4_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf"
FR="The capital of France is Paris. The capital of Germany is"
"$B/q4" doctor | grep -E "nvrtc|kernel cache" | tee -a "$OUT/kernel_cache.txt"
for run in "fresh cache" "kept kernels" "kept kernels again" "Q4_CUDA_CACHE=0"; do
  if [ "$run" = "Q4_CUDA_CACHE=0" ]; then export Q4_CUDA_CACHE=0; fi
  start=$(date +%s%N)
  text=$("$B/q4" -v generate --device cuda --quant nvfp4 --temp 0 --max-tokens 16 --prompt "$FR" 2> /tmp/q4/gen.err)
  ms=$(( ($(date +%s%N) - start) / 1000000 ))
  echo "== $run: whole process $ms ms; $(grep -o 'prefill.*' /tmp/q4/gen.err | tail -1)" | tee -a "$OUT/kernel_cache.txt"
  echo "$text" | tee -a "$OUT/kernel_cache.txt"
done
unset Q4_CUDA_CACHE
"$B/q4" doctor | grep -E "kernel cache" | tee -a "$OUT/kernel_cache.txt"
ls -la "$Q4_HOME/kernels" | head -5 >> "$OUT/kernel_cache.txt"
