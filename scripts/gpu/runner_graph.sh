#!/usr/bin/env bash
# On the GPU machine: the runner's decode step as a captured CUDA graph against eager launches
# (Q4_CUDA_GRAPH=0), same binary, alternating rounds, with the default model (SmolLM2-135M GGUF
# reassembled from parts staged by earlier calls into /tmp/q4-model, as e2e.sh), plus greedy
# agreement with the CPU and the q4-llm CUDA decode tests. Summary on stdout, logs in $OUT.
set -uo pipefail
. "$(dirname "$0")/env.sh"
export Q4_HOME=/tmp/q4-home
mkdir -p "$Q4_HOME/models"
M="$Q4_HOME/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$M" ] || cat /tmp/q4-model/part.* > "$M"
sha256sum "$M"
Q="$B/q4"
FR="The capital of France is Paris. The capital of Germany is"
STORY="Tell me a long story about a dragon."
# Greedy tokens: CUDA graph, CUDA eager, CPU.
for mode in graph eager cpu; do
  case $mode in
    graph) env=(); dev=(--device cuda);;
    eager) env=(Q4_CUDA_GRAPH=0); dev=(--device cuda);;
    cpu) env=(); dev=();;
  esac
  env "${env[@]}" "$Q" -v generate "${dev[@]}" --quant "${QUANT:-nvfp4}" --temp 0 --max-tokens 32 --prompt "$FR" > "$OUT/fr-$mode.txt" 2> "$OUT/fr-$mode.err"
  echo "[$mode] $(tr '\n' ' ' < "$OUT/fr-$mode.txt")"
done
cmp -s "$OUT/fr-graph.txt" "$OUT/fr-eager.txt" && echo "graph = eager text" || echo "graph != eager text"
cmp -s "$OUT/fr-graph.txt" "$OUT/fr-cpu.txt" && echo "graph = cpu text" || echo "graph != cpu text"
# Decode speed, alternating rounds (fixed-length greedy runs: --ignore-eos, TOKENS new tokens;
# the decode line of -v, which includes the first step's capture).
for round in 1 2 3; do
  for mode in graph eager; do
    env=(); [ $mode = eager ] && env=(Q4_CUDA_GRAPH=0)
    for quant in ${QUANTS:-nvfp4 nf4 none}; do
      env "${env[@]}" "$Q" -v generate --device cuda --quant "$quant" --temp 0 --ignore-eos --max-tokens "${TOKENS:-512}" --prompt "$STORY" > "$OUT/story-$mode-$quant-$round.txt" 2> "$OUT/story-$mode-$quant-$round.err"
      echo "round $round $mode $quant: $(grep -h "decode" "$OUT/story-$mode-$quant-$round.err" | tail -1)"
    done
  done
done
"$Q" -v generate --device cuda --quant nvfp4 --chat --max-tokens 64 --prompt "Write one short sentence about the sea." 2> "$OUT/chat.err" | tee "$OUT/chat.txt"
grep -h "decode" "$OUT/chat.err" | tail -1
