#!/usr/bin/env bash
# Set everything up and run the embedded default end to end on this machine's CPU
# (or GPUs): SFT, then instruction tuning, on the synthetic suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m trainer.sft "$@"
python -m trainer.instruct "$@"
