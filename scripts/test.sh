#!/usr/bin/env bash
# Set everything up and run the whole test suite (CPU, 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The one-node SLURM cluster the `slurm` tests submit to (installs slurm-wlm and munge on first
# use; needs root or password-less sudo). Not fatal here: the tests' `slurm_cluster` fixture
# runs it again and fails those tests with its output, and `-m "not slurm"` still runs the rest.
# A cluster this script starts is stopped when the tests end; one that was up before stays up.
slurm_was_up=false
if [ -n "$(ps -C slurmctld -o pid= 2>/dev/null)" ]; then slurm_was_up=true; fi
bash scripts/slurm_local.sh || echo "scripts/slurm_local.sh failed; the slurm tests will fail" >&2
. .venv/bin/activate
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
# Two workers (pytest-xdist) keep both cores busy: most tests are one-process runs. Each file stays
# on one worker (its module fixtures, a PPO run or a tiny model, are built once), and the `slurm`
# tests take turns on the cluster (tests/slurm.py). TEST_WORKERS=0 runs them in this process.
status=0
python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder --durations=15 "$@" || status=$?
if ! $slurm_was_up; then bash scripts/slurm_local.sh --stop >/dev/null 2>&1 || true; fi
exit "$status"
