#!/usr/bin/env bash
# Sets up Python for the integration tests and the example client: a
# virtualenv with the pinned packages of tests/python/requirements.txt, and
# the Python stubs of the gRPC API generated with grpc_tools.protoc.
# Idempotent, and quick when nothing changed.
#
#   scripts/python_env.sh [VENV_DIR [STUBS_DIR]]
#
# Defaults: build/python/venv and build/python/stubs. Then:
#   PYTHONPATH=build/python/stubs build/python/venv/bin/python ...
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/build/python/venv}
stubs=${2:-$root/build/python/stubs}
requirements=$root/tests/python/requirements.txt
proto=$root/proto/morphserve/v1/generation.proto

# A venv without pip is what a failed `python3 -m venv` leaves behind.
if [[ ! -x $venv/bin/pip ]]; then
  echo "[python] creating the virtualenv $venv"
  rm -rf "$venv"
  if ! "${PYTHON:-python3}" -m venv "$venv"; then
    echo "[python] cannot create a virtualenv: install python3-venv (scripts/install_deps.sh)" >&2
    exit 1
  fi
fi

# The copy of requirements.txt in the venv says what is installed.
installed=$venv/requirements.txt
if ! cmp -s "$requirements" "$installed"; then
  echo "[python] installing $(grep -c '==' "$requirements") pinned packages"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --require-virtualenv \
    -r "$requirements"
  cp "$requirements" "$installed"
fi

generated=$stubs/morphserve/v1/generation_pb2_grpc.py
if [[ ! $generated -nt $proto || ! $generated -nt $installed ]]; then
  echo "[python] generating the stubs of $(basename "$proto") into $stubs"
  mkdir -p "$stubs"
  "$venv/bin/python" -m grpc_tools.protoc -I "$root/proto" --python_out="$stubs" \
    --grpc_python_out="$stubs" "$proto"
fi
echo "[python] ready: $venv, stubs in $stubs"
