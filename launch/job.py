"""What every launcher needs to know about a job: the module a stage runs, how to check its overrides
before anything is submitted, and which environment crosses to other nodes. Loads no training code."""

from __future__ import annotations

import os
from pathlib import Path

from trainer.contracts import SECRET_KEY, STAGE_MODULES

REPO = Path(__file__).resolve().parents[1]

# Variables a run on another node needs from the submitting shell. Launchers that copy the
# environment to other nodes (srun does; pdsh and `ray job submit` do not) pass these only.
FORWARDED_PREFIXES = ("WANDB_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "NCCL_", "GLOO_", "TORCH_", "CUDA_",
                      "TUNEFORGE_", "OMP_", "PYTHON")


class LaunchError(ValueError):
    """A launch request that cannot work; the message names what is wrong."""


def stage_module(stage: str) -> str:
    if stage not in STAGE_MODULES:
        raise LaunchError(f"unknown stage {stage!r}; choose one of {', '.join(STAGE_MODULES)}")
    return STAGE_MODULES[stage]


def check_overrides(stage: str, overrides: list[str]) -> None:
    """Compose the stage's config with `overrides`, so a typo or a bad value fails here, at
    submission, not hours later in a queue. Interpolations stay unresolved: the SFT export a
    PPO job starts from may not exist until an earlier job in the same pipeline has run."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from trainer.compose import compose, error_line
    from trainer.config import ConfigError

    try:
        compose(stage, overrides, typed=False)
    except (HydraException, OmegaConfBaseException, ConfigError) as e:
        raise LaunchError(f"{stage} overrides {overrides}: {error_line(e)}") from None


def forwarded_env(environ: dict[str, str] | None = None, secrets: bool = False) -> dict[str, str]:
    """The variables of `environ` (default: this process's) that a run on another node needs;
    secret-looking ones (the names the W&B config scrubber redacts) only with `secrets=True`.
    Secrets travel in a job's environment only, never in a file or a job spec that gets logged."""
    environ = dict(os.environ if environ is None else environ)
    return {k: v for k, v in sorted(environ.items())
            if k.startswith(FORWARDED_PREFIXES) and (secrets or not SECRET_KEY.search(k))}
