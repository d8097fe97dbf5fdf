"""Reward functions that fail on purpose, for the PPO failure tests (`reward.function._target_`)."""

from __future__ import annotations

import os

_calls = 0


def die_on_call(prompts, responses, answers, call: int = 2, **_):
    """Scores like exact match until the `call`-th call, then the process exits (a killed actor)."""
    global _calls
    _calls += 1
    if _calls >= call:
        os._exit(1)
    return [float(r.strip() == (a or "").strip()) for r, a in zip(responses, answers)]
