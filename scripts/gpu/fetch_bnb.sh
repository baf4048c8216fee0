#!/usr/bin/env bash
# Here (not on the GPU machine): bitsandbytes 0.50.2 unpacked into .device/bnb with only its
# CUDA 13 libraries, small enough to carry (the wheel holds every CUDA/ROCm build: 130 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .device/whl .device/bnb && mkdir -p .device/whl .device/bnb
python3 -m pip download bitsandbytes==0.50.2 --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_24_x86_64 -d .device/whl
(cd .device/bnb && unzip -q ../whl/bitsandbytes-*.whl)
find .device/bnb/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda13*' ! -name '*cpu*' -delete
rm -rf .device/whl
du -sh .device/bnb
