"""Where the numbers people watch go: `metrics.jsonl` always, W&B when asked.

Only rank 0 constructs a real logger; other ranks get one that drops everything.
W&B runs offline when no API key is present (unless WANDB_MODE says otherwise), with a note and
never a login prompt, and secrets are scrubbed from anything logged as config.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

from trainer.config import LoggerConfig
from trainer.contracts import redact_text, scrub_secrets


class MetricsLogger:
    def __init__(self, run_dir: Path, cfg: LoggerConfig, config: dict, job_type: str, enabled: bool = True):
        self.enabled = enabled
        self.wandb_run = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a")
        self._samples = run_dir / "samples.jsonl"
        if cfg.backend == "wandb":
            self.wandb_run = _init_wandb(run_dir, cfg, scrub_secrets(config), job_type)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def log_table(self, step: int, name: str, columns: list[str], rows: list[list]) -> None:
        """Sample generations: a line per row in samples.jsonl ({"step", *columns}), so they are there without
        W&B too (trainer.report shows the last step's), and a W&B table when W&B is on."""
        if not self.enabled:
            return
        with open(self._samples, "a") as f:
            f.writelines(json.dumps({"step": step, **dict(zip(columns, row))}) + "\n" for row in rows)
        if self.wandb_run is None:
            return
        import wandb

        self.wandb_run.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def summary(self, metrics: dict[str, float]) -> None:
        if self.enabled and self.wandb_run is not None:
            self.wandb_run.summary.update(metrics)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _init_wandb(run_dir: Path, cfg: LoggerConfig, config: dict, job_type: str):
    import wandb

    mode = cfg.mode
    if mode == "auto" and os.environ.get("WANDB_MODE"):
        mode = None  # the user's WANDB_MODE, which wandb reads itself
    elif mode == "auto" and os.environ.get("WANDB_API_KEY"):
        mode = "online"
    elif mode == "auto":
        mode = "offline"
        print(f"note: W&B logs offline (no WANDB_API_KEY in the environment) to {run_dir / 'wandb'}; upload "
              f"it later with `wandb sync {run_dir / 'wandb'}/offline-run-*`", file=sys.stderr, flush=True)
    # A stored run id lets a requeued job continue the same W&B run.
    id_file = run_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    # W&B records the command line (its run metadata) from sys.argv: an override holding a secret stays out.
    argv, sys.argv = sys.argv, [sys.argv[0], *(redact_text(a) for a in sys.argv[1:])]
    try:
        return wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            # Named by the user or from a sweep's overrides: a secret in them stays out, as from the config.
            group=cfg.group and redact_text(cfg.group),
            name=cfg.run_name and redact_text(cfg.run_name),
            tags=[redact_text(t) for t in cfg.tags],
            job_type=job_type,
            config=config,
            dir=str(run_dir),
            mode=mode,
            id=run_id,
            resume="allow",
            settings=wandb.Settings(silent=True, console="off"),
        )
    finally:
        sys.argv = argv
