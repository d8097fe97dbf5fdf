"""Run by test_training.py under `launch.torchrun` on 2 ranks and on 1: two optimizer steps of the same small model, with
different data on each rank, two micro-batches per step and one parameter that gets no gradient, through
`trainer.engine.build_engine` (its gradients in one buffer: `gradients_in_one_buffer`, averaged in memory the ranks
share and, as where they share none, by all-reduce; its clipping keeping the norm: `clipping_that_keeps_its_norm`) and
through DeepSpeed's own stage-0 engine, with a gradient clip that bites and one that does not; rank 0 writes per clip
and averaging whether the two agree, whether the gradients stayed in the buffer, how many ranks' rows its memory
holds and the norms each reported."""

import json
import os
import sys

import torch

from trainer.config import DeepSpeedConfig, OptimConfig
from trainer.engine import build_deepspeed_config, build_engine, build_optimizer, init_distributed, optimizer_step
from trainer.shared_rows import SHM_DIR


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 1)
        self.unused = torch.nn.Linear(4, 4)  # no gradient: takes part as zeros, as DeepSpeed fills it

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).square().sum()


def train(engine, rank: int) -> tuple[list[torch.Tensor], bool, list[float]]:
    bound, norms = True, []
    for step in range(2):
        for micro in range(2):
            x = torch.randn(3, 8, generator=torch.Generator().manual_seed(100 * step + 10 * micro + rank))
            engine.backward(engine(x), scale_wrt_gas=False)
            flat = getattr(engine, "gradient_buffer", None)
            if flat is not None:  # every gradient a view of the one buffer, after accumulation too
                buffer = flat.untyped_storage().data_ptr()
                bound &= all(p.grad is not None and p.grad.untyped_storage().data_ptr() == buffer
                             for p in engine.module.parameters())
            norm = optimizer_step(engine)
            if norm is not None:
                norms.append(norm)
    return [p.detach().clone() for p in engine.module.parameters()], bound, norms


def compare(max_grad_norm: float, rank: int, world_size: int, shared: bool) -> dict:
    import deepspeed

    import trainer.engine

    ds, optim = DeepSpeedConfig(stage=0), OptimConfig(lr=0.1, weight_decay=0.1, warmup_steps=0, min_lr_ratio=1.0)  # a constant rate, as DeepSpeed alone has
    config = build_deepspeed_config(ds, 3, 2, world_size, max_grad_norm)
    torch.manual_seed(0)
    start = [p.detach().clone() for p in Model().parameters()]
    torch.manual_seed(0)
    if shared:
        ours = build_engine(Model(), ds, optim, config)
    else:  # as where the ranks do not share /dev/shm
        mapped, trainer.engine.shared_rows = trainer.engine.shared_rows, lambda *_: "not shared in this test"
        try:
            ours = build_engine(Model(), ds, optim, config)
        finally:
            trainer.engine.shared_rows = mapped
    torch.manual_seed(0)
    model = Model()
    theirs, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, optim, offload=False),
                                      config=config)
    mine, bound, norms = train(ours, rank)
    reference, _, reference_norms = train(theirs, rank)  # its norm computed by optimizer_step, before the step
    flat = ours.gradient_buffer
    rows = flat.untyped_storage().nbytes() // (flat.numel() * flat.element_size())  # every rank's row: shared
    return {"buffered": getattr(ours, "gradient_buffer", None) is not None, "bound": bound, "rows": rows,
            "kept_norm": getattr(ours, "clipped_grad_norm", None) is not None,
            "equal": all(torch.equal(a, b) for a, b in zip(mine, reference)),
            "moved": sum(not torch.equal(a, b) for a, b in zip(mine, start)),
            "max_diff": max(float((a - b).abs().max()) for a, b in zip(mine, reference)),
            "norms": norms, "reference_norms": reference_norms}


def main(out: str) -> None:
    info = init_distributed()
    hows = ("shared", "all-reduce") if info.world_size > 1 else ("one rank",)  # one rank averages nothing
    results = {f"{clip} {how}": compare(clip, info.rank, info.world_size, how == "shared")
               for clip in (0.05, 1e6) for how in hows}
    # the shared memory's files, which rank 0 made, are gone once mapped
    results["left behind"] = [f for f in os.listdir(SHM_DIR) if f.startswith(f"tuneforge-rows-{os.getpid()}-")]
    if info.rank == 0:
        json.dump(results, open(out, "w"))


if __name__ == "__main__":
    from trainer.cli import leave_without_native_teardown

    main(sys.argv[1])
    leave_without_native_teardown()  # as the entry points' ranks leave: the native teardown can abort a finished rank
