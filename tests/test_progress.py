"""trainer.progress: in a log file (not a TTY) a bar is a line every few percent, each with its rate and ETA."""

from __future__ import annotations

import io

import trainer.progress as progress_module
from trainer.progress import progress


def test_a_log_gets_a_line_every_few_percent_with_rate_and_eta(monkeypatch):
    monkeypatch.setattr(progress_module, "DELAY_S", 0.0)
    clock = iter(range(10**6))
    monkeypatch.setattr("tqdm.std.time", lambda: float(next(clock)))  # a second per look at the clock
    log = io.StringIO()
    for _ in progress(range(1000), total=1000, desc="eval", unit="batch", stream=log):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and all(line.startswith("eval:") for line in lines)
    assert 15 <= len(lines) <= 100 // progress_module.LOG_PERCENT + 2, lines  # not one per update
    assert "1000/1000" in lines[-1] and "batch/s" in lines[-1] and "<" in lines[-2]  # rate; elapsed<remaining


def test_a_rank_other_than_0_shows_nothing():
    log = io.StringIO()
    for _ in progress(range(10), total=10, desc="x", enabled=False, stream=log):
        pass
    assert log.getvalue() == ""
