"""`resume=auto` without a run directory (trainer/resume.py): which unfinished run it continues, when it refuses
to guess, the command a preempted run prints; and the preempted run in the default directory that the printed
command continues (for SFT here; tests/test_grpo.py preempts a GRPO run in its default directory and continues
it with the printed command)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runs import REPO, TINY, losses, run_env, signal_when, write_sft_jsonl
from trainer.contracts import RUN_ID_ENV
from trainer.resume import (Candidate, Decision, claim, config_differences, hold_run_lock, is_running,
                            launcher_words, pick, scan, wants_discovery, with_resume_auto)

CONFIG = {"stage": "sft", "seed": 1, "resume": None, "output_dir": "outputs/sft/a",
          "train": {"max_steps": 10, "save_every": 400, "keep_last": 2},
          "logger": {"backend": "none", "run_name": None, "tags": []}, "optim": {"lr": 0.001}}


def _config(**changes) -> dict:
    config = json.loads(json.dumps(CONFIG))
    for key, value in changes.items():
        *parents, leaf = key.split("__")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def _candidate(name: str, step: int, saved_at: float, **changes) -> Candidate:
    return Candidate(Path("outputs/sft") / name, step, saved_at, _config(**changes))


def _pick(*candidates: Candidate):
    return pick(candidates, _config(resume="auto", output_dir="outputs/sft/new"), "sft", Path("outputs/sft"),
                Path("outputs/sft/new"))


# ---------------------------------------------------------------------------------------------------- picking


def test_the_newest_matching_run_is_continued_and_other_configs_are_ignored():
    decision = _pick(_candidate("a", 4, 100.0), _candidate("b", 6, 200.0),
                     _candidate("c", 9, 300.0, optim__lr=0.01))  # newer and further, another config
    assert decision.run_dir == Path("outputs/sft/b") and decision.exit_code is None
    assert decision.message == ("resume=auto: continuing outputs/sft/b from step 6, the newest unfinished sft run "
                                "with this config; 1 older one left alone")


def test_where_the_run_is_written_and_how_it_is_logged_do_not_make_another_config():
    assert config_differences(_config(), _config(resume="auto", output_dir="x", logger__run_name="n",
                                                 logger__tags=["t"], logger__backend="wandb", train__save_every=5,
                                                 train__keep_last=1)) == []
    assert config_differences(_config(), _config(seed=2, train__max_steps=20)) == ["seed", "train.max_steps"]


def test_none_matching_is_a_fresh_start_that_says_why():
    decision = _pick(_candidate("a", 4, 100.0, seed=2), _candidate("b", 4, 200.0, optim__lr=0.1))
    assert decision.run_dir is None and decision.exit_code is None
    assert decision.message == ("resume=auto: none of the 2 unfinished sft runs under outputs/sft/ has this config "
                                "(the newest, outputs/sft/b, differs in optim.lr); starting fresh in outputs/sft/new")
    assert _pick(_candidate("a", 4, 100.0, seed=2)).message == (
        "resume=auto: the one unfinished sft run under outputs/sft/, outputs/sft/a, has another config (differs in "
        "seed); starting fresh in outputs/sft/new")
    assert _pick().message == "resume=auto: no unfinished sft run under outputs/sft/; starting fresh in outputs/sft/new"


def test_a_newest_run_behind_an_older_one_is_ambiguous():
    decision = _pick(_candidate("old", 600, 100.0), _candidate("restarted", 200, 200.0))
    assert decision.run_dir is None and decision.exit_code == 2 and "\n" not in decision.message
    assert "outputs/sft/restarted (step 200), is behind outputs/sft/old (step 600)" in decision.message
    assert "hydra.run.dir=<run dir> resume=auto" in decision.message


def _fake_run(run_dir: Path, step: int, config: dict, rl: bool = False, finished: bool = False) -> Path:
    """A run directory as a run leaves it: config.yaml, a complete checkpoint, and the finished marker."""
    from omegaconf import OmegaConf

    tag = f"step_{step:08d}"
    ckpts = run_dir / "checkpoints"
    if rl:
        (ckpts / "driver").mkdir(parents=True)
        (ckpts / "driver" / f"{tag}.json").write_text("{}")
        (ckpts / "driver" / "latest").write_text(tag)
    else:
        (ckpts / tag).mkdir(parents=True)
        (ckpts / tag / "COMPLETE").write_text(str(step))
        (ckpts / "latest").write_text(tag)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(config))
    if finished:
        (run_dir / ("before_after.json" if rl else "train_state.json")).write_text("{}")
    return run_dir


def test_scan_keeps_runs_with_a_complete_checkpoint_and_no_finished_marker(tmp_path):
    _fake_run(tmp_path / "unfinished", 4, CONFIG)
    _fake_run(tmp_path / "finished", 8, CONFIG, finished=True)
    torn = _fake_run(tmp_path / "torn", 6, CONFIG)
    (torn / "checkpoints" / "step_00000006" / "COMPLETE").unlink()  # `latest` names an incomplete save
    (tmp_path / "no_checkpoint").mkdir()
    (tmp_path / "no_checkpoint" / "config.yaml").write_text("stage: sft\n")
    found = scan(tmp_path, rl=False)
    assert [(c.run_dir.name, c.step) for c in found] == [("unfinished", 4)]
    assert found[0].config == CONFIG

    _fake_run(tmp_path / "ppo" / "unfinished", 3, CONFIG, rl=True)
    _fake_run(tmp_path / "ppo" / "finished", 5, CONFIG, rl=True, finished=True)
    assert [(c.run_dir.name, c.step) for c in scan(tmp_path / "ppo", rl=True)] == [("unfinished", 3)]


def test_a_matching_run_that_is_still_running_is_never_continued(tmp_path):
    run = _fake_run(tmp_path / "live", 4, CONFIG)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
                               "from trainer.resume import hold_run_lock\nhold_run_lock(Path(sys.argv[1]))\n"
                               "print('held', flush=True)\ntime.sleep(120)", str(run)],
                              cwd=REPO, env={**run_env(), "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (found,) = scan(tmp_path, rl=False)
        assert found.running
        decision = _pick(Candidate(Path("outputs/sft/live"), 4, 100.0, _config(), running=True),
                         _candidate("older", 2, 50.0))
        assert decision.exit_code == 2 and decision.run_dir is None
        assert decision.message.startswith("resume=auto: outputs/sft/live (step 4) has this config and is still running")
        # Two launches that decided on the same run at once: the second to lock it stops.
        assert claim(Decision(run, "resume=auto: continuing ...")).exit_code == 2
    finally:
        holder.kill()
        holder.wait()
    (found,) = scan(tmp_path, rl=False)
    assert not found.running  # the kernel dropped the lock of the killed process
    assert claim(Decision(run, "resume=auto: continuing ...")).run_dir == run  # and this process holds it now
    assert hold_run_lock(run) and is_running(run)


# ---------------------------------------------------------------------------------------------------- when, and the command


def test_a_config_that_does_not_compose_says_it_resumes_only_in_its_own_directory():
    from trainer.resume import decide

    decision = decide("sft", ["resume=auto", "train.max_steps=not-a-number"])
    assert decision.run_dir is None and decision.exit_code is None and "\n" not in decision.message
    assert decision.message.startswith("resume=auto: not looking for a run to continue, this launch's config does "
                                       "not compose (") and "train.max_steps" in decision.message


def test_discovery_only_without_an_explicit_run_directory():
    assert wants_discovery(["seed=1", "resume=auto"], {})
    assert not wants_discovery(["seed=1"], {})
    assert not wants_discovery(["resume=auto", "resume=null"], {})
    assert not wants_discovery(["resume=auto", "hydra.run.dir=runs/a"], {})
    assert not wants_discovery(["resume=auto", "output_dir=runs/a"], {})
    assert not wants_discovery(["resume=auto"], {RUN_ID_ENV: "slurm-7"})  # a launcher named the directory
    assert not wants_discovery(["-m", "resume=auto", "seed=1,2"], {})
    assert not wants_discovery(["hydra.mode=MULTIRUN", "resume=auto"], {})


def test_the_resume_command_is_the_typed_command_with_resume_auto():
    assert with_resume_auto(["python", "-m", "trainer.sft", "seed=1"]) == ["python", "-m", "trainer.sft", "seed=1",
                                                                            "resume=auto"]
    assert with_resume_auto(["x", "resume=runs/a", "+resume=b"]) == ["x", "resume=auto", "resume=auto"]
    assert launcher_words(["/usr/bin/python3", "/elsewhere/bin/torchrun", "--nproc_per_node=2", "-m", "trainer.sft",
                           "a=1"]) == ["/elsewhere/bin/torchrun", "--nproc_per_node=2", "-m", "trainer.sft", "a=1"]
    assert launcher_words(["/opt/py", "-m", "torch.distributed.run", "--standalone", "-m", "trainer.sft"])[1:] == [
        "-m", "torch.distributed.run", "--standalone", "-m", "trainer.sft"]
    assert launcher_words(["/opt/py", "-m", "launch.torchrun", "--standalone", "-m", "trainer.sft"])[1:] == [
        "-m", "launch.torchrun", "--standalone", "-m", "trainer.sft"]
    assert launcher_words(["/opt/py", "-u", "-m", "trainer.sft"]) is None  # a rank, not a launcher


# ---------------------------------------------------------------------------------------------------- real runs


def _cli_env() -> dict:
    env = run_env()
    env["PYTHONPATH"] = str(REPO)  # the runs start in a scratch directory, whose outputs/ is the outputs root
    return env


@pytest.mark.distributed
def test_a_run_preempted_in_the_default_directory_continues_with_the_printed_command(tmp_path):
    data = write_sft_jsonl(tmp_path / "sft.jsonl", 600)
    common = [*TINY, f"data.path={data}", "data.eval_path=null", "train.micro_batch_size=4", "train.max_steps=150"]
    runs = tmp_path / "outputs" / "sft"

    def started() -> bool:
        metrics = list(runs.glob("*/metrics.jsonl"))
        return bool(metrics) and len(metrics[0].read_text().splitlines()) >= 3

    first = signal_when([sys.executable, "-m", "trainer.sft", *common], started, signal.SIGUSR1, env=_cli_env(),
                        cwd=tmp_path)
    assert first.returncode == 75, first.stderr[-3000:]
    (run_dir,) = runs.iterdir()
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().split("_")[1])
    assert 3 <= stopped_at < 150
    line = next(l for l in first.stdout.splitlines() if l.startswith("preempted:"))
    command = shlex.split(line.split("to continue: ", 1)[1])
    assert command[-len(common) - 3:] == ["-m", "trainer.sft", *common, "resume=auto"]

    again = subprocess.run(command, cwd=tmp_path, env=_cli_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (f"resume=auto: continuing outputs/sft/{run_dir.name} from step {stopped_at}, the newest unfinished sft "
            f"run with this config") in again.stdout
    assert f"resumed from {run_dir}/checkpoints/step_{stopped_at:08d} at step {stopped_at}" in again.stdout
    assert list(runs.iterdir()) == [run_dir], "the rerun made a directory of its own"
    assert (run_dir / "train_state.json").exists()

    # The straight run, for comparison, with resume=auto where there is nothing to continue: a fresh start in
    # the directory it names.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    straight = subprocess.run(command, cwd=elsewhere, env=_cli_env(), capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    line = next(l for l in straight.stdout.splitlines() if l.startswith("resume=auto:"))
    assert line.startswith("resume=auto: no unfinished sft run under outputs/sft/; starting fresh in outputs/sft/")
    straight_dir = elsewhere / line.rsplit(" ", 1)[1]
    assert list((elsewhere / "outputs" / "sft").iterdir()) == [straight_dir]
    ls, lr = losses(straight_dir), losses(run_dir)
    assert sorted(lr) == list(range(1, 151))
    for step in range(1, 151):
        assert ls[step] == pytest.approx(lr[step], rel=1e-5, abs=1e-6), (step, ls[step], lr[step])


@pytest.mark.distributed
@pytest.mark.slow
def test_both_ranks_of_a_preempted_torchrun_launch_continue_in_its_directory(tmp_path):
    """The printed command is the torchrun line as typed; rank 0 picks the run and both ranks write there."""
    import psutil

    data = write_sft_jsonl(tmp_path / "sft.jsonl", 200)
    common = [*TINY, f"data.path={data}", "data.eval_path=null", "train.micro_batch_size=2", "train.max_steps=40"]
    typed = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.sft",
             *common]
    runs = tmp_path / "outputs" / "sft"
    proc = subprocess.Popen(typed, cwd=tmp_path, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        while proc.poll() is None and not any(len(m.read_text().splitlines()) >= 3 for m in runs.glob("*/metrics.jsonl")):
            time.sleep(0.2)
        for rank in psutil.Process(proc.pid).children():  # as a scheduler signals every task
            rank.send_signal(signal.SIGUSR1)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    (run_dir,) = runs.iterdir()
    stopped_at = int((run_dir / "checkpoints" / "latest").read_text().split("_")[1])
    line = next((l for l in out.splitlines() if l.startswith("preempted:")), None)
    assert line and stopped_at < 40, err[-3000:]
    command = shlex.split(line.split("to continue: ", 1)[1])
    assert command[1:] == [*typed[1:], "resume=auto"]

    again = subprocess.run(command, cwd=tmp_path, env=_cli_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count(f"resume=auto: continuing outputs/sft/{run_dir.name} from step {stopped_at},") == 1
    assert list(runs.iterdir()) == [run_dir]
    assert json.loads((run_dir / "train_state.json").read_text())["world_size"] == 2
    assert sorted(losses(run_dir)) == list(range(1, 41))
    assert {p.name for p in (run_dir / "checkpoints" / "step_00000040").glob("rng_rank*.pt")} == {
        "rng_rank0.pt", "rng_rank1.pt"}


def test_two_candidates_that_disagree_stop_the_run_in_one_line(tmp_path):
    """Before anything loads: exit 2, one line naming both runs."""
    from trainer.resume import launch_config

    overrides = [*TINY, "train.max_steps=50", "resume=auto"]
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        config, _ = launch_config("sft", overrides)
    finally:
        os.chdir(cwd)
    runs = tmp_path / "outputs" / "sft"
    _fake_run(runs / "2026-01-01_00-00-00", 40, config)
    newer = _fake_run(runs / "2026-01-02_00-00-00", 10, config)
    os.utime(newer / "checkpoints" / "latest", (2e9, 2e9))
    proc = subprocess.run([sys.executable, "-m", "trainer.sft", *overrides], cwd=tmp_path, env=_cli_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "error: resume=auto: 2 unfinished sft runs have this config and the newest, outputs/sft/2026-01-02_00-00-00 "
        "(step 10), is behind outputs/sft/2026-01-01_00-00-00 (step 40); choose one: hydra.run.dir=<run dir> "
        "resume=auto"]
    assert sorted(p.name for p in runs.iterdir()) == ["2026-01-01_00-00-00", "2026-01-02_00-00-00"]
