# Sourced by the device scripts. Q4_DEVICE_DIR holds what scripts/gpu/build.sh packed
# (bin.tar.xz, bnb/); default: .device/ of the checkout these scripts live in, or the staged
# copy's own folder (see stage.sh).
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${Q4_DEVICE_DIR:-}" ]; then
  if [ -f "$SCRIPT_DIR/../bin.tar.xz" ]; then Q4_DEVICE_DIR="$(cd "$SCRIPT_DIR/.." && pwd)";
  else Q4_DEVICE_DIR="$(cd "$SCRIPT_DIR/../.." && pwd)/.device"; fi
fi
# CUDA 13 runtime libraries (cuBLAS, NVRTC, ...) from the machine's PyTorch install.
export LD_LIBRARY_PATH="$(python3 -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
export OUT="${OUT:-/tmp/q4-out}"
mkdir -p "$OUT" /tmp/q4
tar -C /tmp/q4 -xJf "$Q4_DEVICE_DIR/bin.tar.xz"
B=/tmp/q4/bin
