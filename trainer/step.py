"""One optimizer step over a window of micro-batches: the core every trained model shares, the supervised
loop's steps and the RL roles' mini-batch updates alike.

Each micro-batch's loss comes summed over its items (tokens, pairs) and is scaled by
world_size / (the window's global item count): DeepSpeed averages gradients over ranks, so the step applies
the gradient of the per-item mean over the whole window on every rank together. A non-finite loss is
decided on all ranks at once (one all-reduce), so they skip or stop together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from trainer.engine import all_reduce_sum, optimizer_step


class NonFiniteError(RuntimeError):
    """Training cannot go on without applying a non-finite update; the message says where."""


@dataclass
class StepResult:
    loss_sum: float  # this rank's loss summed over the window's micro-batches (nan when skipped)
    grad_norm: Optional[float]  # the global gradient norm before clipping (None when skipped)
    skipped: bool  # a non-finite loss: no update was applied


def optimizer_step_over(engine, micro_losses: Iterable[torch.Tensor], num_items: float, world_size: int,
                        nonfinite: str, where: str) -> StepResult:
    """Backward every loss `micro_losses` yields (lazily: each graph is freed before the next forward), then
    the optimizer step at the window's end. `num_items` is the window's global item count.

    A non-finite loss in the first micro-batch skips the window without an update (train.nonfinite=skip); later
    in the window, earlier micro-batches' gradients already sit in DeepSpeed's partitioned buffers and cannot
    be withdrawn exactly, so that stops, as does train.nonfinite=stop. A non-finite gradient norm after the step
    stops too: the update is already applied. `where` names the step in the messages."""
    total, grad_norm = 0.0, None
    for m, loss_sum in enumerate(micro_losses):
        finite = all_reduce_sum([float(not torch.isfinite(loss_sum).item())])[0] == 0
        if not finite:
            if nonfinite == "stop":
                raise NonFiniteError(f"{where}: non-finite loss; stopping (train.nonfinite=stop, last checkpoint is intact)")
            if m > 0:
                raise NonFiniteError(f"{where}: non-finite loss in micro-batch {m} of a gradient-accumulation "
                                     f"window; cannot skip it exactly, stopping (last checkpoint is intact)")
            return StepResult(float("nan"), None, True)
        engine.backward(loss_sum * world_size / max(num_items, 1.0), scale_wrt_gas=False)
        grad_norm = optimizer_step(engine)  # None until the last micro-batch (the accumulation boundary)
        total += float(loss_sum.detach())
    if grad_norm is not None and not math.isfinite(grad_norm):
        raise NonFiniteError(f"{where}: gradient norm is {grad_norm}; the update is already applied, so stopping "
                             f"without saving (last checkpoint is intact)")
    return StepResult(total, grad_norm, False)


def count_skip(skips: int, limit: int, where: str) -> int:
    """`skips` + 1, or NonFiniteError once that is more than `limit` (train.max_nonfinite_skips)."""
    skips += 1
    if skips > limit:
        raise NonFiniteError(f"{where}: {skips} non-finite losses skipped, more than train.max_nonfinite_skips="
                             f"{limit}; stopping (last checkpoint is intact)")
    return skips
