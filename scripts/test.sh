#!/usr/bin/env bash
# Sets everything up and runs the whole test suite (CUDA tests skip
# themselves where no GPU is visible). Warnings are errors here.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
MORPHSERVE_PRESET=${MORPHSERVE_PRESET:-ci} "$root/scripts/setup.sh"
export MORPHSERVE_MODELS_DIR="$root/models"
export MORPHSERVE_REQUIRE_MODELS=1
cd "$root/build"
ctest --output-on-failure -j "$(nproc)" "$@"
