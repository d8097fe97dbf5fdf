"""Reward functions for the RL tests (`reward.functions`, with `pythonpath` pointing here): ones that fail on
purpose, and a probe of what really runs on Ray."""

from __future__ import annotations

import os
import time
from pathlib import Path

_calls = 0
_recorded = False


def die_on_call(prompts, responses, rows, call: int = 2, **_):
    """Scores like exact match until the `call`-th call, then the process exits (a killed actor)."""
    global _calls
    _calls += 1
    if _calls >= call:
        os._exit(1)
    return [float(r.strip() == (row.get("answer") or "").strip()) for r, row in zip(responses, rows)]


def record_actor_classes(prompts, responses, rows, path: str, **_):
    """Scores 0 (give it weight 0). On its first call, from inside the reward actor, writes the class of every
    live actor in Ray's own actor table to `path`, one per line: the processes that run, whatever the run's
    placement.txt says."""
    global _recorded
    if not _recorded:
        import ray

        alive = sorted(a["ActorClassName"] for a in ray._private.state.actors().values() if a["State"] == "ALIVE")
        Path(path).write_text("\n".join(alive) + "\n")
        _recorded = True
    return [0.0] * len(responses)


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
