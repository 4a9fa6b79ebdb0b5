#!/usr/bin/env bash
# Sets everything up and chats with the default model.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
message=${1:-"What is the capital of France?"}
exec "$root/build/bin/morphserve" generate \
  --model "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf" --chat "$message" --max-tokens 128
