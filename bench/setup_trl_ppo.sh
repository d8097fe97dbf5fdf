#!/usr/bin/env bash
# The environment bench/trl_ppo.py runs in (for bench/ppo_vs_trl.py): bench/.venv-trl-ppo, git-ignored.
#
# TRL 1.12.0 is the last release that ships PPOTrainer (trl.experimental.ppo; 1.13 removed it), so the TRL side of
# the PPO benchmark cannot share tuneforge's environment (TRL 1.16). The other pins are the releases current when
# TRL 1.12.0 came out; torch is tuneforge's (pinned: an unpinned install may pull a multi-GB CUDA build).
# Nothing of tuneforge is installed here: bench/trl_ppo.py reads the models and prompts the benchmark writes.
#
#   bash bench/setup_trl_ppo.sh            # python3.11 by default; PYTHON=python3.12 bash ... for another
set -euo pipefail
cd "$(dirname "$0")/.."
venv=bench/.venv-trl-ppo
"${PYTHON:-python3.11}" -m venv "$venv"
"$venv/bin/pip" install --quiet torch==2.13.0 trl==1.12.0 transformers==5.16.1 accelerate==1.14.0 datasets==5.0.0
"$venv/bin/python" -c "import trl; from trl.experimental.ppo import PPOTrainer; print(f'TRL {trl.__version__} with PPOTrainer in $venv')"
