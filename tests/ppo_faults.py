"""Reward functions that fail on purpose, for the PPO failure tests (`reward.functions`)."""

from __future__ import annotations

import os

_calls = 0


def die_on_call(prompts, responses, rows, call: int = 2, **_):
    """Scores like exact match until the `call`-th call, then the process exits (a killed actor)."""
    global _calls
    _calls += 1
    if _calls >= call:
        os._exit(1)
    return [float(r.strip() == (row.get("answer") or "").strip()) for r, row in zip(responses, rows)]
