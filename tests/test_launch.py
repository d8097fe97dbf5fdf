"""launch/: the SLURM scripts render what a cluster needs, bad requests fail at submission, the
rendered supervised script trains one world across two simulated nodes (fake `srun`/`scontrol`
that run each node's task as a local process), Ray jobs carry no secret and run on a real head,
and `.deepspeed_env` holds no secret."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.deepspeed_env import write_deepspeed_env
from launch.ray_job import RayJob, submission
from launch.slurm import SlurmJob, main as slurm_main, preemption_notes, render
from launch.job import LaunchError, check_overrides, forwarded_env
from runs import REPO, TINY, run_env, write_sft_jsonl
from trainer.engine import free_port


def bash_syntax_ok(script: str) -> None:
    proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def sbatch_lines(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_supervised_script_runs_torchrun_per_node_with_a_rendezvous_on_the_first_node():
    script = render(SlurmJob("sft", ["optim.lr=1e-5", "data.path=my data.jsonl"], nodes=4, gpus_per_node=8,
                             cpus_per_task=64, partition="gpu", time="04:00:00", grace_s=240,
                             sbatch_args=["--qos=high"], python="/opt/venv/bin/python"))
    bash_syntax_ok(script)
    assert sbatch_lines(script) == [
        "--job-name=tuneforge-sft", "--nodes=4", "--ntasks-per-node=1", "--output=outputs/slurm/%x-%j.out",
        "--open-mode=append", "--requeue", "--signal=B:USR1@240", "--gpus-per-node=8", "--cpus-per-task=64",
        "--partition=gpu", "--time=04:00:00", "--qos=high"]
    assert 'export TUNEFORGE_RUN_ID="slurm-${SLURM_JOB_ID}"' in script
    assert 'export MASTER_ADDR="$FIRST_NODE"' in script
    launch = script[script.index("srun "):script.index("RUN_PID=$!")]
    for part in ("--ntasks-per-node=1", "/opt/venv/bin/python -m torch.distributed.run", '--nnodes="$SLURM_NNODES"',
                 "--nproc_per_node=8", "--rdzv_backend=c10d", '--rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"',
                 "SIGUSR1", "--shutdown_timeout=210", "-m trainer.sft optim.lr=1e-5 'data.path=my data.jsonl' resume=auto"):
        assert part in launch, part
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script and "trap 'forward USR1' USR1" in script


@pytest.mark.parametrize("flag, value", [("--job-name", "x\nrm -rf ~"), ("--partition", "gpu\r"), ("--account", "a\x00"),
                                         ("--time", "1:00\n"), ("--sbatch-arg", "--qos=high\n#SBATCH --x"),
                                         ("--log-dir", "logs\n"), ("override", "optim.lr=1e-5\necho hi")])
def test_a_control_character_in_any_rendered_value_exits_2_in_one_line(flag, value, capsys):
    args = ["sft", "--dry-run", "--no-check"] + ([value] if flag == "override" else [f"{flag}={value}"])
    assert slurm_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} ") and "control character" in err and err.count("\n") == 1


def test_a_secret_in_an_override_or_sbatch_arg_is_refused_and_never_rendered(capsys):
    token = "hf_" + "A" * 34
    for args in (["ppo", f"reward.functions.0.api_key={token}"], ["sft", f"--sbatch-arg=--export=ALL,HF_TOKEN={token}"]):
        assert slurm_main([*args, "--dry-run", "--no-check"]) == 2
        out, err = capsys.readouterr()
        assert "holds a secret" in err and "environment" in err and token not in out + err


def test_every_user_override_is_quoted_and_only_the_launchers_ray_address_expands():
    script = render(SlurmJob("ppo", ["rollout.temperature=0.7", "cluster.address=$RAY_ADDRESS", "x=$(id)"], python="py"))
    bash_syntax_ok(script)
    assert ('py -m rlhf.ppo cluster=existing cluster.address="$RAY_ADDRESS" cluster.preemption_wait_s=135 '
            'rollout.temperature=0.7 '
            "'cluster.address=$RAY_ADDRESS' 'x=$(id)' resume=auto &") in script


def test_ppo_script_forms_an_authenticated_ray_cluster_and_runs_the_driver_on_it():
    script = render(SlurmJob("ppo", ["actor.devices_per_node=8"], nodes=3, gpus_per_node=8, python="py"))
    bash_syntax_ok(script)
    assert "export RAY_AUTH_MODE=token" in script and "secrets.token_urlsafe" in script
    assert "--dashboard-host=127.0.0.1" in script and "0.0.0.0" not in script
    head, workers = (line for line in script.splitlines() if "ray.scripts.scripts start" in line)
    assert "--head" in head and '-w "$FIRST_NODE"' in head
    assert '--exclude="$FIRST_NODE"' in workers and "--ntasks=$((SLURM_NNODES - 1))" in script
    assert script.count("--num-gpus=8") == 2
    # The driver starts only once every node has joined, and joins that cluster.
    wait_all = script.index('launch.ray_cluster wait --address "$RAY_ADDRESS" --nodes "$SLURM_NNODES"')
    driver = script.index("py -m rlhf.ppo cluster=existing cluster.address=\"$RAY_ADDRESS\" "
                          "cluster.preemption_wait_s=135 actor.devices_per_node=8 resume=auto &")
    assert wait_all < driver
    assert "trap stop_ray EXIT" in script


@pytest.mark.parametrize("job, message", [
    (SlurmJob("kto"), "unknown stage 'kto'"),
    (SlurmJob("sft", nodes=0), "--nodes must be at least 1"),
    (SlurmJob("sft", gpus_per_node=8, procs_per_node=4), "every rank owns one"),
    (SlurmJob("ppo", nodes=2, ray_head_ip="127.0.0.1"), "only works on one node"),
    (SlurmJob("sft", grace_s=0), "--grace 0 must hold the save"),
    (SlurmJob("sft", grace_s=39), "raise --grace to at least 40"),
    (SlurmJob("sft", grace_s=300, save_timeout_s=280), "--grace 300 must hold --save-timeout 280 .* at least 310"),
    (SlurmJob("sft", save_timeout_s=5), "--save-timeout 5 leaves the run no time to save"),
    (SlurmJob("ppo", ["cluster.preemption_wait_s=240"], grace_s=120),
     "cluster.preemption_wait_s=240 is not below --save-timeout 90"),
])
def test_impossible_requests_name_what_is_wrong(job, message):
    with pytest.raises(LaunchError, match=message):
        render(job)


def test_the_save_gets_what_the_warning_leaves_before_the_requeue_and_ppo_waits_half_of_it():
    """--grace is the warning's lead, --save-timeout what the run may spend saving (default: 30 s less, for the
    requeue); PPO's driver waits on calls in flight for half of it unless told otherwise. Derived values print."""
    ppo = SlurmJob("ppo", ["train.iterations=3"], grace_s=100)
    script = render(ppo)
    assert "--signal=B:USR1@100" in sbatch_lines(script) and "SAVE_TIMEOUT_S=70\n" in script
    assert "cluster.preemption_wait_s=35 train.iterations=3 resume=auto" in script
    assert ppo.derived() == ["--save-timeout: 70 s (--grace 100 s less 30 s for the requeue)",
                             "cluster.preemption_wait_s: 35 (half of --save-timeout; the other half holds the save)"]
    own = SlurmJob("ppo", ["cluster.preemption_wait_s=20"], grace_s=100, save_timeout_s=50)
    command = next(x for x in render(own).splitlines() if " -m rlhf.ppo " in x and not x.startswith("#"))
    assert own.derived() == [] and command.count("cluster.preemption_wait_s=") == 1
    sft = render(SlurmJob("sft", grace_s=100, save_timeout_s=60))
    assert "--shutdown_timeout=60" in sft and "preemption_wait" not in sft


def test_a_partition_that_would_undo_the_save_is_named_at_submission():
    """Preemption is the partition's: a GraceTime shorter than the save, or no --signal at preemption (SIGTERM to
    every process, which also stops a PPO job's Ray cluster), gets one line each; a partition that does not
    preempt, or does so as planned, none."""
    job = SlurmJob("ppo", grace_s=300)  # saves for 270 s
    signals = "SlurmctldParameters     = preempt_send_user_signal"
    assert preemption_notes(job, "PartitionName=gpu GraceTime=600 PreemptMode=REQUEUE", signals) == []
    assert preemption_notes(job, "PartitionName=gpu GraceTime=0 PreemptMode=OFF", "") == []
    short = preemption_notes(job, "PartitionName=gpu GraceTime=120 PreemptMode=REQUEUE", signals)
    assert short == ["note: partition gpu gives a preempted job GraceTime=120 s, less than --save-timeout 270 s: "
                     "a preempted run is killed before that; pass --save-timeout 120 or less to stop it in time"]
    none = preemption_notes(job, "PartitionName=gpu GraceTime=0 PreemptMode=CANCEL", "PreemptType = preempt/qos")
    assert len(none) == 2 and "GraceTime=0 s, no time to save" in none[0]
    assert "without sending the job its --signal" in none[1] and "PPO resumes from its last committed" in none[1]


def test_bad_overrides_fail_at_submission_with_one_message(capsys):
    assert slurm_main(["sft", "--dry-run", "train.max_stepz=10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sft overrides") and "train.max_stepz" in err
    check_overrides("ppo", ["actor.devices_per_node=8", "cluster.colocate=both"])  # composes, nothing resolved
    with pytest.raises(LaunchError, match="rollout.temperatur"):
        check_overrides("ppo", ["rollout.temperatur=0.7"])


def test_only_non_secret_run_variables_are_forwarded():
    env = {"WANDB_PROJECT": "p", "WANDB_API_KEY": "k", "HF_TOKEN": "t", "NCCL_SOCKET_IFNAME": "ib0",
           "HF_HOME": "/h", "AWS_SECRET_ACCESS_KEY": "s", "PATH": "/bin"}
    assert forwarded_env(env) == {"HF_HOME": "/h", "NCCL_SOCKET_IFNAME": "ib0", "WANDB_PROJECT": "p"}
    assert set(forwarded_env(env, secrets=True)) == {"HF_HOME", "HF_TOKEN", "NCCL_SOCKET_IFNAME", "WANDB_API_KEY",
                                                     "WANDB_PROJECT"}


# ---------------------------------------------------------------- two simulated nodes

FAKE_SRUN = r"""#!/bin/bash
# srun on simulated nodes: the task once per node (SLURM_NNODES, or --nodes=K), as local processes.
n="$SLURM_NNODES"
while [[ $# -gt 0 && "$1" == -* ]]; do
    case "$1" in --nodes=*) n="${1#--nodes=}";; -w|--nodelist|--exclude) shift;; esac
    shift
done
pids=()
for ((i = 0; i < n; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
trap 'kill -s USR1 "${pids[@]}"' USR1
trap 'kill -s TERM "${pids[@]}"' TERM
status=0
for p in "${pids[@]}"; do
    while true; do wait "$p"; s=$?; kill -0 "$p" 2>/dev/null || break; done
    [ "$s" -ne 0 ] && status=$s
done
exit "$status"
"""

FAKE_SCONTROL = r"""#!/bin/bash
# scontrol for simulated nodes: every node is this machine; requeues are recorded.
case "$1 $2" in
    "show hostnames") for ((i = 0; i < SLURM_NNODES; i++)); do echo localhost; done;;
    requeue*) echo "requeue $2" >> "$FAKE_SLURM_LOG";;
    *) echo "fake scontrol: $*" >&2; exit 1;;
esac
"""


def _free_job_id() -> int:
    """A job id whose derived rendezvous port (20000 + id % 20000) is free on loopback."""
    for job_id in range(31000 + os.getpid() % 1000, 40000, 7):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job_id % 20000))
                return job_id
            except OSError:
                continue
    raise RuntimeError("no free port")


@pytest.fixture()
def fake_nodes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "slurm.log"
    env = run_env()
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID=str(_free_job_id()), SLURM_NNODES="2",
               SLURM_JOB_NODELIST="node[1-2]", FAKE_SLURM_LOG=str(log))
    return env, log


def _data(tmp_path: Path) -> Path:
    return write_sft_jsonl(tmp_path / "sft.jsonl", 400)


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line]


@pytest.mark.distributed
def test_rendered_script_trains_one_world_across_two_nodes(tmp_path, fake_nodes):
    """Two torchrun agents, one per simulated node, meet at the first node's c10d rendezvous and
    train as one world of 2 (the real one-node SLURM test covers preemption and requeue)."""
    env, log = fake_nodes
    run_dir = tmp_path / "run"
    script = tmp_path / "job.sbatch"
    script.write_text(render(SlurmJob("sft", [*TINY, f"data.path={_data(tmp_path)}", "data.eval_path=null",
                                              "train.micro_batch_size=2", "train.max_steps=3", "train.save_every=3",
                                              f"hydra.run.dir={run_dir}"],
                                      nodes=2, procs_per_node=1, log_dir=str(tmp_path / "logs"))))
    done = subprocess.run(["bash", str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "world_size=2" in out and "nodes localhost localhost" in out
    assert _steps(run_dir) == [1, 2, 3] and (run_dir / "checkpoints" / "step_00000003" / "COMPLETE").exists()
    assert not log.exists(), "a finished run is not requeued"


# srun whose task does not act on a signal: `exec sleep 120` is a run hung in its save, `sleep 2` one that
# finishes its last steps before it could save.
IGNORING_SRUN = r"""#!/bin/bash
trap '' USR1 TERM
echo started > "$FAKE_SLURM_LOG.run"
{task}
"""


def _warn_a_fake_run(tmp_path: Path, fake_nodes, task: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run the rendered script (--grace 40, so 10 s to save) over an srun running `task`, SIGTERM it once the
    task started (as a preemption without a user signal does); its result and the seconds from the signal."""
    env, log = fake_nodes
    (tmp_path / "bin" / "srun").write_text(IGNORING_SRUN.format(task=task))
    script = tmp_path / "job.sbatch"
    script.write_text(render(SlurmJob("sft", [f"hydra.run.dir={tmp_path / 'run'}"], grace_s=40,
                                      log_dir=str(tmp_path / "logs"))))
    job = subprocess.Popen(["bash", str(script)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        deadline = time.monotonic() + 30
        while not Path(f"{log}.run").exists():
            assert time.monotonic() < deadline and job.poll() is None, "the run never started"
            time.sleep(0.1)
        warned = time.monotonic()
        job.send_signal(15)
        out, _ = job.communicate(timeout=40)
    finally:
        job.kill()
    return subprocess.CompletedProcess(job.args, job.returncode, out), time.monotonic() - warned


def test_a_run_that_does_not_stop_within_the_save_timeout_is_stopped_and_the_job_requeues(tmp_path, fake_nodes):
    """The job must requeue before SLURM's own SIGKILL at the time limit: a run still busy --save-timeout seconds
    after the warning is killed (its last complete checkpoint stays) and the script requeues the job."""
    env, log = fake_nodes
    done, took = _warn_a_fake_run(tmp_path, fake_nodes, "exec sleep 120")
    out = done.stdout
    assert done.returncode == 0, out
    assert "TERM received, asking the run to save and stop within 10 s (--save-timeout)" in out
    assert "the run did not stop within 10 s of the warning (--save-timeout); stopping it" in out
    assert "run stopped after the warning (exit 137); requeueing job" in out
    assert log.read_text().split() == ["requeue", env["SLURM_JOB_ID"]]
    assert 10 <= took < 20, took


def test_cli_dry_run_prints_the_script(capsys):
    assert slurm_main(["reward", "--nodes", "2", "--gpus-per-node", "4", "--dry-run", "optim.lr=1e-5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash\n") and "--nproc_per_node=4" in out and "-m trainer.reward optim.lr=1e-5" in out
    assert sys.executable in out


# ---------------------------------------------------------------- Ray jobs

def test_ray_job_spec_carries_the_code_and_run_variables_but_no_secret():
    env = {"WANDB_PROJECT": "p", "WANDB_API_KEY": "sk-123", "HF_TOKEN": "hf_x", "HF_HOME": "/h"}
    spec = submission(RayJob("sft", ["optim.lr=1e-5"], gpus=8), environ=env)
    assert spec["entrypoint"] == ("python -m launch.torchrun --standalone --nproc_per_node=8 "
                                  "-m trainer.sft optim.lr=1e-5")
    assert spec["entrypoint_num_gpus"] == 8
    assert spec["runtime_env"]["env_vars"] == {"HF_HOME": "/h", "WANDB_PROJECT": "p"}
    assert "sk-123" not in json.dumps(spec) and "hf_x" not in json.dumps(spec)
    assert spec["runtime_env"]["working_dir"] == str(REPO) and "outputs" in spec["runtime_env"]["excludes"]
    ppo = submission(RayJob("ppo", ["actor.devices_per_node=8"]), environ=env)
    assert ppo["entrypoint"] == "python -m rlhf.ppo cluster=existing actor.devices_per_node=8"
    with pytest.raises(LaunchError, match="PPO places its roles"):
        submission(RayJob("ppo", gpus=8))


@pytest.mark.distributed
def test_ray_job_runs_a_stage_on_a_running_cluster(tmp_path):
    """A real head (dashboard and job API on loopback), a tiny SFT job through the job API."""
    from ray.job_submission import JobSubmissionClient

    # Every port this head binds is free: the job API is served by the dashboard agent, whose default
    # port (52365) the other xdist worker's Ray clusters also take; the loser serves no jobs.
    gcs_port, dash_port, agent_port = free_port(), free_port(), free_port()
    env = run_env()
    # Token authentication on, as on the clusters launch/ forms: the job API refuses a client without it.
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_urlsafe(16), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             "--node-ip-address=127.0.0.1", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash_port}", f"--dashboard-agent-listen-port={agent_port}",
                             "--num-cpus=2", "--disable-usage-stats"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                JobSubmissionClient(address, headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}).list_jobs()
                break
            except Exception:
                assert time.time() < deadline and head.poll() is None, "Ray head did not come up"
                time.sleep(1)
        run_dir = tmp_path / "run"
        env["WANDB_API_KEY"] = "sk-never-in-the-job-spec"
        proc = subprocess.run([sys.executable, "-m", "launch.ray_job", "sft", "--address", address,
                               *TINY, f"data.path={_data(tmp_path)}", "data.eval_path=null", "train.max_steps=3",
                               "train.micro_batch_size=2", f"hydra.run.dir={run_dir}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        assert "SUCCEEDED" in proc.stdout and _steps(run_dir) == [1, 2, 3]
        (job,) = JobSubmissionClient(address, headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}).list_jobs()
        spec = json.dumps([job.runtime_env, job.metadata, job.entrypoint])
        assert "sk-never" not in spec and env["RAY_AUTH_TOKEN"] not in spec
        assert job.entrypoint.startswith("python -m launch.torchrun")
    finally:
        head.terminate()
        head.wait(timeout=60)


def test_deepspeed_env_file_holds_run_variables_and_no_secret(tmp_path):
    env = {"WANDB_PROJECT": "p", "WANDB_API_KEY": "sk-1", "HF_HOME": "/h", "NCCL_IB_DISABLE": "1", "HOME": "/root"}
    path = tmp_path / ".deepspeed_env"
    write_deepspeed_env(path, env)
    assert path.read_text().splitlines() == ["HF_HOME=/h", "NCCL_IB_DISABLE=1", "WANDB_PROJECT=p"]
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match="newline"):
        write_deepspeed_env(path, {"WANDB_NOTES": "two\nlines"})


def test_a_run_that_finishes_after_the_warning_is_not_requeued(tmp_path, fake_nodes):
    env, log = fake_nodes
    done, took = _warn_a_fake_run(tmp_path, fake_nodes, "sleep 2; exit 0")
    assert done.returncode == 0 and took < 10, done.stdout
    assert "TERM received" in done.stdout and "requeue" not in done.stdout and not log.exists()
