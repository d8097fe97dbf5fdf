"""Reward functions that fail on purpose, for the PPO failure tests (`reward.functions`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

_calls = 0


def die_on_call(prompts, responses, rows, call: int = 2, **_):
    """Scores like exact match until the `call`-th call, then the process exits (a killed actor)."""
    global _calls
    _calls += 1
    if _calls >= call:
        os._exit(1)
    return [float(r.strip() == (row.get("answer") or "").strip()) for r, row in zip(responses, rows)]


def hang_on_call(prompts, responses, rows, call: int = 2, marker: str = "", **_):
    """Scores like exact match until the `call`-th call, which never returns (a hung actor); it first writes
    the time it started hanging (time.time()) to `marker`, if given."""
    global _calls
    _calls += 1
    if _calls >= call:
        if marker:
            Path(marker).write_text(str(time.time()))
        while True:
            time.sleep(60)
    return [float(r.strip() == (row.get("answer") or "").strip()) for r, row in zip(responses, rows)]
