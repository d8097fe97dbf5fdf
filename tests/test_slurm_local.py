"""The local SLURM cluster does what the SLURM tests rely on: two tasks at once on its
two CPUs, a SIGTERM reaching a batch script's trap, a requeue running the script again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from slurm import requeue, send_signal, slurm_cluster, slurm_node, submit, wait_for  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slurm


def wait_for_file(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_two_srun_tasks_run_at_the_same_time(slurm_cluster, tmp_path):
    # Each task marks itself started, then waits for the other's mark: only two tasks
    # running side by side both see two marks.
    task = (
        "touch started_$SLURM_PROCID; "
        "for i in $(seq 100); do [ -e started_0 ] && [ -e started_1 ] && break; sleep 0.1; done; "
        'echo "$(ls started_* | wc -l) $SLURM_NTASKS $(hostname -s)" > seen_$SLURM_PROCID'
    )
    job = submit(f"srun bash -c '{task}'", cwd=tmp_path, nodes=1, ntasks=2)
    wait_for(job, "COMPLETED")
    for rank in (0, 1):
        assert (tmp_path / f"seen_{rank}").read_text().split() == ["2", "2", slurm_cluster]


def test_sigterm_reaches_the_batch_script_trap(slurm_cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        "trap 'echo TERM > trapped; exit 0' TERM\n"
        "touch started\n"
        "for i in $(seq 300); do sleep 0.1; done\n"  # a shell runs its trap between commands
        "echo none > trapped\n"
    )
    job = submit(script, cwd=tmp_path)
    wait_for_file(tmp_path / "started")
    send_signal(job, "TERM", batch=True)
    wait_for(job, "COMPLETED", timeout=10)
    assert (tmp_path / "trapped").read_text() == "TERM\n"


def test_requeue_runs_the_batch_script_again(slurm_cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text(
        "#!/bin/bash\n"
        'echo "${SLURM_RESTART_COUNT:-0}" >> runs\n'
        '[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] || sleep 60\n'
    )
    job = submit(script, cwd=tmp_path, requeue=True)
    wait_for_file(tmp_path / "runs")
    requeue(job)
    wait_for(job, "COMPLETED", timeout=90)
    assert (tmp_path / "runs").read_text().split() == ["0", "1"]
