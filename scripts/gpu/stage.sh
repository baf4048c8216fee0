#!/usr/bin/env bash
# The device tool sends the session's checkout (/work/main), not this worktree: copy the packed
# binaries, bitsandbytes and these scripts into its git-ignored .device/cuda, then run e.g.
#   run(command="bash .device/cuda/scripts/tests.sh", carry=[".device/cuda"])
set -euo pipefail
here="$(cd "$(dirname "$0")/../.." && pwd)"
dest="${1:-/work/main/.device/cuda}"
mkdir -p "$dest"
rm -rf "$dest/scripts" "$dest/bnb"
cp "$here/.device/bin.tar.xz" "$dest/"
cp -r "$here/.device/bnb" "$dest/bnb"
cp -r "$here/scripts/gpu" "$dest/scripts"
du -sh "$dest"
