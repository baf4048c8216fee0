#!/usr/bin/env bash
# On the GPU machine: Nsight Compute source-level (SASS) stall sampling of one fused GEMV launch per
# shape in $SHAPES (FORMAT, BATCH): the report, its details page and the per-instruction CSV in $OUT;
# summarise a CSV here with `python3 scripts/gpu/sass_stalls.py FILE [TOP]`. One launch in isolation
# (cold caches, no early start), so the prologue weighs more than in a stream of calls.
set -uo pipefail
. "$(dirname "$0")/env.sh"
ncu --version | tail -1
for shape in ${SHAPES:-8192x8192}; do
  rep="$OUT/gemv-$shape"
  timeout 240 ncu --kernel-name gemv --launch-skip 3 --launch-count 1 --clock-control none \
    --section SourceCounters --section WarpStateStats --section LaunchStats --section Occupancy \
    --import-source no -o "$rep" -f \
    "$B/q4" bench gpu-linear --shapes "$shape" --formats "${FORMAT:-nvfp4}" --batches "${BATCH:-1}" --gemm-m 0 --calls 2 > "$OUT/ncu-run-$shape.log" 2>&1
  ncu --import "$rep.ncu-rep" --page details > "$OUT/details-$shape.txt" 2>&1
  ncu --import "$rep.ncu-rep" --page source --print-source sass --csv > "$OUT/sass-$shape.csv" 2>&1
  wc -l "$OUT/sass-$shape.csv"; head -c 600 "$OUT/sass-$shape.csv"; echo
  grep -E "Duration|Registers|Achieved Occupancy|Theoretical Occupancy|Block Limit|Waves" "$OUT/details-$shape.txt"
done
