"""Hangs have limits: a rank stuck in a collective gives up after train.collective_timeout_s (every process group,
DeepSpeed's included); the RL driver gives up on a role's call after cluster.call_timeout_s and, once a preemption
signal has come, after cluster.preemption_wait_s of it. The driver's waits with stand-in refs, a 2-rank gloo group,
and real GRPO runs whose reward function hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from runs import PPO_SMALL, REPO, committed, left_behind, marked, run_env, signal_when, tiny_ppo_model

import rlhf.group as group
from trainer.preemption import PreemptionFlag

# ------------------------------------------------------------------------------------------ the driver's waits


@pytest.fixture
def stand_in_refs(monkeypatch):
    """Ray's wait and get over stand-in refs: those in `answered` are ready at once (their value is the ref),
    the others never are."""
    answered: set = set()

    def wait(refs, num_returns, timeout):
        ready = [r for r in refs if r in answered][:num_returns]
        if not ready:
            time.sleep(timeout)
        return ready, [r for r in refs if r not in ready]

    monkeypatch.setattr(group, "POLL_S", 0.05)
    monkeypatch.setattr(group.ray, "wait", wait)
    monkeypatch.setattr(group.ray, "get", lambda ref: ref)
    return answered


def fake_group(role: str, nodes: list[str], **limits) -> SimpleNamespace:
    return SimpleNamespace(role=role, nodes=nodes, limits=group.WaitLimits(**limits))


def test_a_call_not_answered_within_the_call_timeout_names_the_role_rank_node_and_call(stand_in_refs):
    stand_in_refs.update({"r0", "a0"})
    reward = fake_group("reward", ["10.0.0.7", "10.0.0.8", "10.0.0.9"], call_timeout_s=0.3)
    actor = fake_group("actor", ["10.0.0.1"], call_timeout_s=60)
    t0 = time.monotonic()
    with pytest.raises(group.CallTimeout, match=r"^reward rank 1 on node 10\.0\.0\.8 did not answer scores within "
                                                r"cluster\.call_timeout_s=0\.3s \(nor did rank 2\)$") as err:
        group.wait_all([group.PendingCall(actor, "log_probs", ["a0"]),
                        group.PendingCall(reward, "scores", ["r0", "r1", "r2"])])
    assert 0.3 <= time.monotonic() - t0 < 2
    assert isinstance(err.value, group.RoleFailure)  # ends the run as a dead rank does: exit 1, actors killed

    stand_in_refs.update({"r1", "r2"})  # answered in time: the results, by rank
    assert group.wait_all([group.PendingCall(reward, "scores", ["r0", "r1", "r2"])]) == [["r0", "r1", "r2"]]


def test_after_a_preemption_signal_a_call_gets_the_preemption_wait_not_the_call_timeout(stand_in_refs):
    flag = PreemptionFlag()
    try:
        reward = fake_group("reward", ["127.0.0.1"], call_timeout_s=3600, preemption_wait_s=0.5, preemption=flag)
        stand_in_refs.add("done")
        assert group.wait_all([group.PendingCall(reward, "scores", ["done"])]) == [["done"]]  # no signal yet
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested
        # a call that answers in time after the signal still counts (the iteration finishes and is saved)
        assert group.wait_all([group.PendingCall(reward, "scores", ["done"])]) == [["done"]]
        t0 = time.monotonic()
        with pytest.raises(group.PreemptedInCall, match=r"^reward rank 0 on node 127\.0\.0\.1 did not answer save "
                                                        r"within cluster\.preemption_wait_s=0\.5s of the signal$"):
            group.wait_all([group.PendingCall(reward, "save", ["hung"])])
        assert time.monotonic() - t0 < 2
    finally:
        flag.restore()


# ------------------------------------------------------------------------------------------ collectives

COLLECTIVE_RANK = textwrap.dedent("""
    import sys, time
    import torch, torch.distributed as dist
    from deepspeed.utils import groups
    from trainer.config import DeepSpeedConfig
    from trainer.engine import build_deepspeed_config, build_engine, init_distributed

    info = init_distributed(collective_timeout_s=float(sys.argv[1]))
    ds_config = build_deepspeed_config(DeepSpeedConfig(stage=0, precision="fp32"), 1, 1, info.world_size, 1.0)
    build_engine(torch.nn.Linear(2, 2), DeepSpeedConfig(stage=0), None, ds_config)
    dist.barrier()
    if info.rank == 1:  # a peer that never comes
        time.sleep(120)
    for name, g in (("default", None), ("deepspeed", groups._get_data_parallel_group())):
        t0 = time.monotonic()
        try:
            dist.all_reduce(torch.ones(1), group=g)
        except Exception as e:
            print(f"{name} gave up after {time.monotonic() - t0:.1f}s: {str(e).splitlines()[0]}", flush=True)
""")


@pytest.mark.distributed
def test_a_rank_waiting_for_a_peer_gives_up_after_the_collective_timeout_in_every_group(tmp_path):
    """The default group and the copy of it DeepSpeed's engine makes (dist.new_group, which takes torch's
    30-minute default unless set) both give up after train.collective_timeout_s."""
    from trainer.engine import free_port

    script = tmp_path / "rank.py"
    script.write_text(COLLECTIVE_RANK)
    env = {**run_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, str(script), "2"], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    try:
        out, err = procs[0].communicate(timeout=180)
    finally:
        for p in procs:
            p.kill()
    gave_up = [line for line in out.splitlines() if "gave up after" in line]
    assert [line.split()[0] for line in gave_up] == ["default", "deepspeed"], out + err[-3000:]
    for line in gave_up:
        assert 1.5 <= float(line.split("after ")[1].split("s:")[0]) < 10, line


# ------------------------------------------------------------------------------------------ a hung reward function

# One policy rank: the hang is the reward role's (the default two ranks' layout runs in tests/test_grpo.py).
GRPO = ["algo=grpo", "rollout.prompts_per_iteration=4", "algo.mini_batch_size=8", "actor.micro_batch_size=4",
        "reward_source=exact_match", "actor.devices_per_node=1"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> list[str]:
    return tiny_ppo_model(tmp_path_factory.mktemp("tiny_model"))


def hung_run(run_dir: Path, model: list[str], *overrides: str) -> tuple[list[str], dict, Path]:
    """The command, environment and hang marker of a GRPO run whose reward function hangs in iteration 2 (the
    start evaluation scores twice, iteration 1 once): iteration 1 is checkpointed first. The environment carries
    a mark of this run, which every Ray process it starts inherits."""
    marker = run_dir.parent / f"{run_dir.name}.hanging"
    fn = f"[{{_target_: ppo_faults.hang_on_call, call: 4, marker: '{marker}'}}]"
    cmd = [sys.executable, "-m", "rlhf.ppo", *model, *PPO_SMALL, *GRPO, "train.iterations=4", "train.save_every=1",
           f"reward.functions={fn}", *overrides, f"hydra.run.dir={run_dir}"]
    env = run_env()
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # as users run it: the driver keeps Ray on loopback
    env.update(PYTHONPATH=str(REPO / "tests"), **marked())
    return cmd, env, marker


@pytest.mark.distributed
def test_a_hung_reward_function_ends_the_run_within_the_call_timeout_naming_the_role(tiny_model, tmp_path):
    run = tmp_path / "hung"
    cmd, env, marker = hung_run(run, tiny_model, "cluster.call_timeout_s=20")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    ended = time.time()
    assert proc.returncode == 1 and marker.exists(), proc.stderr[-3000:]
    hung_for = ended - float(marker.read_text())
    assert 18 <= hung_for < 20 + 30, hung_for  # the timeout, then the actors killed and Ray stopped
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert error and "error: reward rank 0 on node 127.0.0.1 did not answer scores within cluster.call_timeout_s=20s" \
        in error[-1], proc.stderr[-3000:]
    assert "to continue:" in error[-1]
    assert committed(run) == 1
    assert not left_behind(env)


@pytest.mark.distributed
def test_a_preemption_signal_during_a_hang_ends_the_run_within_the_preemption_wait(tiny_model, tmp_path):
    run = tmp_path / "preempted"
    cmd, env, marker = hung_run(run, tiny_model, "cluster.call_timeout_s=600", "cluster.preemption_wait_s=3")
    proc = signal_when(cmd, marker.exists, signal.SIGTERM, env=env)
    ended = time.time()
    assert proc.returncode == 75, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert ended - float(marker.read_text()) < 3 + 30
    line = next(line for line in proc.stdout.splitlines() if line.startswith("preempted:"))
    assert ("reward rank 0 on node 127.0.0.1 did not answer scores within cluster.preemption_wait_s=3s of the signal; "
            "the iteration in flight is not saved, the last saved iteration, 1, is where it continues; to continue: "
            in line), line
    assert "resume=auto" in line
    assert committed(run) == 1
    assert not left_behind(env)
