"""The reward model's score statistics: written by the reward stage beside its export, read by PPO to
normalise scores. Writer and reader live here so the file's fields are defined once; this module loads
no model or data code (a reward role worker imports it)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from trainer.config import ConfigError
from trainer.contracts import REWARD_STATS_FILE


def reward_stats(metrics: dict, pairs: int, split: str) -> dict[str, dict]:
    """`extra_files` for the export: the final model's score mean/std from `pairwise_metrics` on `pairs`
    pairs of `split` (held-out pairs where there are some)."""
    stats = {"mean": metrics["eval/reward_mean"], "std": metrics["eval/reward_std"], "pairs": pairs, "split": split,
             "accuracy": metrics["eval/accuracy"]}
    return {REWARD_STATS_FILE: stats}


def read_reward_stats(model_dir: Optional[str]) -> Optional[dict]:
    """The score mean/std the reward stage saved next to its export (None where there is none)."""
    if model_dir is None or not (Path(model_dir) / REWARD_STATS_FILE).exists():
        return None
    path = Path(model_dir) / REWARD_STATS_FILE
    stats = json.loads(path.read_text())
    if not isinstance(stats.get("std"), (int, float)) or not math.isfinite(stats["std"]) or stats["std"] <= 0:
        raise ConfigError(f"{path}: std must be a positive number, got {stats.get('std')!r}")
    return stats
