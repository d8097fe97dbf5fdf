"""The one-node SLURM cluster of scripts/slurm_local.sh, shared by the SLURM tests.

Test modules import what they use: `from slurm import slurm_cluster, slurm_node, submit, wait_for`.
The cluster keeps no accounting, so `sacct` fails; a job's state comes from `scontrol`,
which remembers finished jobs for MinJobAge (600 s). docs/slurm_local.md has the details.
"""

from __future__ import annotations

import fcntl
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# States a job does not leave by itself; a requeued job passes through COMPLETING and
# PENDING instead, and PREEMPTED may be followed by a requeue.
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

_submitted: list[str] = []


@pytest.fixture
def slurm_cluster(slurm_node: str) -> Iterator[str]:
    """The node, held for this test alone: scripts/test.sh runs two pytest workers, and two SLURM
    tests at once would share the node's two CPUs, each job queueing behind the other's."""
    with open(Path(tempfile.gettempdir()) / "tuneforge-slurm-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the worker dies
        yield slurm_node


@pytest.fixture(scope="session")
def slurm_node() -> Iterator[str]:
    """Start the local cluster unless one is up; the node's name. Never skips: a machine that
    cannot run it fails here with the script's output (deselect with `-m "not slurm"`)."""
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "slurm_local.sh")], capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        pytest.fail(
            f"scripts/slurm_local.sh exited {proc.returncode}\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}",
            pytrace=False,
        )
    node = subprocess.run(["sinfo", "-h", "-o", "%n"], capture_output=True, text=True, check=True).stdout.split()[0]
    yield node
    # A failed test can leave its job running; do not let it hold the node's CPUs for the next.
    queued = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    active = [j for j in _submitted if j in queued]
    if active:
        subprocess.run(["scancel", *active], check=False)


def submit(script: Path | str, *, cwd: Path, **sbatch_args) -> str:
    """Submit a batch script (a Path) or a shell command (a str, as `sbatch --wrap`); the job id.

    `cwd` is the job's working directory, where `slurm-<id>.out` lands unless `output=` says
    otherwise. Keyword arguments become long options: `ntasks=2` -> `--ntasks=2`,
    `requeue=True` -> `--requeue`, `signal="B:TERM@30"` -> `--signal=B:TERM@30`.
    """
    cmd = ["sbatch", "--parsable"]
    for key, value in sbatch_args.items():
        opt = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(opt)
        elif value not in (False, None):
            cmd.append(f"{opt}={value}")
    cmd += [str(script)] if isinstance(script, Path) else ["--wrap", script]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    job_id = proc.stdout.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"
    _submitted.append(job_id)
    return job_id


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job`'s fields (JobState, Restarts, ExitCode, StdOut, ...) as strings."""
    proc = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"scontrol show job {job_id}: {proc.stderr.strip()} (purged after MinJobAge?)")
    # One line of `Key=Value` pairs; a value may hold spaces, so split before each `Key=`.
    return dict(re.findall(r"(\S+?)=(.*?)(?=\s+\S+?=|$)", proc.stdout.strip()))


def job_state(job_id: str) -> str:
    """PENDING, RUNNING, COMPLETING, COMPLETED, FAILED, CANCELLED, ..."""
    return job_info(job_id)["JobState"]


def wait_for(job_id: str, states: str | set[str], timeout: float = 30) -> str:
    """Poll until the job is in one of `states`; the state reached. Fails at once when the
    job ends in another state, and on timeout, with the job's record and output tail; a job
    that timed out is cancelled, so that it does not hold the node's CPUs for the next test."""
    wanted = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    while True:
        state = job_state(job_id)
        if state in wanted:
            return state
        if state in ENDED or time.monotonic() > deadline:
            why = f"ended {state}" if state in ENDED else f"still {state} after {timeout} s"
            record = _describe(job_id)
            if state not in ENDED:
                subprocess.run(["scancel", job_id], check=False)
            raise AssertionError(f"job {job_id} {why}, waiting for {sorted(wanted)}\n{record}")
        time.sleep(0.2)


def wait_until_gone(job_ids: list[str], timeout: float = 60) -> None:
    """Poll until none of the jobs (or array jobs) is queued, running or completing: only then
    are the node's CPUs free for the next test."""
    deadline = time.monotonic() + timeout
    while True:
        left = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(job_ids)],
                              capture_output=True, text=True).stdout.strip()
        if not left:
            return
        assert time.monotonic() < deadline, f"still in the queue after {timeout} s:\n{left}"
        time.sleep(0.5)


def kill_jobs(job_ids: list[str]) -> None:
    """SIGKILL now, not scancel's SIGTERM: a process that ignores SIGTERM (submitit's does, to
    wait for its own checkpoint signal) would hold the node's CPUs for KillWait (30 s)."""
    subprocess.run(["scancel", "--full", "--signal=KILL", *job_ids], capture_output=True)
    subprocess.run(["scancel", *job_ids], capture_output=True)  # and any that are still pending


def send_signal(job_id: str, name: str, *, batch: bool = False, full: bool = False) -> None:
    """`scancel --signal`: by default Slurm signals only the job's srun steps; `batch=True`
    signals only the batch script's shell (where a `trap` runs), not its children; `full=True` every
    process of the job, the batch script's and every step's (what a preemption does)."""
    cmd = ["scancel", f"--signal={name}", *(["--batch"] if batch else []), *(["--full"] if full else []), job_id]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def requeue(job_id: str, timeout: float = 30) -> None:
    """`scontrol requeue`; the job starts again by itself once its credential expires
    (AuthInfo=cred_expire, 10 s on the local cluster), as in the other tests: forcing the start
    with `scontrol update StartTime=now` fails a job that requeued itself (docs/slurm_local.md)."""
    subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True)
    wait_for(job_id, "PENDING", timeout)


def _describe(job_id: str) -> str:
    info = job_info(job_id)
    out = Path(info.get("StdOut", ""))
    tail = out.read_text(errors="replace")[-3000:] if out.is_file() else "(no output file)"
    fields = " ".join(f"{k}={info.get(k)}" for k in ("JobState", "Reason", "ExitCode", "Restarts", "NodeList"))
    return f"{fields}\nStdOut {out}:\n{tail}"
