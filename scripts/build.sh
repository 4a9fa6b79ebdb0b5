#!/usr/bin/env bash
# Configures and builds morphserve into build/ (binaries in build/bin/).
# CUDA is built when nvcc is found. Extra arguments go to cmake's configure.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [[ -x /usr/local/cuda/bin/nvcc ]] && ! command -v nvcc >/dev/null; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
preset=${MORPHSERVE_PRESET:-release}
jobs=${MORPHSERVE_JOBS:-$(nproc)}
cmake --preset "$preset" "$@"
cmake --build build -j "$jobs"
