#!/usr/bin/env bash
# Everything a fresh Debian bookworm machine needs: packages, build, model.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install_deps.sh"
"$root/scripts/build.sh" "$@"
"$root/scripts/fetch_model.sh"
