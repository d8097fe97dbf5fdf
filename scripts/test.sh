#!/usr/bin/env bash
# Set everything up and run the whole test suite (CPU, 7-11 minutes of tests on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The one-node SLURM cluster the `slurm` tests submit to (installs slurm-wlm and munge on first
# use; needs root or password-less sudo). Not fatal here: the tests' `slurm_cluster` fixture
# runs it again and fails those tests with its output, and `-m "not slurm"` still runs the rest.
bash scripts/slurm_local.sh || echo "scripts/slurm_local.sh failed; the slurm tests will fail" >&2
. .venv/bin/activate
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
exec python -m pytest -q "$@"
