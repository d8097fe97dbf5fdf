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
# A run stopped by Ctrl-C (SIGINT) after saving a checkpoint, as a shell reports a process SIGINT ended; not
# requeued: the user stopped it.
INTERRUPTED_EXIT_CODE = 130

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

# A run with adapters (peft=lora) exports the adapter alone here, beside the merged model in hf_model/.
ADAPTER_DIR = "hf_adapter"

# ---------------------------------------------------------------- environment
# Every rank of a distributed run resolves the same run directory from this id (trainer.cli).
RUN_ID_ENV = "TUNEFORGE_RUN_ID"

# ---------------------------------------------------------------- secrets
# Names of keys and variables whose values are secrets: redacted in every file a run or launcher writes, and
# never forwarded to files that launchers render. A secret word must stand alone between separators (`_`, `-`,
# `.`), so `model.tokenizer`, `rollout.max_new_tokens` and `data.max_tokens` are not secrets, nor are a
# tokenizer's special tokens (`pad_token`, `eos_token_id`); `HF_TOKEN`, `logger.api_key`, `client_secret` are.
SECRET_KEY = re.compile(
    r"(?<![a-z0-9])(api[_-]?key|access[_-]?key|secrets?|password|passwd|credentials?"
    r"|(?<!pad_)(?<!eos_)(?<!bos_)(?<!unk_)(?<!sep_)(?<!cls_)(?<!mask_)token)(?![a-z0-9])",
    re.IGNORECASE)
# Values that are credentials whatever their key: Hugging Face, OpenAI/Anthropic-style, GitHub, Slack, AWS.
SECRET_VALUE = re.compile(
    r"(?<![A-Za-z0-9])(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}"
    r"|github_pat_[A-Za-z0-9_]{20,}|xox[abprs]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16})")
# `key=value` inside a text (an override, an option, an environment assignment); the value ends at a blank,
# a comma or a quote.
_ASSIGNMENT = re.compile(r"([A-Za-z0-9_.-]*[A-Za-z0-9_])=([^\s,'\"]*)")
REDACTED = "<redacted>"


def redact_text(text: str) -> str:
    """`text` with the value of every secret-named `key=value` and every secret-looking value replaced."""
    text = _ASSIGNMENT.sub(lambda m: f"{m[1]}={REDACTED}" if m[2] and SECRET_KEY.search(m[1]) else m[0], text)
    return SECRET_VALUE.sub(REDACTED, text)


def scrub_secrets(obj):
    """`obj` (dicts, lists, strings, scalars) with secrets redacted: the value of a secret-named key (unless
    null), and secrets inside strings (`redact_text`). The one redaction every writer uses: run configs,
    Hydra's files, W&B, sweep summaries, rendered job scripts."""
    if isinstance(obj, dict):
        return {k: (REDACTED if obj[k] is not None and SECRET_KEY.search(str(k)) else scrub_secrets(obj[k]))
                for k in obj}
    if isinstance(obj, (list, tuple)):
        return type(obj)(scrub_secrets(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj
