# Sourced by the device scripts: CUDA 13 runtime libraries from the machine's PyTorch install,
# q4's binaries unpacked from .device/bin.tar.xz (built here by scripts/gpu/build.sh).
export LD_LIBRARY_PATH="$(python3 -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
export OUT="${OUT:-/tmp/q4-out}"
mkdir -p "$OUT" /tmp/q4
tar -C /tmp/q4 -xJf .device/bin.tar.xz
B=/tmp/q4/bin
