"""Instruction tuning on (multi-turn) chat data, a weighted mixture of datasets.

    python -m trainer.instruct [hydra overrides]
    torchrun --nproc_per_node N -m trainer.instruct [overrides]
"""

import hydra
from omegaconf import DictConfig

from trainer.cli import launch
from trainer.run import run_stage


@hydra.main(config_path="../conf", config_name="instruct", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_stage(cfg)


if __name__ == "__main__":
    launch(main)
