"""Supervised fine-tuning on prompt/completion data (primary config: conf/sft.yaml).

    python -m trainer.sft [hydra overrides]
    torchrun --nproc_per_node N -m trainer.sft [overrides]
    deepspeed --no_local_rank --num_gpus N --module trainer.sft [overrides]
"""

from trainer.cli import launch
from trainer.run import stage_main

if __name__ == "__main__":
    launch(stage_main("sft"), "sft")
