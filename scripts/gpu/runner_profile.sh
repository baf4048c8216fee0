#!/usr/bin/env bash
# On the GPU machine: where a runner decode step's time goes. Greedy fixed-length runs of the
# default model (staged as for runner_graph.sh) with the step's timing log
# (Q4_LOG=q4_llm=debug: device time of the captured step against the host's time in the call,
# every 256 steps) and the -v decode rate, first whole, then with parts of the step left out
# (Q4_STEP_SKIP; those tokens are no model's). Summary on stdout, logs in $OUT.
set -uo pipefail
. "$(dirname "$0")/env.sh"
export Q4_HOME=/tmp/q4-home
mkdir -p "$Q4_HOME/models"
M="$Q4_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$M" ] || cat /tmp/q4-model/part.* > "$M"
Q="$B/q4"
STORY="Tell me a long story about a dragon."
# HEADS: the output layer's kernels to compare (q4: q4's bf16 GEMV; candle: candle's matmul).
for round in 1 2; do
  for head in ${HEADS:-q4}; do
  for skip in ${SKIPS:-- attend norm rope silu head proj attend,norm,rope,silu}; do
    [ "$skip" = - ] && skip=""
    for quant in ${QUANTS:-nvfp4}; do
      log="$OUT/prof-$quant-$head-${skip:-all}-$round.err"
      Q4_STEP_HEAD=$head Q4_STEP_SKIP="$skip" Q4_LOG="info,q4_llm=debug" "$Q" generate --device cuda --quant "$quant" --temp 0 --ignore-eos --max-tokens 513 --prompt "$STORY" > /dev/null 2> "$log"
      printf '%-7s head %-6s skip %-22s %s | %s\n' "$quant" "$head" "${skip:--}" \
        "$(grep -h "CUDA decode step" "$log" | tail -1 | sed 's/.*CUDA decode step: //')" \
        "$(grep -h "decode" "$log" | grep "tok/s" | tail -1 | sed 's/.*new tokens, //')"
    done
  done
  done
done
