"""Supervised fine-tuning on prompt/completion data.

    python -m trainer.sft [hydra overrides]
    deepspeed --no_local_rank --num_gpus N -m trainer.sft [overrides]
    torchrun --nproc_per_node N -m trainer.sft [overrides]
"""

import hydra
from omegaconf import DictConfig

from trainer.cli import launch
from trainer.run import run_stage


@hydra.main(config_path="../conf", config_name="sft", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_stage(cfg)


if __name__ == "__main__":
    launch(main)
