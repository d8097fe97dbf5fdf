#!/usr/bin/env bash
# Set everything up and run the embedded default end to end on this machine's CPU
# (or GPUs): SFT, instruction tuning, then a reward model that starts from the SFT
# export, all on the synthetic suite. Extra arguments are Hydra overrides for every stage.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m trainer.sft "$@"
python -m trainer.instruct "$@"
python -m trainer.reward "$@"
