"""The RL run's checkpoint (rlhf.checkpoint) under faults, with real GRPO runs on a local Ray instance: a failed
write and a SIGKILL of the driver between the policy's checkpoint and the driver's state, resume from another run's
directory, and the inputs a run's first start resolved staying pinned on resume (a newer export never slips in; a
changed path is refused)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.checkpoint import INPUTS, STATE_DIR, failure_note, pin_inputs, resolved_inputs
from runs import PPO_SMALL, REPO, marked, processes_of, run_env, tiny_ppo_model
from test_ppo import iterations_done, records, run_ppo
from trainer.checkpoint import COMPLETE, LATEST, torn
from trainer.compose import compose, to_typed

# One policy rank (each rank is a process to start): what is tested here is the driver's commit, not the ranks'
# (a 2-rank policy's checkpoints resume in tests/test_grpo.py, unpartitioned, and tests/test_ppo.py, under ZeRO-3).
GRPO = ["algo=grpo", "rollout.prompts_per_iteration=4", "algo.mini_batch_size=8", "actor.micro_batch_size=4",
        "actor.devices_per_node=1"]
COMPARED = ("reward/score_raw_mean", "policy/loss", "policy/approx_kl", "response/length_mean")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> list[str]:
    return tiny_ppo_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model) -> Path:
    run = tmp_path_factory.mktemp("rl_ckpt") / "straight"
    run_ppo(run, tiny_model, *GRPO, "train.iterations=3", "train.save_every=1", "train.keep_last=1")
    return run


@pytest.mark.distributed
def test_a_crash_between_the_policy_checkpoint_and_the_driver_state_still_resumes(straight, tiny_model, tmp_path):
    run = tmp_path / "crash"
    ckpts = run / "checkpoints"
    # The driver's state of iteration 2 cannot be written (a directory where its temporary file goes): the
    # policy has saved iteration 2, the driver dies before committing it. keep_last=1 used to prune
    # iteration 1 at the policy's save, leaving nothing that could resume.
    blocker = ckpts / STATE_DIR / "step_00000002.json.tmp"
    blocker.mkdir(parents=True)
    common = [*GRPO, "train.iterations=3", "train.save_every=1", "train.keep_last=1"]
    proc = run_ppo(run, tiny_model, *common, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "iteration 2 was not committed" in proc.stderr and "still names step_00000001" in proc.stderr
    assert "(the last committed iteration, step_00000001, is intact; to continue: " in proc.stderr
    assert (ckpts / STATE_DIR / LATEST).read_text() == "step_00000001"
    assert torn(ckpts / "actor" / "step_00000001") is None
    assert torn(ckpts / "actor" / "step_00000002") is None  # saved, never committed

    blocker.rmdir()
    proc = run_ppo(run, tiny_model, *common, "resume=auto")
    assert "resumed from" in proc.stdout and "after iteration 1" in proc.stdout
    a, b = records(straight), records(run)
    for step in (2, 3):  # retrained from iteration 1: the straight run's numbers
        for key in COMPARED:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-5), (step, key)
    assert sorted(p.name for p in (ckpts / "actor").glob("step_*")) == ["step_00000003"]  # pruned after commit
    assert sorted(p.name for p in (ckpts / STATE_DIR).glob("step_*.json")) == ["step_00000003.json"]


@pytest.mark.distributed
def test_a_driver_killed_between_the_policy_checkpoint_and_its_state_resumes(straight, tiny_model, tmp_path):
    """A literal SIGKILL of the driver at that point: a FIFO where the temporary file of its iteration-2 state goes
    holds it in open() once the policy has saved iteration 2, so the kill lands after the policy's save and before
    the driver's commit, however fast the run."""
    run = tmp_path / "killed"
    ckpts = run / "checkpoints"
    blocker = ckpts / STATE_DIR / "step_00000002.json.tmp"
    blocker.parent.mkdir(parents=True)
    os.mkfifo(blocker)
    common = [*GRPO, "train.iterations=3", "train.save_every=1", "train.keep_last=1"]
    env = {**run_env(), **marked()}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # as run_ppo runs it
    cmd = [sys.executable, "-m", "rlhf.ppo", *tiny_model, *PPO_SMALL, *common, f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        saved = ckpts / "actor" / "step_00000002" / COMPLETE
        while time.time() < deadline and proc.poll() is None and not saved.exists():
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in processes_of(env):  # a killed driver cannot stop what it started: Ray's servers and actors
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert (ckpts / STATE_DIR / LATEST).read_text() == "step_00000001"
    assert torn(ckpts / "actor" / "step_00000001") is None  # the only committed iteration, kept whole
    blocker.unlink()

    proc = run_ppo(run, tiny_model, *common, "resume=auto")
    assert "resumed from" in proc.stdout and "after iteration 1" in proc.stdout
    a, b = records(straight), records(run)
    for step in (2, 3):
        for key in COMPARED:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-5), (step, key)


@pytest.mark.distributed
def test_resume_from_another_run_directory_continues_it_in_this_one(straight, tiny_model, tmp_path):
    run = tmp_path / "more"
    proc = run_ppo(run, tiny_model, *GRPO, "train.iterations=5", "train.save_every=1", f"resume={straight}")
    assert f"resumed from {straight / 'checkpoints' / 'step_00000003'}" in proc.stdout
    assert iterations_done(run) == [4, 5]
    # The starting evaluation is the first run's; this run's checkpoints and inputs are its own.
    assert json.loads((run / "eval_start.json").read_text()) == json.loads((straight / "eval_start.json").read_text())
    assert (run / "before_after.txt").exists()
    assert (run / "checkpoints" / STATE_DIR / LATEST).read_text() == "step_00000005"
    assert json.loads((run / "checkpoints" / STATE_DIR / INPUTS).read_text()) == \
        json.loads((straight / "checkpoints" / STATE_DIR / INPUTS).read_text())


@pytest.mark.distributed
def test_a_policy_path_changed_on_resume_is_refused_before_anything_starts(straight, tiny_model, tmp_path):
    other = tiny_ppo_model(tmp_path / "other_model")
    proc = run_ppo(tmp_path / "changed", other, *GRPO, "train.iterations=5", f"resume={straight}", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: actor.model.name_or_path={tmp_path / 'other_model'}: this run started from ")
    assert "refused" in last


def test_a_failure_says_what_is_left_to_resume_from(tmp_path):
    assert failure_note(tmp_path) == "no iteration was committed before it; to start again"
    (tmp_path / "checkpoints" / STATE_DIR).mkdir(parents=True)
    (tmp_path / "checkpoints" / STATE_DIR / LATEST).write_text("step_00000004")
    assert failure_note(tmp_path) == "the last committed iteration, step_00000004, is intact; to continue"


def test_a_newer_export_does_not_slip_into_a_resumed_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for run in ("2026-01-01_00-00-00", "2026-02-01_00-00-00"):
        (tmp_path / "outputs" / "sft" / run / "hf_model").mkdir(parents=True)
        (tmp_path / "outputs" / "sft" / run / "train_state.json").write_text("{}")
    first = Path("outputs/sft/2026-01-01_00-00-00/hf_model")
    overrides = ["algo=grpo", "algo.kl_coef=0.04"]  # a reference too: it follows the policy's path
    dcfg = compose("ppo", overrides, typed=False)
    cfg = to_typed(dcfg.copy(), overrides)
    pinned = resolved_inputs(cfg, None)
    pinned["models"]["actor"]["name_or_path"] = pinned["models"]["reference"]["name_or_path"] = str(first)
    notes = pin_inputs(cfg, dcfg, pinned)
    assert cfg.actor.model.name_or_path == cfg.reference.model.name_or_path == str(first)
    assert dcfg.actor.model.name_or_path == str(first)  # what config.yaml records
    assert len(notes) == 2 and "as at this run's first start (it would now resolve to outputs/sft/2026-02-01" in notes[0]


def test_another_layout_on_resume_is_refused_before_any_model_loads(tmp_path):
    from rlhf.checkpoint import ResumePoint, check_layout
    from trainer.config import ConfigError

    cfg = compose("ppo", ["algo=grpo", "actor.model.name_or_path=/m", "actor.devices_per_node=4"])
    point = ResumePoint(tmp_path, "step_00000003", {"world_sizes": {"actor": 2, "reward": 1}}, None)
    with pytest.raises(ConfigError, match=r"written with ranks \{'actor': 2, 'reward': 1\}, this run has "
                                          r"\{'actor': 4, 'reward': 1\}.*devices_per_node as they were"):
        check_layout(point, cfg)


def test_another_zero_stage_on_resume_is_refused_before_any_model_loads(tmp_path):
    """The policy's checkpoint was written under ZeRO-3; with deepspeed.stage=auto this small policy would train
    unpartitioned on its 2 ranks, which cannot read it: one line naming the stage to rerun with."""
    from rlhf.checkpoint import ResumePoint, check_stages
    from trainer.checkpoint import MANIFEST
    from trainer.config import ConfigError

    cfg = compose("ppo", ["algo=grpo", "actor.model.name_or_path=null"])
    assert cfg.zero_stage("actor")[0].stage == 0
    tag_dir = tmp_path / "actor" / "step_00000003"
    tag_dir.mkdir(parents=True)
    (tag_dir / MANIFEST).write_text(json.dumps({"world_size": 2, "zero_stage": 3, "files": {}}))
    point = ResumePoint(tmp_path, "step_00000003", {"world_sizes": {"actor": 2, "reward": 1}}, None)
    with pytest.raises(ConfigError, match=r"written under ZeRO stage 3, this run trains under stage 0; a checkpoint "
                                          r"resumes at its own stage: rerun with actor\.deepspeed\.stage=3"):
        check_stages(point, cfg)
    (tag_dir / MANIFEST).write_text(json.dumps({"world_size": 2, "zero_stage": 0, "files": {}}))
    check_stages(point, cfg)  # the stage it was written with
    # A checkpoint from before the manifest recorded the stage: ZeRO-3's per-rank model states say it.
    (tag_dir / MANIFEST).write_text(json.dumps({"world_size": 2, "files": {}}))
    check_stages(point, cfg)  # nothing says which stage wrote it: DeepSpeed's load is the judge
    (tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"written under ZeRO stage 3, this run trains under stage 0"):
        check_stages(point, cfg)
