"""Render and submit a SLURM batch script for one stage.

    python -m launch.slurm sft --nodes 2 --gpus-per-node 8 --partition gpu --time 04:00:00 [overrides]
    python -m launch.slurm ppo --nodes 2 --gpus-per-node 8 --dry-run actor.devices_per_node=8 ...

Supervised stages (sft, instruct, reward, dpo): one task per node runs torchrun, which starts
the node's ranks; the nodes meet at a c10d rendezvous on the allocation's first node.
PPO: the job forms a Ray cluster inside the allocation (head on the first node, a worker
on each other node, token authentication on, dashboard on loopback), waits until every
node has joined, runs the `rlhf.ppo` driver on the head with `cluster=existing`, and
stops Ray when the driver ends.

Every run of the job writes to `outputs/<stage>/slurm-<job id>` with `resume=auto`, so
a requeued job continues where it stopped. Preemption: SLURM signals the batch script
(`--signal=B:USR1@<grace>` before the time limit or when the job is chosen for preemption
with `preempt_send_user_signal`, or SIGTERM); the script passes the signal on, the ranks
finish their step, save a checkpoint and exit, and the script requeues the job. A run still
saving `--save-timeout` seconds after the warning is stopped, so that the requeue still
happens before the time limit (the last complete checkpoint stays). W&B continues the same
run (its id is stored in the run directory).
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from launch.job import REPO, LaunchError, check_overrides, stage_module
from trainer.contracts import PREEMPTED_EXIT_CODE, STAGE_MODULES, redact_text

# torchrun forwards these to the ranks and waits `--save-timeout` seconds for them to save.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# What the warning must leave after the save: `scontrol requeue`, stopping Ray or torchrun, SLURM's own signals.
REQUEUE_MARGIN_S = 30
MIN_SAVE_S = 10
PORT_BASE, PORT_SPAN = 20000, 20000  # rendezvous / Ray ports derived from the job id


@dataclass
class SlurmJob:
    stage: str
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 0
    procs_per_node: Optional[int] = None  # ranks per node; default: the GPUs, or 1 without GPUs
    cpus_per_task: Optional[int] = None
    partition: Optional[str] = None
    time: Optional[str] = None
    account: Optional[str] = None
    job_name: Optional[str] = None
    grace_s: int = 300  # the warning (SIGUSR1) comes this long before the time limit
    save_timeout_s: Optional[int] = None  # how long the run may save after it; default: grace_s - REQUEUE_MARGIN_S
    log_dir: str = "outputs/slurm"
    sbatch_args: list[str] = field(default_factory=list)  # more #SBATCH lines, e.g. "--qos=high"
    ray_head_ip: Optional[str] = None  # PPO: the head's address; default: the first node's IP
    ray_cpus_per_node: Optional[int] = None  # PPO: CPU slots each Ray node offers (default: its CPUs)
    # The interpreter on every node; default: the one running this launcher (a shared venv).
    python: str = field(default_factory=lambda: sys.executable)

    @property
    def ranks_per_node(self) -> int:
        return self.procs_per_node or self.gpus_per_node or 1

    @property
    def save_timeout(self) -> int:
        return self.save_timeout_s if self.save_timeout_s is not None else self.grace_s - REQUEUE_MARGIN_S

    def override(self, key: str) -> Optional[str]:
        """The value the user's overrides give `key` (the last one wins, as in Hydra), or None."""
        values = [o.split("=", 1)[1] for o in self.overrides if o.lstrip("+").startswith(key + "=")]
        return values[-1] if values else None

    @property
    def preemption_wait(self) -> Optional[int]:
        """PPO: the driver's wait on calls in flight after the warning (cluster.preemption_wait_s), half the
        save timeout unless the user set it: the other half holds the save. None where the user set it."""
        if self.stage != "ppo" or self.override("cluster.preemption_wait_s") is not None:
            return None
        return max(1, self.save_timeout // 2)

    def derived(self) -> list[str]:
        """The values the launcher chose itself, as the lines it prints."""
        lines = []
        if self.save_timeout_s is None:
            lines.append(f"--save-timeout: {self.save_timeout} s (--grace {self.grace_s} s less {REQUEUE_MARGIN_S} s "
                         f"for the requeue)")
        if self.preemption_wait is not None:
            lines.append(f"cluster.preemption_wait_s: {self.preemption_wait} (half of --save-timeout; the other half "
                         f"holds the save)")
        return lines


def _check_rendered_values(job: SlurmJob) -> None:
    """Every value the script holds stays one shell word on one line, and holds no secret (the script is a file
    that stays on disk and in the log directory; secrets reach the job through its environment, which sbatch
    passes on)."""
    values = [("--job-name", job.job_name), ("--partition", job.partition), ("--account", job.account),
              ("--time", job.time), ("--log-dir", job.log_dir), ("--ray-head-ip", job.ray_head_ip),
              ("python", job.python), *(("--sbatch-arg", a) for a in job.sbatch_args),
              *(("override", o) for o in job.overrides)]
    for flag, value in values:
        if value is None:
            continue
        bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
        if bad is not None:
            raise LaunchError(f"{flag} {value!r}: holds the control character {bad!r}; a job script takes one line per value")
        if redact_text(value) != value:
            raise LaunchError(f"{flag} {redact_text(value)!r}: holds a secret, which would be written into the job "
                              f"script; export it in the environment you submit from instead (sbatch passes it on)")


def validate_job(job: SlurmJob) -> None:
    stage_module(job.stage)
    _check_rendered_values(job)
    if job.nodes < 1:
        raise LaunchError(f"--nodes must be at least 1, got {job.nodes}")
    if job.gpus_per_node < 0 or (job.procs_per_node is not None and job.procs_per_node < 1):
        raise LaunchError("--gpus-per-node must be >= 0 and --procs-per-node >= 1")
    if job.gpus_per_node and job.procs_per_node and job.procs_per_node != job.gpus_per_node:
        raise LaunchError(f"--procs-per-node {job.procs_per_node} differs from --gpus-per-node "
                          f"{job.gpus_per_node}: with GPUs every rank owns one")
    if job.save_timeout_s is not None and job.save_timeout_s < MIN_SAVE_S:
        raise LaunchError(f"--save-timeout {job.save_timeout_s} leaves the run no time to save: at least {MIN_SAVE_S} s")
    if job.save_timeout < MIN_SAVE_S or job.save_timeout + REQUEUE_MARGIN_S > job.grace_s:
        given = f"--save-timeout {job.save_timeout_s}" if job.save_timeout_s is not None else f"the save ({MIN_SAVE_S} s)"
        raise LaunchError(f"--grace {job.grace_s} must hold {given} and {REQUEUE_MARGIN_S} s for the requeue after it: "
                          f"raise --grace to at least {max(job.save_timeout, MIN_SAVE_S) + REQUEUE_MARGIN_S}")
    wait = job.override("cluster.preemption_wait_s") if job.stage == "ppo" else None
    if wait is not None:
        try:
            too_long = float(wait) >= job.save_timeout
        except ValueError:
            too_long = False  # not a number: composing the config names it
        if too_long:
            raise LaunchError(f"cluster.preemption_wait_s={wait} is not below --save-timeout {job.save_timeout}: the "
                              f"run would be stopped before it could save; lower it or raise --save-timeout")
    if job.ray_head_ip and job.stage != "ppo":
        raise LaunchError("--ray-head-ip is for the ppo stage")
    if job.ray_head_ip in ("127.0.0.1", "localhost") and job.nodes > 1:
        raise LaunchError("--ray-head-ip 127.0.0.1 only works on one node: other nodes cannot reach it")


def _sbatch_header(job: SlurmJob) -> list[str]:
    lines = [
        f"--job-name={job.job_name or 'tuneforge-' + job.stage}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        f"--output={job.log_dir}/%x-%j.out",
        "--open-mode=append",  # a requeued run appends to the same log
        "--requeue",
        f"--signal=B:USR1@{job.grace_s}",
    ]
    if job.gpus_per_node:
        lines.append(f"--gpus-per-node={job.gpus_per_node}")
    for flag, value in (("--cpus-per-task", job.cpus_per_task), ("--partition", job.partition),
                        ("--time", job.time), ("--account", job.account)):
        if value is not None:
            lines.append(f"{flag}={value}")
    lines += job.sbatch_args
    return [f"#SBATCH {x}" for x in lines]


_PREAMBLE = """\
set -uo pipefail
cd {repo}
mkdir -p {log_dir}
# One run directory per job, kept across requeues: resume=auto finds its checkpoints there.
export TUNEFORGE_RUN_ID="slurm-${{SLURM_JOB_ID}}"
NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
FIRST_NODE="${{NODES[0]}}"
PORT=$(({port_base} + SLURM_JOB_ID % {port_span}))
echo "tuneforge: job $SLURM_JOB_ID, restart ${{SLURM_RESTART_COUNT:-0}}, nodes ${{NODES[*]}}"

# Preemption: pass SIGUSR1 (time limit near, or chosen for preemption) or SIGTERM on to the
# run, wait up to --save-timeout for it to save and stop, then requeue. `wait` returns early
# when a trapped signal arrives, so it loops; after the first signal it polls the deadline. SECONDS
# counts whole seconds, and the signal can come up to a second after it last ticked: the deadline's
# extra second gives the run at least --save-timeout (at most 2 s more, well inside the requeue margin).
PREEMPTED=0
SAVE_TIMEOUT_S={save_timeout}
forward() {{
    if [ "$PREEMPTED" = 0 ]; then PREEMPTED=1; SIGNAL=$1; SAVE_DEADLINE=$((SECONDS + SAVE_TIMEOUT_S + 1)); fi
    echo "tuneforge: $1 received, asking the run to save and stop within ${{SAVE_TIMEOUT_S}} s (--save-timeout)"
    [ -z "${{RUN_PID:-}}" ] || {{ kill -s "$1" "$RUN_PID" 2>/dev/null; FORWARDED=1; }}
}}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
stop_ray() {{ :; }}  # the ppo script replaces it
wait_run() {{
    local status
    while true; do
        if [ "$PREEMPTED" = 0 ]; then
            wait "$RUN_PID"; status=$?
            kill -0 "$RUN_PID" 2>/dev/null || return "$status"
        elif ! kill -0 "$RUN_PID" 2>/dev/null; then
            wait "$RUN_PID"; return $?
        elif [ "$SECONDS" -ge "$SAVE_DEADLINE" ]; then
            echo "tuneforge: the run did not stop within ${{SAVE_TIMEOUT_S}} s of the warning (--save-timeout);" \
                "stopping it, so that the job requeues in time and resumes from its last complete checkpoint"
            kill -s KILL "$RUN_PID" 2>/dev/null
            wait "$RUN_PID"; return $?
        else
            sleep 1
        fi
    done
}}
"""

_EPILOGUE = """\
# Warned before the run started (while the Ray cluster formed): it is told as soon as it exists.
[ "$PREEMPTED" = 0 ] || [ -n "${{FORWARDED:-}}" ] || kill -s "$SIGNAL" "$RUN_PID" 2>/dev/null
wait_run; STATUS=$?
# A run that finished before it could act on the warning (exit 0) is done: nothing to requeue.
if [ "$STATUS" != 0 ] && {{ [ "$PREEMPTED" = 1 ] || [ "$STATUS" = {preempted_code} ]; }}; then
    if [ "$STATUS" = {preempted_code} ]; then
        echo "tuneforge: run saved (exit $STATUS); requeueing job $SLURM_JOB_ID to resume"
    else  # torchrun turns its ranks' 75 into 1; a PPO job whose Ray steps got the signal too saved nothing new
        echo "tuneforge: run stopped after the warning (exit $STATUS); requeueing job $SLURM_JOB_ID" \
            "to resume from its last checkpoint"
    fi
    stop_ray  # first: a requeue would otherwise wait for the Ray steps to be killed
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$STATUS"
"""


def _supervised_body(job: SlurmJob, command: str) -> str:
    py = shlex.quote(job.python)
    return f"""\
export MASTER_ADDR="$FIRST_NODE" MASTER_PORT="$PORT"
# One task per node; torchrun starts its {job.ranks_per_node} rank(s) and they meet at the
# c10d rendezvous on the first node.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 {py} -m torch.distributed.run \\
    --nnodes="$SLURM_NNODES" --nproc_per_node={job.ranks_per_node} \\
    --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID" \\
    --signals_to_handle={TORCHRUN_SIGNALS} --shutdown_timeout={job.save_timeout} \\
    {command} &
RUN_PID=$!
"""


def _ppo_body(job: SlurmJob, command: str) -> str:
    py = shlex.quote(job.python)
    head_ip = (shlex.quote(job.ray_head_ip) if job.ray_head_ip
               else '"$(getent ahostsv4 "$FIRST_NODE" | awk \'NR == 1 {print $1}\')"')
    cpus = f"--num-cpus={job.ray_cpus_per_node} " if job.ray_cpus_per_node else ""
    node_args = f"{cpus}--num-gpus={job.gpus_per_node} --disable-usage-stats"
    ray = f"{py} -m ray.scripts.scripts"  # the `ray` CLI of the same environment
    return f"""\
# A Ray cluster for this job only. Token authentication: the token lives in the job's
# environment (srun passes it to every node), never in a file or a log.
export RAY_AUTH_MODE=token
# The cluster dies with its driver: no 30 s drain per node when it is stopped.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
RAY_AUTH_TOKEN="$({py} -c 'import secrets; print(secrets.token_urlsafe(32))')"
export RAY_AUTH_TOKEN
HEAD_IP={head_ip}
export RAY_ADDRESS="$HEAD_IP:$PORT"
RAY_PIDS=()
stop_ray() {{ [ ${{#RAY_PIDS[@]}} -gt 0 ] && kill "${{RAY_PIDS[@]}}" 2>/dev/null; wait "${{RAY_PIDS[@]}}" 2>/dev/null; }}
trap stop_ray EXIT
srun --nodes=1 --ntasks=1 -w "$FIRST_NODE" --overlap {ray} start --head --block \\
    --node-ip-address="$HEAD_IP" --port="$PORT" --dashboard-host=127.0.0.1 {node_args} &
RAY_PIDS+=($!)
{py} -m launch.ray_cluster wait --address "$RAY_ADDRESS" --nodes 1 --timeout 180 || exit 1
if [ "$SLURM_NNODES" -gt 1 ]; then
    srun --nodes=$((SLURM_NNODES - 1)) --ntasks=$((SLURM_NNODES - 1)) --ntasks-per-node=1 \\
        --exclude="$FIRST_NODE" --overlap {ray} start --block --address="$RAY_ADDRESS" {node_args} &
    RAY_PIDS+=($!)
fi
{py} -m launch.ray_cluster wait --address "$RAY_ADDRESS" --nodes "$SLURM_NNODES" --timeout 300 || exit 1
{command} &
RUN_PID=$!
"""


def render(job: SlurmJob) -> str:
    """The batch script for `job` (pure: nothing is checked against a cluster)."""
    validate_job(job)
    module = stage_module(job.stage)
    overrides = [*job.overrides, "resume=auto"]
    quoted = [shlex.quote(o) for o in overrides]  # every user override taken literally, $ included
    if job.stage == "ppo":
        # Ours, not the user's: the one word the shell expands, to the address of the job's own Ray head.
        wait = [] if job.preemption_wait is None else [f"cluster.preemption_wait_s={job.preemption_wait}"]
        quoted = ["cluster=existing", 'cluster.address="$RAY_ADDRESS"', *wait, *quoted]
        command = " ".join([shlex.quote(job.python), "-m", module, *quoted])
        body = _ppo_body(job, command)
    else:
        command = " ".join(["-m", module, *quoted])
        body = _supervised_body(job, command)
    header = "\n".join(["#!/bin/bash", *_sbatch_header(job)])
    argv = shlex.join(["python", "-m", "launch.slurm", job.stage, *job.overrides])
    preamble = _PREAMBLE.format(repo=shlex.quote(str(REPO)), log_dir=shlex.quote(job.log_dir),
                                port_base=PORT_BASE, port_span=PORT_SPAN, save_timeout=job.save_timeout)
    epilogue = _EPILOGUE.format(preempted_code=PREEMPTED_EXIT_CODE)
    return f"{header}\n# Rendered by: {argv}\n{preamble}\n{body}{epilogue}"


def preemption_notes(job: SlurmJob, partition: str, config: str) -> list[str]:
    """What the job's partition does to it when preempting, where that undoes the launcher's plan: `partition`
    is its `scontrol -o show partition` line, `config` the output of `scontrol show config`."""
    fields = dict(re.findall(r"(\S+?)=(\S*)", partition))
    mode, grace = fields.get("PreemptMode", "OFF").upper(), fields.get("GraceTime", "0")
    if mode.startswith("OFF") or not grace.isdigit() or "preempt/none" in config:
        return []
    name, notes = fields.get("PartitionName", "?"), []
    if int(grace) < MIN_SAVE_S:
        notes.append(f"note: partition {name} gives a preempted job GraceTime={grace} s, no time to save: a preempted "
                     f"run resumes from its last periodic checkpoint (train.save_every)")
    elif int(grace) < job.save_timeout:
        notes.append(f"note: partition {name} gives a preempted job GraceTime={grace} s, less than --save-timeout "
                     f"{job.save_timeout} s: a preempted run is killed before that; pass --save-timeout {int(grace)} "
                     f"or less to stop it in time")
    if "send_user_signal" not in config:
        notes.append(f"note: partition {name} preempts (PreemptMode={mode}) without sending the job its --signal "
                     f"(PreemptParameters=send_user_signal, before Slurm 23.02 SlurmctldParameters="
                     f"preempt_send_user_signal): a preempted job gets SIGTERM on every process"
                     + (", which stops its Ray cluster, so PPO resumes from its last committed iteration"
                        if job.stage == "ppo" else ""))
    return notes


def _partition_notes(job: SlurmJob) -> list[str]:
    """preemption_notes for the partition the job goes to, as this cluster's scontrol reports it; none where
    scontrol cannot say (submission reports its own errors)."""
    try:
        lines = subprocess.run(["scontrol", "-o", "show", "partition", *([job.partition] if job.partition else [])],
                               capture_output=True, text=True, timeout=30).stdout.splitlines()
        config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    line = next((x for x in lines if job.partition or " Default=YES " in x), None)
    return preemption_notes(job, line, config) if line else []


def submit(script: str, path: Path) -> str:
    """Write `script` to `path` and sbatch it; returns the job id."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    try:
        out = subprocess.run(["sbatch", "--parsable", str(path)], check=True, capture_output=True, text=True,
                             cwd=REPO)
    except FileNotFoundError:
        raise LaunchError("sbatch not found: run on a SLURM login node, or use --dry-run") from None
    except subprocess.CalledProcessError as e:
        raise LaunchError(f"sbatch rejected {path}: {e.stderr.strip()}") from None
    return out.stdout.strip().split(";")[0]


def parse_args(argv: list[str]) -> tuple[SlurmJob, bool, bool]:
    p = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=list(STAGE_MODULES))
    p.add_argument("overrides", nargs="*", help="Hydra overrides for the stage")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--procs-per-node", type=int, help="ranks per node (default: the GPUs, or 1 on CPU)")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit, e.g. 04:00:00")
    p.add_argument("--account")
    p.add_argument("--job-name")
    p.add_argument("--grace", type=int, default=300, dest="grace_s",
                   help="seconds before the time limit that the job is warned to save and requeue (default 300)")
    p.add_argument("--save-timeout", type=int, dest="save_timeout_s",
                   help=f"seconds the run may take to save after the warning or a preemption before it is stopped "
                        f"(default: --grace less {REQUEUE_MARGIN_S}); keep it under the partition's GraceTime where "
                        f"it preempts")
    p.add_argument("--sbatch-arg", action="append", default=[], dest="sbatch_args",
                   help="another sbatch option, repeatable, e.g. --sbatch-arg=--qos=high")
    p.add_argument("--ray-head-ip", help="ppo: the Ray head's address (default: the first node's IP)")
    p.add_argument("--ray-cpus-per-node", type=int, help="ppo: CPU slots per Ray node (default: its CPUs)")
    p.add_argument("--log-dir", default="outputs/slurm")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.add_argument("--no-check", action="store_true", help="skip composing the config before submitting")
    a = vars(p.parse_intermixed_args(argv))
    dry_run, no_check = a.pop("dry_run"), a.pop("no_check")
    return SlurmJob(**a), dry_run, no_check


def main(argv: Optional[list[str]] = None) -> int:
    job, dry_run, no_check = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if not no_check:
            check_overrides(job.stage, job.overrides)
        script = render(job)
        if dry_run:
            print(script, end="")
            return 0
        for line in [*job.derived(), *_partition_notes(job)]:
            print(line)
        import time

        path = REPO / job.log_dir / f"{job.stage}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
        job_id = submit(script, path)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"submitted job {job_id}: {path}\n  log: {job.log_dir}/{job.job_name or 'tuneforge-' + job.stage}-{job_id}.out"
          f"\n  run: outputs/{job.stage}/slurm-{job_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
