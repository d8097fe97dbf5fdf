#!/usr/bin/env bash
# Set everything up and run the embedded RLHF pipeline end to end on this machine's CPU (or GPUs):
# SFT, then a reward model that starts from the SFT export, then PPO on Ray starting from both,
# all on the synthetic suite. PPO ends with a before/after table (the SFT model against the PPO
# model), also saved as outputs/ppo/<run>/before_after.txt. Extra arguments are Hydra overrides
# for every stage. Instruction tuning is its own entry point: python -m trainer.instruct.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m trainer.sft "$@"
python -m trainer.reward "$@"
python -m rlhf.ppo "$@"
