#!/usr/bin/env bash
# Create .venv and install tuneforge with its dev extras.
# TORCH_SPEC picks the torch build: the default is the CPU-sized wheel; on a GPU
# machine use e.g. TORCH_SPEC="torch==2.13.0" PIP_EXTRA_INDEX_URL=<pytorch CUDA index>.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[dev]"
