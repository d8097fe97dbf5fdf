"""Secrets out of the files Hydra writes itself.

Hydra saves a run's config, its own config and the command-line overrides (`.hydra/config.yaml`,
`.hydra/hydra.yaml`, `.hydra/overrides.yaml`, and a sweep's `multirun.yaml`) before any of our code runs, so a
token given as an override would sit there in clear text. `RedactSecrets`, a Hydra callback that
conf/hydra/tuneforge.yaml names for every entry point, rewrites them through `trainer.contracts.scrub_secrets`
as the job starts, before the task reads anything. The task itself has the real values.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

from trainer.contracts import scrub_secrets

HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


def redact_yaml_file(path: Path) -> None:
    """Rewrite `path` with its secrets redacted; untouched when it holds none (or does not exist)."""
    if not path.is_file():
        return
    data = yaml.safe_load(path.read_text())
    clean = scrub_secrets(data)
    if clean == data:
        return
    # Ranks and sweep members may rewrite the same file at once: each replaces it whole.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(clean, default_flow_style=False, sort_keys=False, allow_unicode=True))
    os.replace(tmp, path)


class RedactSecrets(Callback):
    def on_job_start(self, config, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.output_subdir is not None:  # null on ranks other than 0 (trainer.cli)
            for name in HYDRA_FILES:
                redact_yaml_file(Path(hc.runtime.output_dir) / hc.output_subdir / name)
        if hc.mode == RunMode.MULTIRUN:
            redact_yaml_file(Path(hc.sweep.dir) / "multirun.yaml")
