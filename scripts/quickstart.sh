#!/usr/bin/env bash
# Sets everything up and starts the gRPC server on the default model
# (SmolLM2-135M-Instruct, CPU) on port 50051, metrics on 9464. Extra
# arguments go to `morphserve serve`, e.g. --kv-policy morphkv.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
echo "morphserve: talk to it with: build/bin/morphserve chat --server localhost:50051" >&2
exec "$root/build/bin/morphserve" serve \
  --model "$root/models/SmolLM2-135M-Instruct.Q4_1.gguf" --port 50051 --metrics-port 9464 "$@"
