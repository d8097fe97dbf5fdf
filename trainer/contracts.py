"""The contracts every layer shares: exit codes, file names, stage and role names, the secret pattern.

Standard library only, and nothing in tuneforge below it: a launcher, a role worker or a test reads a
constant here without pulling in torch, Ray, DeepSpeed or the data pipeline.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------- exit codes
USER_ERROR_EXIT_CODE = 2  # bad input: one line on stderr names what is wrong
NONFINITE_EXIT_CODE = 3  # more non-finite losses than allowed (train.max_nonfinite_skips)
NONFINITE_MODES = ("skip", "stop")  # train.nonfinite: what a non-finite loss does (trainer.step)
# A run stopped by SIGTERM/SIGUSR1 after saving a checkpoint; rerun with resume=auto to continue.
# Cluster jobs requeue on it (launch.slurm).
PREEMPTED_EXIT_CODE = 75

# ---------------------------------------------------------------- stages
STAGE_MODULES = {
    "sft": "trainer.sft",
    "instruct": "trainer.instruct",
    "reward": "trainer.reward",
    "dpo": "trainer.dpo",
    "ppo": "rlhf.ppo",
}
SUPERVISED_STAGES = ("sft", "instruct", "reward", "dpo")
PREFERENCE_STAGES = ("reward", "dpo")  # the supervised stages that train on preference pairs (trainer.preference)

# ---------------------------------------------------------------- RL roles
ROLES = ("actor", "critic", "reference", "reward")  # hosts precede their guests (rlhf.placement)
TRAINED_ROLES = ("actor", "critic")
COLOCATE_MODES = ("none", "reference_with_actor", "reward_with_critic", "both", "all")

# ---------------------------------------------------------------- files
# Written by the reward stage beside its export (trainer.reward_stats), read by PPO to normalise scores.
REWARD_STATS_FILE = "reward_stats.json"
# Written by the DPO stage in its run directory before training (trainer.reference_logps): the starting
# model's log-probs of every pair, reused on resume.
REFERENCE_LOGPS_FILE = "reference_logps.safetensors"

# ---------------------------------------------------------------- environment
# Every rank of a distributed run resolves the same run directory from this id (trainer.cli).
RUN_ID_ENV = "TUNEFORGE_RUN_ID"

# Names of keys and variables whose values are secrets: redacted in logged configs, never written
# to files that launchers render or forward.
SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|passwd|credential)", re.IGNORECASE)
