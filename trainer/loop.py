"""The one training loop every supervised stage shares.

`fit` owns the DeepSpeed step, gradient accumulation, global loss
normalisation, non-finite handling, logging cadence, evaluation cadence,
checkpoints and preemption signals. What differs between stages — the data
rows and the loss — comes in as `rows` and a `Task`; a task's own training metrics
(DPO's reward accuracy and margins) come back with its loss (`LossWithMetrics`) and
are logged beside the loss, as means per loss item over all ranks.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from trainer.checkpoint import save_checkpoint
from trainer.config import TrainingJobConfig
from trainer.engine import DistInfo, all_reduce_sum, device, peak_memory_gb
from trainer.metrics import MetricsLogger
from trainer.objectives import Task, split_loss
from trainer.progress import progress
from trainer.sampling import SeededOrder
from trainer.step import count_skip, optimizer_step_over


@dataclass
class TrainState:
    """Counters that travel in the checkpoint's client_state."""

    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    loss_items_seen: int = 0
    nonfinite_skips: int = 0
    world_size: int = 1
    preempted: bool = False

    def to_client_state(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "preempted"}

    @classmethod
    def from_client_state(cls, d: dict) -> "TrainState":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "preempted"})


class GlobalBatchSampler:
    """Deterministic sample order that depends only on (seed, step), never on world size.

    Step s consumes positions [s*G, (s+1)*G) of the endless seeded order over the rows (one permutation
    per epoch), G = micro * accum * world. Rank r's micro-batch m takes a contiguous slice of that
    window, so 2 ranks x b and 1 rank x 2b see the same global batch, and resuming needs nothing but
    the step counter.
    """

    def __init__(self, num_rows: int, micro: int, accum: int, world: int, seed: int):
        self.n, self.micro, self.accum, self.world = num_rows, micro, accum, world
        self.order = SeededOrder(num_rows, seed, "train_rows")

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def micro_batch(self, step: int, micro_idx: int, rank: int) -> list[int]:
        return self.order.take(step * self.global_batch + (micro_idx * self.world + rank) * self.micro, self.micro)

    def epoch(self, step: int) -> float:
        return step * self.global_batch / self.n


class PreemptionFlag:
    """SIGTERM/SIGUSR1 ask the loop to finish the current step, save and exit."""

    def __init__(self):
        self.requested = False
        self.requested_at: Optional[float] = None  # time.monotonic() of the first signal
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if not self.requested:
            self.requested_at = time.monotonic()
        self.requested = True

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class FitContext:
    cfg: TrainingJobConfig
    dist: DistInfo
    run_dir: Path
    logger: MetricsLogger
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    # evaluate(step) -> metrics; collective, called on every rank.
    evaluate: Optional[Callable[[int], dict]] = None


def _row_tokens(row: dict) -> int:
    """Real (unpadded) tokens of a data row: `input_ids` of a causal-LM row, or
    `chosen_input_ids` + `rejected_input_ids` of a preference pair."""
    return sum(len(v) for k, v in row.items() if k.endswith("input_ids"))


def fit(engine, task: Task, rows: list[dict], ctx: FitContext, state: TrainState) -> TrainState:
    cfg, info = ctx.cfg, ctx.dist
    t = cfg.train
    sampler = GlobalBatchSampler(len(rows), t.micro_batch_size, t.grad_accum, info.world_size, cfg.seed)
    ckpt_root = ctx.run_dir / "checkpoints"
    flag = PreemptionFlag()
    bar = progress(total=t.max_steps, initial=state.step, enabled=info.is_main, desc=cfg.stage, unit="step")
    window = _Window()
    dev = device()
    try:
        if ctx.evaluate is not None and t.eval_at_start and state.step == 0:
            ctx.logger.log(0, ctx.evaluate(0))  # the starting model, for comparison
        while state.step < t.max_steps:
            step_start = time.perf_counter()
            micro_rows = [[rows[i] for i in sampler.micro_batch(state.step, m, info.rank)] for m in range(t.grad_accum)]
            batches = [{k: v.to(dev) for k, v in ctx.collate(r).items()} for r in micro_rows]
            local_items = sum(task.count(b) for b in batches)
            local_tokens = sum(_row_tokens(row) for r in micro_rows for row in r)
            # One collective per step: item count for normalisation + the preemption vote.
            global_items, global_tokens, stop_votes = all_reduce_sum([local_items, local_tokens, float(flag.requested)])
            global_items = max(global_items, 1.0)

            step_sums: dict[str, float] = {}

            def micro_losses():
                for b in batches:
                    loss, sums = split_loss(task.loss(engine, b))
                    for k, v in sums.items():
                        step_sums[k] = step_sums.get(k, 0.0) + v
                    yield loss

            result = optimizer_step_over(engine, micro_losses(), global_items, info.world_size, t.nonfinite,
                                         where=f"step {state.step}")
            if result.skipped:
                state.nonfinite_skips = count_skip(state.nonfinite_skips, t.max_nonfinite_skips, f"step {state.step}")
            else:
                window.add(result.loss_sum, global_items, result.grad_norm, step_sums)

            state.step += 1
            state.samples_seen += sampler.global_batch
            state.tokens_seen += int(global_tokens)
            state.loss_items_seen += int(global_items)
            window.tokens += global_tokens
            window.seconds += time.perf_counter() - step_start
            bar.update(1)

            if state.step % cfg.logger.log_every == 0 or state.step == t.max_steps:
                metrics = window.flush(engine, state, sampler)
                if metrics:
                    ctx.logger.log(state.step, metrics)
                    bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", refresh=False)
            if ctx.evaluate is not None and t.eval_every > 0 and (state.step % t.eval_every == 0 or state.step == t.max_steps):
                ctx.logger.log(state.step, ctx.evaluate(state.step))
            preempt = stop_votes > 0
            if (t.save_every > 0 and state.step % t.save_every == 0) or state.step == t.max_steps or preempt:
                save_checkpoint(engine, ckpt_root, state.step, state.to_client_state(), t.keep_last)
            if preempt:
                state.preempted = True
                break
    finally:
        bar.close()
        flag.restore()
    return state


@dataclass
class _Window:
    """Running sums between two log lines."""

    loss: float = 0.0  # this rank's summed loss
    items: float = 0.0  # global loss items
    task_sums: dict = field(default_factory=dict)  # this rank's sums of the task's own metrics (LossWithMetrics)
    steps: int = 0
    grad_norms: list = field(default_factory=list)
    tokens: float = 0.0
    seconds: float = 0.0

    def add(self, local_loss_sum: float, global_items: float, grad_norm, task_sums: dict[str, float]) -> None:
        self.loss += local_loss_sum
        self.items += global_items
        for k, v in task_sums.items():
            self.task_sums[k] = self.task_sums.get(k, 0.0) + v
        self.steps += 1
        if grad_norm is not None:
            self.grad_norms.append(float(grad_norm))

    def flush(self, engine, state: TrainState, sampler: GlobalBatchSampler) -> dict:
        # Each rank holds its own loss and metric sums; one all-reduce gives the global means. Every rank ran
        # the same task over the same steps (a non-finite loss skips on all ranks), so the keys agree.
        names = sorted(self.task_sums)
        loss_sum, *task_sums = all_reduce_sum([self.loss] + [self.task_sums[k] for k in names])
        metrics = {}
        if self.items > 0:
            metrics = {
                "train/loss": loss_sum / self.items,
                **{f"train/{k}": v / self.items for k, v in zip(names, task_sums)},
                "train/lr": engine.get_lr()[0],
                "train/grad_norm": sum(self.grad_norms) / max(1, len(self.grad_norms)),
                "train/tokens_per_s": self.tokens / max(self.seconds, 1e-9),
                # rows per second: packed sequences (sft, instruct) or preference pairs (reward)
                "train/samples_per_s": self.steps * sampler.global_batch / max(self.seconds, 1e-9),
                "train/step_time_s": self.seconds / max(1, self.steps),
                "train/epoch": sampler.epoch(state.step),
                "train/tokens_seen": state.tokens_seen,
                "train/nonfinite_skips": state.nonfinite_skips,
                "system/memory_gb": peak_memory_gb(),
            }
        self.__init__()
        return metrics
