#!/usr/bin/env bash
# Regenerates worker_client/_generated/ from worker_client/protos/*.proto.
# Usage: bash scripts/gen_protos.sh   (uses $PYTHON, else .venv/bin/python, else python3)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
out=worker_client/_generated
rm -f "$out"/*_pb2*.py "$out"/*_pb2*.pyi
"$python" -m grpc_tools.protoc -I worker_client/protos \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  worker_client/protos/backend.proto worker_client/protos/worker.proto
# protoc writes top-level imports (`import backend_pb2`); make them relative to the package.
sed -i -E 's/^import (backend|worker)_pb2 as /from . import \1_pb2 as /' "$out"/*_pb2*.py "$out"/*.pyi
