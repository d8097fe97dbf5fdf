"""launch.slurm against the real one-node SLURM cluster (scripts/slurm_local.sh): a 2-rank ZeRO-3
SFT job preempted (SIGUSR1, as before a time limit), requeued by its own script and resumed, and a
PPO job on a Ray cluster formed inside the allocation, preempted by SLURM itself for a job of a
higher partition (its --signal at once, so the iteration in flight is saved) and by SIGTERM to every
process, requeued and resumed each time. Several nodes cannot be had here;
tests/test_launch.py runs the same scripts on two simulated nodes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runs import PPO_SMALL, REPO, TINY, committed, run_env, tiny_ppo_model, write_sft_jsonl
from slurm import job_info, send_signal, slurm_cluster, slurm_node, submit, wait_for  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slurm


def launch(stage: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "launch.slurm", stage, *args], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def train_steps(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "train/loss" in line]


def iterations(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [json.loads(x)["step"] for x in metrics.read_text().splitlines() if "time/iteration_s" in x]


def wait_until(cond, timeout: float, what: str, job: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        state = job_info(job)["JobState"]
        assert time.monotonic() < deadline and state in ("PENDING", "RUNNING", "CONFIGURING"), \
            f"{what}: job {job} is {state}"
        time.sleep(0.5)


def test_sft_job_trains_on_two_ranks_is_preempted_requeues_itself_and_resumes(slurm_cluster, tmp_path):
    data = write_sft_jsonl(tmp_path / "sft.jsonl", 400)
    run_dir, final = tmp_path / "run", 30
    job = launch("sft", "--procs-per-node", "2", "--cpus-per-task", "2", "--grace", "60",
                 "--log-dir", str(tmp_path / "logs"), *TINY, f"data.path={data}", "data.eval_path=null",
                 "train.micro_batch_size=2", "deepspeed=zero3", f"train.max_steps={final}", f"hydra.run.dir={run_dir}")
    wait_until(lambda: len(train_steps(run_dir)) >= 3, 300, "3 steps", job)
    send_signal(job, "USR1", batch=True)  # what --signal=B:USR1@grace does before the time limit
    wait_for(job, "PENDING", timeout=120)  # the script saw the run save, and requeued the job
    tag = (run_dir / "checkpoints" / "latest").read_text()
    stopped_at = int(tag.split("_")[1])
    assert (run_dir / "checkpoints" / tag / "COMPLETE").exists() and 3 <= stopped_at < final
    # It starts again by itself once its credential expires (AuthInfo=cred_expire, 10 s on the local cluster).
    wait_for(job, "COMPLETED", timeout=300)
    log = Path(job_info(job)["StdOut"]).read_text(errors="replace")  # tqdm bars cut mid-character
    assert "USR1 received" in log and "requeueing job" in log and "restart 1" in log
    assert "world_size=2" in log and "zero_stage=3" in log
    steps = train_steps(run_dir)
    assert max(steps) == final and steps.count(stopped_at + 1) == 1, "resumed after the checkpoint"


def test_ppo_job_forms_a_ray_cluster_is_preempted_requeues_itself_resumes_and_stops_ray(slurm_cluster, tmp_path):
    """What a preemption does, SIGTERM to every process of the job (`scancel --signal=TERM --full`): the Ray
    steps stop with it, so the iteration in flight cannot be saved; the job requeues itself, the run resumes from
    its last committed iteration and finishes, and each attempt's Ray cluster is gone with it. (SIGUSR1 before a
    time limit goes to the batch script alone, which passes it to the driver: the iteration is saved, as in
    tests/test_ppo.py.)"""
    model = tiny_ppo_model(tmp_path / "model")
    # 12 iterations, of which the signal needs 2 committed: on a loaded machine the 6 this test had were all done
    # before the signal, polled every half second through scontrol, reached the job.
    run_dir, final = tmp_path / "ppo", 12
    # One node here, so the head may stay on loopback; 5 CPU slots for the 5 role actors.
    job = launch("ppo", "--cpus-per-task", "2", "--ray-head-ip", "127.0.0.1", "--ray-cpus-per-node", "6",
                 "--grace", "60", "--log-dir", str(tmp_path / "logs"), *model, *PPO_SMALL,
                 f"train.iterations={final}", "train.save_every=1", f"hydra.run.dir={run_dir}")
    wait_until(lambda: committed(run_dir) >= 2, 400, "2 committed iterations", job)
    send_signal(job, "TERM", full=True)
    wait_for(job, "PENDING", timeout=120)  # the script saw the run end after the warning, and requeued the job
    kept = committed(run_dir)
    assert 2 <= kept < final
    wait_for(job, "COMPLETED", timeout=400)
    log = Path(job_info(job)["StdOut"]).read_text(errors="replace")  # tqdm bars cut mid-character
    assert "TERM received" in log and "restart 1" in log
    # The Ray steps stopped too, so the driver cannot end cleanly: Ray's 60 s wait for its GCS (exit 1), or the
    # script's --save-timeout (30 s here) first (killed, 137).
    assert re.search(r"run stopped after the warning \(exit (1|137)\); requeueing job", log)
    assert "resumed from" in log and f"after iteration {kept}" in log
    done = iterations(run_dir)
    assert done[-(final - kept):] == list(range(kept + 1, final + 1))  # the resumed attempt's
    assert sorted(set(done)) == list(range(1, final + 1))
    assert (run_dir / "before_after.json").exists() and (run_dir / "placement.txt").exists()
    assert committed(run_dir) == final
    # Each attempt's Ray cluster is gone with it: no GCS server on its port (the job id's, both times) survives.
    ports = set(re.findall(r"ray cluster at 127\.0\.0\.1:(\d+): 1 node\(s\) alive", log))
    assert len(ports) == 1
    deadline = time.monotonic() + 30
    while any(subprocess.run(["pgrep", "-f", f"gcs_server.*{port}"], capture_output=True).returncode == 0
              for port in ports):
        assert time.monotonic() < deadline, "a Ray cluster of the job outlived it"
        time.sleep(1)


def test_ppo_job_preempted_by_slurm_saves_the_iteration_in_flight_requeues_and_resumes(slurm_cluster, tmp_path):
    """SLURM's own preemption, configured as a shared cluster would (scripts/slurm_local.sh: a job in `urgent`
    requeues the `debug` jobs it needs, GraceTime=120, preempt_send_user_signal): the job's own --signal, SIGUSR1
    to the batch script alone, comes when it is chosen, so the Ray steps keep running and the driver saves the
    iteration in flight (no periodic save would: train.save_every is 30); the job requeues itself, the urgent job
    runs, and the run resumes from the saved iteration and finishes."""
    model = tiny_ppo_model(tmp_path / "model")
    run_dir, final = tmp_path / "ppo", 60  # a few seconds of iterations: enough for SLURM to choose it mid-run
    job = launch("ppo", "--cpus-per-task", "2", "--ray-head-ip", "127.0.0.1", "--ray-cpus-per-node", "6",
                 "--grace", "60", "--log-dir", str(tmp_path / "logs"), *model, *PPO_SMALL,
                 f"train.iterations={final}", f"hydra.run.dir={run_dir}")
    wait_until(lambda: len(iterations(run_dir)) >= 2, 400, "2 iterations", job)
    urgent = submit("true", cwd=tmp_path, partition="urgent", cpus_per_task=2, output=str(tmp_path / "urgent.out"))
    wait_for(job, "PENDING", timeout=120)  # the run saved and the script requeued the job, well within GraceTime
    saved = committed(run_dir)
    assert 2 <= saved < final
    wait_for(urgent, "COMPLETED", timeout=120)
    wait_for(job, "COMPLETED", timeout=400)
    info = job_info(job)
    assert info["Restarts"] == "1"
    assert job_info(urgent)["StartTime"] <= info["StartTime"]  # it ran in the time the preempted job gave up
    log = Path(info["StdOut"]).read_text(errors="replace")
    assert "USR1 received" in log and "TERM received" not in log  # SLURM's warning (the test sends none), no kill
    assert "cluster.preemption_wait_s=15" in log  # half of the 30 s the --grace of 60 s leaves to save
    assert f"preempted: saved iteration {saved}" in log and "run saved (exit 75); requeueing job" in log
    assert f"after iteration {saved}" in log
    done = iterations(run_dir)
    assert done[-(final - saved):] == list(range(saved + 1, final + 1)) and sorted(set(done)) == list(range(1, final + 1))
    assert committed(run_dir) == final


def test_submission_prints_what_it_derived_and_what_the_partition_would_undo(slurm_cluster, tmp_path):
    """Against this cluster's own `scontrol` (debug preempts with GraceTime=120 and sends the job its signal): the
    default --save-timeout, 270 s, is longer than a preempted job gets, and the launcher says so; 90 s is not. The
    jobs are submitted held and cancelled: nothing runs."""
    def submit_held(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "launch.slurm", "sft", "--sbatch-arg=--hold", "--log-dir",
                               str(tmp_path / "logs"), *args], cwd=REPO, env=run_env(), capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        subprocess.run(["scancel", re.search(r"submitted job (\d+)", proc.stdout).group(1)], check=True)
        return proc.stdout

    default = submit_held()
    assert "--save-timeout: 270 s (--grace 300 s less 30 s for the requeue)" in default
    assert ("note: partition debug gives a preempted job GraceTime=120 s, less than --save-timeout 270 s: a preempted "
            "run is killed before that; pass --save-timeout 120 or less to stop it in time") in default
    assert "without sending the job its --signal" not in default  # preempt_send_user_signal is set
    assert "note:" not in submit_held("--save-timeout", "90")
