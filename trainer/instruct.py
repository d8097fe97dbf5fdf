"""Instruction tuning on (multi-turn) chat data, a weighted mixture of datasets
(primary config: conf/instruct.yaml). Same loop and launchers as trainer.sft.

    python -m trainer.instruct [hydra overrides]
    torchrun --nproc_per_node N -m trainer.instruct [overrides]
"""

from trainer.cli import launch
from trainer.run import stage_main

if __name__ == "__main__":
    launch(stage_main("instruct"), "instruct")
