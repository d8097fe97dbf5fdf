"""Hydra sweeps (`-m`): what each member records (trainer.sweep), the sweep summary, W&B grouping read
back from W&B's own offline records, and the launcher/sweeper presets of conf/hydra/: Optuna on the
basic launcher, the Ray launcher on a loopback Ray, submitit on the local SLURM cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reports import assert_report
from runs import REPO, TINY, run_env, write_sft_jsonl
from slurm import kill_jobs, slurm_cluster, slurm_node, wait_until_gone  # noqa: F401 (fixtures)
from wandb_records import read_offline_run

# Members of a few steps that end with one evaluation (the objective a sweeper reads).
MEMBER = [*TINY, "train.max_steps=3", "train.micro_batch_size=4", "train.eval_every=3", "train.eval_max_batches=2",
          "train.eval_generate_samples=0"]


def sweep(sweep_dir: Path, *overrides: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    data = write_sft_jsonl(sweep_dir.parent / "sft.jsonl", 200)
    cmd = [sys.executable, "-m", "trainer.sft", "-m", *MEMBER, f"data.path={data}", f"data.eval_path={data}",
           *overrides, f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env or run_env(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def summary(sweep_dir: Path) -> list[dict]:
    members = json.loads((sweep_dir / "sweep_summary.json").read_text())["members"]
    assert (sweep_dir / "sweep_summary.md").read_text().count("\n") == len(members) + 2
    return members


def assert_members_completed(members: list[dict], sweep_dir: Path, key: str) -> None:
    """Each member trained in its own directory with its own swept value, and reported its objective."""
    from omegaconf import OmegaConf

    assert [m["member"] for m in members] == [str(i) for i in range(len(members))]
    for m in members:
        evaluated = json.loads((sweep_dir / m["member"] / "eval_metrics.json").read_text())
        assert m["status"] == "COMPLETED" and evaluated["step"] == 3
        assert m["objective"] == pytest.approx(evaluated["eval/loss"]) == pytest.approx(m["metrics"]["eval/loss"])
        assert len(m["swept"]) == 1 and m["swept"][0].startswith(f"{key}=") and m["swept"][0] in m["overrides"]
        resolved = OmegaConf.load(sweep_dir / m["member"] / "config.yaml")
        assert OmegaConf.select(resolved, key) == pytest.approx(float(m["swept"][0].split("=")[1]))
    assert len({m["swept"][0] for m in members}) == len(members)


# ----------------------------------------------------------------------------------------- pure pieces


def test_swept_keys_are_command_line_sweeps_and_the_sweepers_search_space():
    from trainer.sweep import only_swept, swept_keys

    keys = swept_keys(["optim.lr=1e-3,2e-3", "train.max_steps=4", "seed=range(1,3)", "logger=wandb",
                       "train.micro_batch_size=choice(8,16)"], {"optim.weight_decay": "interval(0, 0.1)"})
    assert keys == ["optim.lr", "optim.weight_decay", "seed", "train.micro_batch_size"]
    member = ("optim.lr=0.001", "train.max_steps=4", "seed=2", "+extra.flag=1")
    assert only_swept(member, keys) == ("optim.lr=0.001", "seed=2")
    assert only_swept(member, None) == member  # nothing recorded: everything


def test_a_members_logger_joins_the_sweeps_group_unless_one_is_named(tmp_path):
    from trainer.config import LoggerConfig
    from trainer.sweep import SweepMember, tag_logger

    member = SweepMember(tmp_path / "multirun" / "sft" / "2026-11-26_10-00-00", 1,
                         ("optim.lr=0.002", "train.max_steps=4"), ("optim.lr=0.002",))
    cfg, config = tag_logger(LoggerConfig(backend="wandb"), {"seed": 1}, member)
    assert (cfg.group, cfg.run_name) == ("sft-2026-11-26_10-00-00", "1: optim.lr=0.002")
    assert config["seed"] == 1 and config["sweep"]["overrides"] == ["optim.lr=0.002", "train.max_steps=4"]
    named, _ = tag_logger(LoggerConfig(group="mine", run_name="r"), {}, member)
    assert (named.group, named.run_name) == ("mine", "r")
    assert tag_logger(LoggerConfig(), {"seed": 1}, None) == (LoggerConfig(), {"seed": 1})


def test_final_metrics_keep_each_metrics_last_value_and_skip_a_cut_line(tmp_path):
    from trainer.sweep import final_metrics

    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "time": 1.0, "train/loss": 3.0}\n{"step": 2, "time": 2.0, "train/loss": 2.5, "eval/loss": 2.7}\n'
        '{"step": 3, "time": 3.0, "train/loss": 2.1}\n{"step": 4, "train/lo')
    assert final_metrics(tmp_path) == {"step": 3, "train/loss": 2.1, "eval/loss": 2.7}
    assert final_metrics(tmp_path / "missing") == {}


def test_summary_marks_a_member_that_left_no_result_as_failed(tmp_path):
    from trainer.sweep import summarise, summary_markdown

    (tmp_path / "swept_keys.json").write_text('["optim.lr"]')
    for num, lr in ((0, "0.001"), (2, "0.002"), (10, "0.003")):
        member = tmp_path / str(num)
        (member / ".hydra").mkdir(parents=True)
        (member / ".hydra" / "overrides.yaml").write_text(f"- train.max_steps=4\n- optim.lr={lr}\n")
        (member / "metrics.jsonl").write_text(json.dumps({"step": 4, "eval/loss": 2.0 + num}) + "\n")
    (tmp_path / "0" / "job_result.json").write_text('{"status": "COMPLETED", "objective": 2.0}')
    members = summarise(tmp_path)
    assert [(m["member"], m["swept"], m["status"], m["objective"]) for m in members] == [
        ("0", ["optim.lr=0.001"], "COMPLETED", 2.0), ("2", ["optim.lr=0.002"], "FAILED", None),
        ("10", ["optim.lr=0.003"], "FAILED", None)]  # in numeric order (as text, 10 comes before 2)
    table = summary_markdown(members).splitlines()
    assert table[0] == "| member | swept values | status | objective | step | eval/loss |"
    assert table[2] == "| 0 | optim.lr=0.001 | COMPLETED | 2 | 4 | 2 |"
    assert table[3] == "| 2 | optim.lr=0.002 | FAILED | - | 4 | 4 |"


def test_submitit_tasks_become_the_ranks_of_one_world(monkeypatch):
    from trainer.sweep import join_submitit_ranks

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "CUDA_VISIBLE_DEVICES"):
        # set, then delete: monkeypatch restores only what it changed, and the export below writes
        # these straight into os.environ (a RANK left behind would hang every later run in this process)
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    join_submitit_ranks()  # not a submitit job: nothing changes
    assert "RANK" not in os.environ
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
             "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    join_submitit_ranks()
    env = os.environ
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("3", "4", "1", "gpu07")
    assert 20000 <= int(env["MASTER_PORT"]) <= 60000 and "CUDA_VISIBLE_DEVICES" not in env


# ------------------------------------------------------------------------------------------- real sweeps


@pytest.mark.slow
def test_optuna_sweep_members_are_grouped_wandb_runs_and_the_summary_names_the_best(tmp_path):
    secret = "sk-test-0123456789abcdef"
    env = run_env()
    env.update(WANDB_API_KEY=secret, HF_TOKEN=secret)
    env.pop("WANDB_MODE", None)
    sweep_dir = tmp_path / "multirun" / "sft" / "s1"
    sweep(sweep_dir, "hydra/sweeper=optuna_search", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2",
          "logger=wandb", "logger.mode=offline", env=env)

    members = summary(sweep_dir)
    assert len(members) == 2
    assert_members_completed(members, sweep_dir, "optim.lr")
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(m["objective"] for m in members))
    # The sweep's report: the objective per member with Optuna's best highlighted, the members' curves overlaid.
    subprocess.run([sys.executable, "-m", "trainer.report", str(sweep_dir)], cwd=REPO, env=env, check=True)
    plots = assert_report(sweep_dir, [sweep_dir], {"sweep_objective", "loss", "lr"})
    bars = plots[0]
    assert bars.values == [m["objective"] for m in members] and bars.values[bars.best] == best["best_value"]
    assert {c.run for c in plots[1].curves} == {f"{m['member']}: {m['swept'][0]}" for m in members}

    for m in members:
        run_file, = (sweep_dir / m["member"] / "wandb").glob("offline-run-*/run-*.wandb")
        run = read_offline_run(run_file)
        # The id a requeued member resumes with is the one W&B wrote.
        assert run.run_id == (sweep_dir / m["member"] / "wandb_run_id").read_text()
        assert (run.group, run.job_type, run.name) == ("sft-s1", "sft", f"{m['member']}: {m['swept'][0]}")
        assert run.config["sweep"]["overrides"] == m["overrides"] and run.config["stage"] == "sft"
        assert run.config["optim"]["lr"] == pytest.approx(float(m["swept"][0].split("=")[1]))
        assert [h["_step"] for h in run.history if "train/loss" in h] == [1, 2, 3]
        assert run.summary["eval/loss"] == pytest.approx(m["objective"])
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"secret leaked into {path}"


@pytest.mark.slow
def test_ray_launcher_runs_each_member_as_a_task_on_a_loopback_ray(tmp_path):
    sweep_dir = tmp_path / "sweep"
    env = run_env()
    env.pop("RAY_ADDRESS", None)
    proc = sweep(sweep_dir, "hydra/launcher=ray_cluster", "optim.lr=1e-3,2e-3", env=env)
    assert "(_run_job pid=" in proc.stdout + proc.stderr  # the members' output came back through Ray
    assert_members_completed(summary(sweep_dir), sweep_dir, "optim.lr")
    assert json.loads((sweep_dir / "swept_keys.json").read_text()) == ["optim.lr"]


@pytest.mark.slurm
def test_submitit_sweep_runs_each_member_as_a_two_rank_slurm_job(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    jobs = lambda: [p.name for p in (sweep_dir / ".submitit").glob("*") if p.name.isdigit()]  # array ids
    try:
        sweep(sweep_dir, "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
              "hydra.launcher.timeout_min=10", "optim.lr=1e-3,2e-3", timeout=420)
    except BaseException:  # submitit waits forever on a job that died without telling: leave none behind
        if jobs():
            kill_jobs(jobs())
        raise
    finally:  # a member's result is written before its job ends; the next test needs the CPUs
        if jobs():
            wait_until_gone(jobs())
    members = summary(sweep_dir)
    assert_members_completed(members, sweep_dir, "optim.lr")
    for m in members:  # each member one DeepSpeed world of its job's two tasks
        state = json.loads((sweep_dir / m["member"] / "train_state.json").read_text())
        assert state["world_size"] == 2 and state["samples_seen"] == 3 * 4 * 2
