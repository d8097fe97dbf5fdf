"""Direct preference optimisation of a causal LM on preference pairs (primary config: conf/dpo.yaml).

    python -m trainer.dpo [hydra overrides]
    torchrun --nproc_per_node N -m trainer.dpo [overrides]
    deepspeed --no_local_rank --num_gpus N --module trainer.dpo [overrides]
"""

from trainer.cli import launch
from trainer.run import stage_main

if __name__ == "__main__":
    launch(stage_main("dpo"), "dpo")
