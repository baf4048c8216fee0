#!/usr/bin/env bash
# On the GPU machine: where the runner's Qwen3-4B-shaped decode step spends its time
# (q4 bench decode-runner, one format, with the step's timing log and parts of the step left out
# through Q4_STEP_SKIP, as runner_profile.sh does for SmolLM2). Summary on stdout.
set -uo pipefail
. "$(dirname "$0")/env.sh"
for skip in ${SKIPS:-- head attend norm rope silu proj attend,norm,rope,silu}; do
  [ "$skip" = - ] && skip=""
  log="$OUT/dr-${FORMAT:-nvfp4}-${skip:-all}.txt"
  Q4_STEP_SKIP="$skip" Q4_LOG="info,q4_llm=debug" "$B/q4" bench decode-runner --formats "${FORMAT:-nvfp4}" --tokens 300 --runs 1 > "$log" 2>&1
  printf 'skip %-22s %s | %s\n' "${skip:--}" \
    "$(grep -h "CUDA decode step" "$log" | tail -1 | sed 's/.*CUDA decode step: //')" \
    "$(grep -E "^${FORMAT:-nvfp4} " "$log" | tail -1)"
done
