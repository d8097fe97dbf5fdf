#!/usr/bin/env bash
# Set everything up and run the whole test suite (CPU, 7-11 minutes of tests on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
exec python -m pytest -q "$@"
