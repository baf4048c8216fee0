#!/usr/bin/env bash
# SASS of one GEMV variant without a GPU, and the instruction mix of its innermost loop:
#   bash scripts/gpu/sass_local.sh FMT=0 OPT=1 OUT_T=1 NT=1 MT=1 WARPS=8 DEPTH=2 ARITH=1 KFULL=1 CLAMPED=1
# Compiles as NVRTC does (same flags; defines, common.cuh, codebook tables, gemv.cu) with the
# toolchain's nvcc, disassembles with nvdisasm from the nvidia-cuda-nvdisasm wheel (installed
# into $Q4_SASS_TOOLS on first use). SRC=path overrides the kernel file (e.g. a candidate).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cu="$root/crates/q4/src/kernels/cuda/cu"
src="${SRC:-$cu/gemv.cu}"
tools="${Q4_SASS_TOOLS:-$HOME/.cache/q4-sass-tools}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ ! -x "$tools/nvidia/cu13/bin/nvdisasm" ]; then
  pip install --quiet --target "$tools" nvidia-cuda-nvdisasm >&2
fi
{
  for d in "$@"; do echo "#define ${d%%=*} ${d#*=}"; done
  cat "$cu/common.cuh"
  # Only the pair-table and codebook kernels read these; zeros keep the SASS shape the same.
  echo '__constant__ unsigned CB_BITS[4][16] = {{0}}; __constant__ unsigned NF4_TH_BITS[15] = {0};'
  echo '__constant__ unsigned FP4_TH_BITS[15] = {0}; __constant__ unsigned FP4_SORTED[16] = {0};'
  cat "$src"
} > "$work/k.cu"
eval "$(/work/shared/cuda/toolchain.sh)" >/dev/null 2>&1 || eval "$(../shared/cuda/toolchain.sh)" >/dev/null
nvcc -cubin -arch="${ARCH:-sm_90}" --std=c++17 -ftz=false -prec-div=true -fmad=false -Xptxas -v \
  -o "$work/k.cubin" "$work/k.cu" 2>&1 | grep -E "registers|error|spill" >&2 || true
"$tools/nvidia/cu13/bin/nvdisasm" -c "$work/k.cubin" > "${OUT_SASS:-$work/k.sass}"
python3 "$(dirname "$0")/sass_loop.py" "${OUT_SASS:-$work/k.sass}"
