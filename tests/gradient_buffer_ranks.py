"""Run by test_training.py under `launch.torchrun` on 2 ranks: two optimizer steps of the same small model, with
different data on each rank, two micro-batches per step and one parameter that gets no gradient, through
`trainer.engine.build_engine` (its gradients in one buffer: `gradients_in_one_buffer`) and through DeepSpeed's own
stage-0 engine; rank 0 writes whether the two agree and whether the gradients stayed in the buffer."""

import json
import sys

import torch

from trainer.config import DeepSpeedConfig, OptimConfig
from trainer.engine import build_deepspeed_config, build_engine, build_optimizer, init_distributed, optimizer_step


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 1)
        self.unused = torch.nn.Linear(4, 4)  # no gradient: takes part as zeros, as DeepSpeed fills it

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).square().sum()


def train(engine, rank: int) -> tuple[list[torch.Tensor], bool]:
    bound = True
    for step in range(2):
        for micro in range(2):
            x = torch.randn(3, 8, generator=torch.Generator().manual_seed(100 * step + 10 * micro + rank))
            engine.backward(engine(x), scale_wrt_gas=False)
            flat = getattr(engine, "gradient_buffer", None)
            if flat is not None:  # every gradient a view of the one buffer, after accumulation too
                buffer = flat.untyped_storage().data_ptr()
                bound &= all(p.grad is not None and p.grad.untyped_storage().data_ptr() == buffer
                             for p in engine.module.parameters())
            optimizer_step(engine)
    return [p.detach().clone() for p in engine.module.parameters()], bound


def main(out: str) -> None:
    import deepspeed

    info = init_distributed()
    ds, optim = DeepSpeedConfig(stage=0), OptimConfig(lr=0.1, weight_decay=0.1, warmup_steps=0, min_lr_ratio=1.0)  # a constant rate, as DeepSpeed alone has
    config = build_deepspeed_config(ds, 3, 2, info.world_size, 1.0)
    torch.manual_seed(0)
    start = [p.detach().clone() for p in Model().parameters()]
    torch.manual_seed(0)
    ours = build_engine(Model(), ds, optim, config)
    torch.manual_seed(0)
    model = Model()
    theirs, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, optim, offload=False),
                                      config=config)
    mine, bound = train(ours, info.rank)
    reference, _ = train(theirs, info.rank)
    if info.rank == 0:
        json.dump({"buffered": getattr(ours, "gradient_buffer", None) is not None, "bound": bound,
                   "equal": all(torch.equal(a, b) for a, b in zip(mine, reference)),
                   "moved": sum(not torch.equal(a, b) for a, b in zip(mine, start)),
                   "max_diff": max(float((a - b).abs().max()) for a, b in zip(mine, reference))}, open(out, "w"))


if __name__ == "__main__":
    main(sys.argv[1])
