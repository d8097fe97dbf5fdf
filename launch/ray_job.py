"""Submit a stage to a running Ray cluster as a Ray job (what `ray job submit` does).

    python -m launch.ray_job ppo --address http://127.0.0.1:8265 actor.devices_per_node=8 ...
    python -m launch.ray_job sft --gpus 8 hydra.run.dir=/shared/runs/sft-1 ...

The job's runtime environment carries this working directory and the run variables of
this shell (`launch.job.forwarded_env`: W&B project/entity, HF cache, NCCL settings),
never a secret: `WANDB_API_KEY` and tokens must already be in the cluster's environment
(a Kubernetes Secret, or exported before `ray start`). PPO joins the cluster it runs on
(`cluster=existing`); a supervised stage runs torchrun (`launch.torchrun`) on the node that gets `--gpus`.
The working directory is a copy on the cluster, so point outputs at shared storage
(`hydra.run.dir=/shared/...`) to keep them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from launch.job import REPO, LaunchError, check_overrides, forwarded_env, stage_module
from trainer.contracts import STAGE_MODULES

AGENT_WAIT_S = 120
# What the working-directory upload leaves out: runs, caches and environments.
EXCLUDES = [".git", ".venv", "bench/.venv*", "outputs", "multirun", "wandb", "**/__pycache__", "*.egg-info",
            ".env*"]


@dataclass
class RayJob:
    stage: str
    overrides: list[str] = field(default_factory=list)
    address: Optional[str] = None  # the dashboard's job API; default: RAY_ADDRESS or Ray's local default
    gpus: int = 0  # supervised stages: GPUs (= ranks) on the node the job runs on
    procs: Optional[int] = None  # supervised stages on CPU: ranks (default: the GPUs, or 1)
    submission_id: Optional[str] = None

    @property
    def ranks(self) -> int:
        return self.procs or self.gpus or 1


def entrypoint(job: RayJob) -> str:
    module = stage_module(job.stage)
    overrides = [shlex.quote(o) for o in job.overrides]
    if job.stage == "ppo":
        return shlex.join(["python", "-m", module, "cluster=existing"]) + "".join(f" {o}" for o in overrides)
    launcher = ["python", "-m", "launch.torchrun", "--standalone", f"--nproc_per_node={job.ranks}"]
    return shlex.join([*launcher, "-m", module]) + "".join(f" {o}" for o in overrides)


def runtime_env(environ: Optional[dict] = None) -> dict:
    return {"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": forwarded_env(environ)}


def submission(job: RayJob, environ: Optional[dict] = None) -> dict:
    """The keyword arguments of `JobSubmissionClient.submit_job` for `job`."""
    if job.gpus < 0 or (job.procs is not None and job.procs < 1):
        raise LaunchError("--gpus must be >= 0 and --procs >= 1")
    if job.stage == "ppo" and (job.gpus or job.procs):
        raise LaunchError("--gpus/--procs are for supervised stages; PPO places its roles itself "
                          "(actor.devices_per_node=..., critic.num_nodes=...)")
    spec = {"entrypoint": entrypoint(job), "runtime_env": runtime_env(environ),
            "metadata": {"tuneforge_stage": job.stage}}
    if job.submission_id:
        spec["submission_id"] = job.submission_id
    if job.stage != "ppo" and job.gpus:
        spec["entrypoint_num_gpus"] = job.gpus  # lands the driver (and its ranks) on a node with them
    return spec


def as_cli(spec: dict, address: Optional[str]) -> str:
    """The same submission as a `ray job submit` command line."""
    args = ["ray", "job", "submit"] + (["--address", address] if address else [])
    args += ["--runtime-env-json", json.dumps(spec["runtime_env"])]
    if "entrypoint_num_gpus" in spec:
        args += ["--entrypoint-num-gpus", str(spec["entrypoint_num_gpus"])]
    if "submission_id" in spec:
        args += ["--submission-id", spec["submission_id"]]
    return shlex.join(args) + " -- " + spec["entrypoint"]


def submit(spec: dict, address: Optional[str], follow: bool) -> tuple[str, str]:
    """Submit and, with `follow`, stream the job's logs until it ends; returns (id, final status)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise LaunchError(f"no Ray job API at {address or 'the default address'}: {e}") from None
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job_id = client.submit_job(**spec)
            break
        except RuntimeError as e:
            # A cluster that has just started answers before its job agent is up.
            if "No available agent" not in str(e):
                raise LaunchError(f"Ray refused the job: {e}") from None
            if time.monotonic() > deadline:
                # Seen when another Ray on the head's machine holds the agent's port: that agent lives on
                # without its HTTP service, so the cluster runs tasks but serves no jobs.
                raise LaunchError(f"Ray's job agent did not answer within {AGENT_WAIT_S:.0f} s ({e}); is its "
                                  "port (`ray start --dashboard-agent-listen-port`, default 52365) taken by "
                                  "another Ray on the head node?") from None
            time.sleep(2)
    print(f"submitted Ray job {job_id}", flush=True)
    if not follow:
        return job_id, str(client.get_job_status(job_id))
    printed = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        print(logs[printed:], end="", flush=True)
        printed = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return job_id, str(status)
        time.sleep(1)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.ray_job", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=list(STAGE_MODULES))
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the stage")
    p.add_argument("--address", help="Ray job API, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)")
    p.add_argument("--gpus", type=int, default=0, help="supervised stages: GPUs (ranks) on one node")
    p.add_argument("--procs", type=int, help="supervised stages without GPUs: ranks")
    p.add_argument("--submission-id")
    p.add_argument("--no-wait", action="store_true", help="return once submitted")
    p.add_argument("--dry-run", action="store_true", help="print the equivalent `ray job submit` command")
    a = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    job = RayJob(a.stage, a.overrides, a.address, a.gpus, a.procs, a.submission_id)
    try:
        check_overrides(job.stage, job.overrides)
        spec = submission(job)
        if a.dry_run:
            print(as_cli(spec, job.address))
            return 0
        job_id, status = submit(spec, job.address, follow=not a.no_wait)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Ray job {job_id}: {status}", flush=True)
    return 0 if a.no_wait or status == "SUCCEEDED" else 1


if __name__ == "__main__":
    raise SystemExit(main())
