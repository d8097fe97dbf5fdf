"""bench.default_pipeline's accounting of a stage's processes and memory, on a real child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.default_pipeline import logged_peak_memory, process_kind, watch


def test_process_kinds_name_actors_modules_and_programs():
    def argv(*words: str) -> bytes:
        return b"\0".join(w.encode() for w in words) + b"\0"

    assert process_kind(argv("ray::PolicyWorker.generate" + " " * 40)) == "ray::PolicyWorker"
    assert process_kind(argv("ray::IDLE")) == "ray::IDLE"
    assert process_kind(argv("/venv/bin/python", "-m", "rlhf.ppo", "algo=grpo")) == "python -m rlhf.ppo"
    assert process_kind(argv("/venv/bin/python3.11", "-u", "/venv/lib/ray/dashboard/agent.py", "--x=1")) == \
        "python agent.py"
    assert process_kind(argv("/venv/lib/ray/core/src/ray/raylet/raylet", "--node=1")) == "raylet"
    assert process_kind(b"") == "?"


def test_the_logged_peaks_are_each_memory_metrics_largest_value(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "policy/memory_gb": 0.5, "critic/memory_gb": 0.25, "train/loss": 3.0},
        {"step": 2, "policy/memory_gb": 0.75, "critic/memory_gb": 0.125}]))
    assert logged_peak_memory(tmp_path) == {"policy/memory_gb": 0.75, "critic/memory_gb": 0.25}
    assert logged_peak_memory(tmp_path / "missing") == {}


def test_watch_counts_the_marked_processes_and_their_peak_memory():
    """A marked parent holding 64 MiB starts a marked child holding 192 MiB; an unmarked process beside them
    (this one) is not counted."""
    child = "x = bytearray(192 * 2**20); import time; time.sleep(2)"
    parent = (f"import subprocess, sys; x = bytearray(64 * 2**20); "
              f"subprocess.run([sys.executable, '-c', {child!r}], check=True)")
    env = {**os.environ, "BENCH_STAGE_MARK": "test-mark"}
    proc = subprocess.Popen([sys.executable, "-c", parent], env=env)
    seen = watch(proc, "BENCH_STAGE_MARK=test-mark", every_s=0.1)
    assert proc.returncode == 0
    assert seen["processes"] == 2 and seen["process_kinds"] == {"python -c": 2}
    assert 0.25 <= seen["peak_resident_gb"] < 0.5  # both buffers (and two interpreters) at once
