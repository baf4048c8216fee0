#!/usr/bin/env bash
# Builds the CUDA binaries on this (GPU-less) machine and packs what the device run needs into
# .device/ (git-ignored, carried with `run`): the q4 binary and the CUDA test executables,
# stripped and compressed, plus scripts/gpu/*.sh and peers.py (tracked, travel anyway).
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(/work/shared/cuda/toolchain.sh)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/main/target-cuda}"
cargo build --release --features cuda -p q4-cli
tests_json=$(cargo test --release --features cuda -p q4 --test cuda_kernels --test cuda_early_start --no-run --message-format=json 2>/dev/null
  cargo test --release --features cuda -p q4-llm --test cuda_decode --no-run --message-format=json 2>/dev/null)
mkdir -p .device/bin
cp "$CARGO_TARGET_DIR/release/q4" .device/bin/q4
for t in cuda_kernels cuda_early_start cuda_decode; do
  exe=$(echo "$tests_json" | T=$t python3 -c 'import sys,json,os
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]==os.environ["T"]: print(m["executable"])' | tail -1)
  cp "$exe" ".device/bin/$t"
done
strip .device/bin/*
tar -C .device -cJf .device/bin.tar.xz bin
rm -rf .device/bin
du -sh .device/*
