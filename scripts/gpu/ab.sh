#!/usr/bin/env bash
# On the GPU machine: same-call A/B of the fused GEMV. Runs `q4 bench gpu-linear` (GEMV batches
# only) for a baseline binary ($Q4_DEVICE_DIR/q4-old.xz, built from the previous commit) and
# for the current one under each setting in $VARIANTS (env assignments, several joined by
# commas; `-` for none),
# alternating ROUNDS times so that clock drift hits every variant alike. AB_DECODE="fmt,..."
# adds `q4 bench decode-synthetic --formats fmt,...` for each binary in every round.
set -uo pipefail
. "$(dirname "$0")/env.sh"
ARGS="${AB_ARGS:---batches 1,4,16 --gemm-m 0}"
[ -f "$Q4_DEVICE_DIR/q4-old.xz" ] && xz -dc "$Q4_DEVICE_DIR/q4-old.xz" > /tmp/q4/q4-old && chmod +x /tmp/q4/q4-old
for round in $(seq 1 "${ROUNDS:-2}"); do
  if [ -x /tmp/q4/q4-old ]; then
    echo "## round $round: baseline (previous commit)" | tee -a "$OUT/ab.txt"
    timeout 120 /tmp/q4/q4-old bench gpu-linear $ARGS | tee -a "$OUT/ab.txt"
    [ -n "${AB_DECODE:-}" ] && timeout 200 /tmp/q4/q4-old bench decode-synthetic --formats "$AB_DECODE" | tee -a "$OUT/ab.txt"
  fi
  for v in ${VARIANTS:--}; do
    echo "## round $round: current $v" | tee -a "$OUT/ab.txt"
    if [ "$v" = - ]; then timeout 120 "$B/q4" bench gpu-linear $ARGS | tee -a "$OUT/ab.txt"
    else env ${v//,/ } timeout 120 "$B/q4" bench gpu-linear $ARGS | tee -a "$OUT/ab.txt"; fi
    if [ -n "${AB_DECODE:-}" ]; then
      if [ "$v" = - ]; then timeout 200 "$B/q4" bench decode-synthetic --formats "$AB_DECODE" | tee -a "$OUT/ab.txt"
      else env ${v//,/ } timeout 200 "$B/q4" bench decode-synthetic --formats "$AB_DECODE" | tee -a "$OUT/ab.txt"; fi
    fi
  done
done
