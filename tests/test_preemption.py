"""Preemption wherever it lands (issue 19 part 3), with real processes: a warning that arrives before training
(while the model loads or the data tokenizes) ends the run with status 75 and the command that continues it;
in a 2-rank run one rank receiving it is enough for both to save the same step, and the resumed run equals
the straight one. A Ctrl-C saves and stops the same way (status 130); a second one stops at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runs import REPO, assert_same_losses, run_env, run_stage, signal_when, tiny_sft, write_sft_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_sft_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", 300)


@pytest.mark.distributed
def test_a_warning_before_training_ends_the_run_with_75_and_the_command_that_continues(tmp_path, data):
    run_dir = tmp_path / "early"
    cmd = [sys.executable, "-m", "trainer.sft", *tiny_sft(data), "train.max_steps=5", f"hydra.run.dir={run_dir}"]
    # Hydra has made the run directory: the entry point is importing torch, building the model or tokenizing.
    proc = signal_when(cmd, lambda: (run_dir / ".hydra").exists(), signal.SIGTERM)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "preempted: before training, at step 0; to continue: " in proc.stdout
    assert proc.stdout.rstrip().endswith("resume=auto")
    assert not (run_dir / "checkpoints").exists()  # nothing trained, nothing saved


def test_a_second_ctrl_c_stops_at_once_as_python_would():
    from trainer.preemption import PreemptionFlag

    before = signal.getsignal(signal.SIGINT)
    flag = PreemptionFlag()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.requested and flag.interrupted and flag.outcome == ("interrupted", 130)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.distributed
def test_ctrl_c_saves_the_step_and_prints_the_command_that_continues_it(tmp_path, data):
    run_dir = tmp_path / "run"
    common = [*tiny_sft(data), "train.micro_batch_size=2", "train.save_every=1000", f"hydra.run.dir={run_dir}"]
    cmd = [sys.executable, "-m", "trainer.sft", *common, "train.max_steps=100000"]
    metrics = run_dir / "metrics.jsonl"
    proc = signal_when(cmd, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, signal.SIGINT)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Ctrl-C: the run stops where it can save" in proc.stderr and "Traceback" not in proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith("interrupted: checkpoint saved at step "))
    assert line.endswith(" resume=auto"), line
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().split("_")[1])
    assert f"step {stopped_at} in {run_dir}" in line and stopped_at >= 3
    run_stage(run_dir, *common[:-1], f"train.max_steps={stopped_at + 2}", "resume=auto")
    assert int((run_dir / "checkpoints" / "latest").read_text().split("_")[1]) == stopped_at + 2


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of `rank` among torchrun's workers (read from their environment), once it has started."""
    children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.distributed
def test_one_rank_warned_is_enough_and_the_two_rank_resume_equals_the_straight_run(tmp_path, data):
    # A fixed lr schedule (tiny_sft): the preempted run is given far more steps than it gets to train, so the
    # warning always lands mid-run however fast the machine, and the straight run trains as many as the resume.
    common = [*tiny_sft(data), "train.micro_batch_size=2", "train.save_every=1000"]
    straight, run_dir = tmp_path / "straight", tmp_path / "preempted"
    cmd = [sys.executable, "-m", "launch.torchrun", "--standalone", "--nproc_per_node=2", "-m", "trainer.sft",
           *common, "train.max_steps=100000", f"hydra.run.dir={run_dir}"]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and launcher.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        pid = _rank_pid(launcher, 1)
        assert launcher.poll() is None and pid, "the run ended before rank 1 could be signalled"
        subprocess.run(["kill", "-USR1", str(pid)], check=True)  # rank 1 only, as a node-local warning would
        stdout, stderr = launcher.communicate(timeout=180)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    # (torchrun itself exits 1: its agent reports any rank's non-zero exit, 75 included, as a failure)
    assert "preempted: checkpoint saved at step " in stdout, stderr[-3000:]
    resume = stdout.split("to continue: ", 1)[1].splitlines()[0]  # the launch as typed
    assert " -m launch.torchrun --standalone --nproc_per_node=2 -m trainer.sft " in resume, resume
    assert resume.endswith("resume=auto"), resume
    tag = (run_dir / "checkpoints" / "latest").read_text()
    stopped_at = int(tag.split("_")[1])
    assert stopped_at >= 3
    # Both ranks saved that step (rank 0 was never signalled).
    assert {p.name for p in (run_dir / "checkpoints" / tag).glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}

    final = stopped_at + 3
    run_stage(run_dir, *common, f"train.max_steps={final}", "resume=auto", nproc=2)
    run_stage(straight, *common, f"train.max_steps={final}", nproc=2)
    assert_same_losses(straight, run_dir, final)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["sft", "instruct"])
def test_a_model_with_dropout_resumes_equal_to_the_straight_run(tmp_path, data, stage):
    """Dropout draws from the RNG at every step, so only a restored RNG state gives the straight run's losses
    (the other resume tests train without dropout); the instruct stage resumes the same way."""
    common = [*tiny_sft(data), "model.tiny.attention_dropout=0.3", "train.micro_batch_size=4", "train.save_every=3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_stage(straight, *common, "train.max_steps=6", stage=stage)
    run_stage(resumed, *common, "train.max_steps=3", stage=stage)
    run_stage(resumed, *common, "train.max_steps=6", "resume=auto", stage=stage)
    assert_same_losses(straight, resumed, 6)
