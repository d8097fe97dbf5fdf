"""Hydra sweeps (`-m`): what a sweep member knows about its sweep, and what a sweep leaves behind.

- `current_member()`: this job's place in a multirun (sweep directory, member number, the
  overrides that make it differ), from Hydra's runtime config; None in a single run.
- `tag_logger(...)`: every member is one W&B run in a group named after the sweep, its swept
  values in the run name and all its overrides in the logged config.
- `join_submitit_ranks()`: a submitit member with several tasks is one multi-process run.
- `SweepSummary`: a Hydra callback (conf/hydra/tuneforge.yaml names it for every entry point). At
  the start it records which keys the sweep varies (`swept_keys.json`), after each member that
  member's status and objective (`job_result.json` in its directory), and at the end
  `sweep_summary.json` and `sweep_summary.md` (member, swept values, status, objective, final
  metrics) in the sweep directory.

The same code serves every launcher (basic, submitit on SLURM, Ray) and sweeper (basic, Optuna):
it reads only what Hydra itself records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from trainer.config import LoggerConfig

JOB_RESULT_FILE = "job_result.json"
SWEPT_KEYS_FILE = "swept_keys.json"
SUMMARY_JSON = "sweep_summary.json"
SUMMARY_MD = "sweep_summary.md"


@dataclass(frozen=True)
class SweepMember:
    sweep_dir: Path
    num: int
    overrides: tuple[str, ...]  # all of this member's overrides, sweep values resolved
    swept: tuple[str, ...]  # those of them that differ between members

    @property
    def sweep_name(self) -> str:
        # multirun/<stage>/<run id>: the run id names the sweep, the stage says what it sweeps.
        return f"{self.sweep_dir.parent.name}-{self.sweep_dir.name}"

    @property
    def run_name(self) -> str:
        return f"{self.num}: {' '.join(self.swept) or '(no swept values)'}"


def swept_keys(overrides: list[str], sweeper_params: Optional[dict]) -> list[str]:
    """The keys a sweep varies: command-line sweeps (`a=1,2`, `range()`, `choice()`, `interval()`)
    and the sweeper's own `params` (Optuna's search space)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = [o.key_or_group for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()]
    return sorted(set(keys) | set(sweeper_params or {}))


def only_swept(overrides: list[str] | tuple[str, ...], keys: Optional[list[str]]) -> tuple[str, ...]:
    if keys is None:  # nothing recorded what the sweep varies: show everything
        return tuple(overrides)
    return tuple(o for o in overrides if o.lstrip("+~").split("=", 1)[0] in keys)


def _recorded_swept_keys(sweep_dir: Path) -> Optional[list[str]]:
    path = sweep_dir / SWEPT_KEYS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def current_member() -> Optional[SweepMember]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    sweep_dir, overrides = Path(hc.sweep.dir), tuple(hc.overrides.task)
    return SweepMember(sweep_dir, int(hc.job.num), overrides, only_swept(overrides, _recorded_swept_keys(sweep_dir)))


def tag_logger(cfg: LoggerConfig, config: dict, member: Optional[SweepMember]) -> tuple[LoggerConfig, dict]:
    """The logger settings and logged config of a sweep member: the sweep's W&B group (unless the
    user named one), its overrides as run name (unless named) and under `sweep` in the config."""
    if member is None:
        return cfg, config
    cfg = dataclasses.replace(cfg, group=cfg.group or member.sweep_name, run_name=cfg.run_name or member.run_name)
    sweep = {"name": member.sweep_name, "dir": str(member.sweep_dir), "member": member.num,
             "swept": list(member.swept), "overrides": list(member.overrides)}
    return cfg, {**config, "sweep": sweep}


def join_submitit_ranks() -> None:
    """A submitit job with several tasks runs the member once per task: make those tasks the
    ranks of one torch.distributed world (rank = SLURM task), as torchrun would have."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or "RANK" in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    # Each rank picks its own GPU by LOCAL_RANK (trainer.engine), so all stay visible.
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def objective(metrics: dict, name: Optional[str]) -> Optional[float]:
    """What the entry function returns for a sweeper (Optuna) to optimise: metric `name` of the
    final evaluation, None when there was none."""
    value = metrics.get(name) if name else None
    return None if value is None else float(value)


def final_metrics(run_dir: Path) -> dict[str, Any]:
    """The last logged value of every metric in `run_dir/metrics.jsonl`."""
    last: dict[str, Any] = {}
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return last
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
        last.update({k: v for k, v in record.items() if k != "time"})
    return last


def summarise(sweep_dir: Path) -> list[dict]:
    """One entry per member directory (`<sweep_dir>/<n>/` with Hydra's `.hydra/overrides.yaml`)."""
    import yaml

    keys = _recorded_swept_keys(sweep_dir)
    members = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml"), key=lambda p: _member_key(p.parents[1])):
        member_dir = overrides_file.parents[1]
        result_file = member_dir / JOB_RESULT_FILE
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        members.append({
            "member": member_dir.name,
            "swept": list(only_swept(overrides, keys)),
            "overrides": overrides,
            # No result file: the job died before Hydra could record one (killed, SystemExit).
            "status": result.get("status", "FAILED"),
            "objective": result.get("objective"),
            "metrics": final_metrics(member_dir),
            "dir": str(member_dir),
        })
    return members


def _member_key(path: Path):
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def summary_markdown(members: list[dict]) -> str:
    eval_keys = sorted({k for m in members for k in m["metrics"] if k.startswith("eval/")})
    header = ["member", "swept values", "status", "objective", "step", *eval_keys]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in members:
        cells = [m["member"], " ".join(m["swept"]) or "-", m["status"], _fmt(m["objective"]),
                 _fmt(m["metrics"].get("step")), *(_fmt(m["metrics"].get(k)) for k in eval_keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


class SweepSummary(Callback):
    """Named under `hydra.callbacks` in every entry point's config."""

    def on_multirun_start(self, config, **kwargs) -> None:
        # Imported where a sweep writes (trainer.checkpoint loads torch): reading one (trainer.report) stays light.
        from trainer.checkpoint import atomic_write

        # Members (maybe on other machines, sharing the sweep directory) read this to name their runs.
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        params = OmegaConf.to_container(config.hydra.sweeper.params) if config.hydra.sweeper.get("params") else None
        keys = swept_keys(list(config.hydra.overrides.task), params)
        atomic_write(sweep_dir / SWEPT_KEYS_FILE, json.dumps(keys))

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        from trainer.checkpoint import atomic_write

        # Every rank of a multi-task submitit member ends the job; rank 0 speaks for it.
        if HydraConfig.get().mode != RunMode.MULTIRUN or int(os.environ.get("RANK", 0)) != 0:
            return
        value = job_return.return_value if job_return.status == JobStatus.COMPLETED else None
        result = {"status": job_return.status.name,
                  "objective": value if isinstance(value, (int, float)) else None}
        atomic_write(Path(HydraConfig.get().runtime.output_dir) / JOB_RESULT_FILE, json.dumps(result, indent=2))

    def on_multirun_end(self, config, **kwargs) -> None:
        from trainer.checkpoint import atomic_write

        sweep_dir = Path(str(config.hydra.sweep.dir))
        members = summarise(sweep_dir)
        atomic_write(sweep_dir / SUMMARY_JSON, json.dumps({"sweep_dir": str(sweep_dir), "members": members}, indent=2))
        atomic_write(sweep_dir / SUMMARY_MD, summary_markdown(members))
        print(f"sweep summary: {sweep_dir / SUMMARY_MD}", flush=True)
