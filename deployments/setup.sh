#!/usr/bin/env bash
# Create .venv and install dataworth with its pinned stack. Idempotent; offline-safe apart from the
# package registries. torch is installed first from the CPU wheel (2.13.0) so nothing pulls CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev]"
echo "dataworth installed in $(pwd)/.venv"
