import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Tests never touch the network or a W&B account, and Ray binds to loopback.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO



# The files whose runs take longest, started first: scripts/test.sh hands whole files to two
# pytest-xdist workers in this order (`--no-loadscope-reorder`), so no long file is left to run
# alone at the end. The `slurm` tests of several files take turns on the cluster (tests/slurm.py).
LONGEST_FIRST = ("test_ppo.py", "test_slurm_launch.py", "test_sweeps.py", "test_training.py", "test_grpo.py",
                 "test_resume.py", "test_rl_checkpoint.py", "test_dpo.py", "test_lora.py", "test_reward.py",
                 "test_hangs.py", "test_preemption.py", "test_checkpoint.py", "test_launch.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
