"""Reward-model training on preference pairs (primary config: conf/reward.yaml).

    python -m trainer.reward [hydra overrides]
    torchrun --nproc_per_node N -m trainer.reward [overrides]
    deepspeed --no_local_rank --num_gpus N --module trainer.reward [overrides]
"""

from trainer.cli import launch
from trainer.run import stage_main

if __name__ == "__main__":
    launch(stage_main("reward"), "reward")
