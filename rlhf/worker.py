"""What every role actor shares: its rank in the role's own torch.distributed group, model and
engine building through the supervised stages' code, micro-batched forward passes, the PPO update
loop, and checkpoints.

Each Ray actor is one process holding one rank. A role's ranks form their own process group
(NCCL on GPUs, gloo on CPU): rank 0 picks the rendezvous address and the others join it.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch

from rlhf.config import PPOConfig, RoleConfig
from trainer.config import resolve_lr
from rlhf.experience import (
    Experience,
    last_token_positions,
    prompt_groups,
    response_positions,
    shuffled_by_group,
)
from trainer.adapters import add_adapters, parameter_summary
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.engine import (
    DistInfo,
    all_reduce_sum,
    build_deepspeed_config,
    build_engine,
    device,
    has_gpu,
    init_distributed,
    peak_memory_gb,
    resolve_precision,
    torch_dtype,
    torch_linear,
    zero3_init_context,
)
from trainer.model import load_tokenizer
from trainer.objectives import head_inputs_at, logits_at, scores_at
from trainer.sampling import derive_seed, seed_everything
from trainer.step import count_skip, optimizer_step_over


def scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits in float32 divided by the sampling temperature (no copy at temperature 1 in float32)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


class RoleWorker:
    """One rank of one role. Subclasses (`rlhf/actor.py`, `critic.py`, `reference.py`,
    `reward.py`) build their model in `setup` and add the role's methods."""

    trains = False  # actor and critic: an optimizer, an update loop and checkpoints

    def __init__(self, cfg: PPOConfig, role: str, rank: int, world_size: int):
        from trainer.cli import prepare_process

        prepare_process()
        self.cfg, self.role, self.rank, self.world_size = cfg, role, rank, world_size
        role_cfg = cfg.role(role)
        # deepspeed.stage=auto becomes a number for this role's world size and model (said by rank 0). optim.lr is
        # the number the driver resolved and printed (rlhf.ppo.resolve_rates); a worker made without it resolves
        # auto by the peft method alone.
        self.role_cfg: RoleConfig = replace(role_cfg, deepspeed=self._zero_stage(),
                                            optim=resolve_lr(role_cfg.optim, role_cfg.peft.method, f"{role}.optim"))
        if not has_gpu():
            torch.set_num_threads(cfg.cluster.torch_threads)
        seed_everything(cfg.seed)  # random-init roles (tests) start from the same weights in every process
        self.engine = None
        self.model: Optional[torch.nn.Module] = None  # what forward passes run through
        self.info: Optional[DistInfo] = None
        self.nonfinite_skips = 0  # mini-batches skipped for a non-finite loss, over the whole run
        self.share_prompt = cfg.rollout.share_prompt  # log-prob passes lay each group's prompt out once

    def _zero_stage(self):
        resolved, note = self.cfg.zero_stage(self.role)
        if self.rank == 0 and note:
            print(note, flush=True)
        return resolved

    # ------------------------------------------------------------------ process group

    def rendezvous(self) -> tuple[str, int]:
        """Called on rank 0: an address and free port on its node for the role's group."""
        import ray

        from trainer.engine import free_port

        return ray.util.get_node_ip_address(), free_port()

    def init_process_group(self, master_addr: str, master_port: int) -> None:
        # Ray gives each actor its own device (CUDA_VISIBLE_DEVICES), so it is local rank 0.
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        self.info = init_distributed(self.cfg.train.collective_timeout_s)

    def describe(self) -> dict:
        from rlhf.placement import describe_actor

        return {"role": self.role, "rank": self.rank, **describe_actor(), "zero_stage": self.role_cfg.deepspeed.stage}

    # ------------------------------------------------------------------ models

    @property
    def precision(self) -> str:
        return resolve_precision(self.role_cfg.deepspeed.precision)

    def deepspeed_config(self, grad_accum: int = 1) -> dict:
        rc = self.role_cfg
        return build_deepspeed_config(rc.deepspeed, rc.micro_batch_size, grad_accum, self.world_size,
                                      rc.optim.max_grad_norm)

    def build(self, builder: Callable, total_steps: int = 0, grad_accum: int = 1):
        """Build the role's model with `builder(model_cfg, tokenizer, dtype)`: a DeepSpeed training
        engine for trained roles (with `<role>.peft` adapters added before it, so that only they train), a
        ZeRO-3 inference engine for frozen roles at stage 3, or the plain module on the device for small frozen
        roles."""
        rc = self.role_cfg
        self.tokenizer = load_tokenizer(rc.model)
        ds_config = self.deepspeed_config(grad_accum)
        with zero3_init_context(ds_config):
            model = builder(rc.model, self.tokenizer, torch_dtype(self.precision))
            if self.trains:
                model = add_adapters(model, rc.peft, f"{self.role}.peft")
        if self.trains and self.rank == 0:
            print(f"{self.role}: {parameter_summary(model, self.precision)}", flush=True)
        if self.trains:
            # optim.decay_steps, where set, is the schedule's length (to extend a finished run on the same schedule).
            self.engine = build_engine(model, rc.deepspeed, rc.optim, ds_config, rc.optim.decay_steps or total_steps)
            self.model = self.engine
        elif rc.deepspeed.stage == 3:
            self.engine = build_engine(model, rc.deepspeed, None, ds_config)
            self.model = self.engine
        else:
            model.requires_grad_(False)
            self.model = model.to(device())
        self.model.eval()
        return self.model

    # ------------------------------------------------------------------ forward passes

    def _forward_micro(self, exp: Experience, fn: Callable[[Experience], torch.Tensor]) -> list[torch.Tensor]:
        """fn over micro-batches of this rank's shard (every rank runs the same count, as ZeRO-3 needs),
        without gradients."""
        # Trimmed on the CPU (no device sync for the widths), then moved.
        with torch.no_grad(), torch_linear():
            return [fn(micro.to(device())) for micro in exp.micro_batches(self.role_cfg.micro_batch_size,
                                                                          self.share_prompt)]

    def response_logprobs(self, micro: Experience, temperature: float, with_entropy: bool = False,
                          entropy_grad: bool = False):
        """(b, t) log-probs of the response tokens (and their entropies) under the model,
        with logits divided by the sampling temperature as they were when sampling. The entropy
        carries a gradient only with `entropy_grad` (an entropy bonus); as a metric it builds no graph.
        A micro-batch that carries a layout (`Experience.micro_batches` with rollout.share_prompt) scores the
        rollouts of one prompt (a group) in one row that holds the prompt once: the same log-probs, the prompt's
        positions computed once per group."""
        from trainer.logprobs import entropy_from_logits, logprobs_at, logprobs_from_logits

        layout = micro.layout
        if layout is None:
            # The output head (hidden x vocabulary per position: with a realistic vocabulary the largest matmul)
            # runs only at the positions that score a response token, t per row, not over prompts and padding.
            pos = response_positions(micro.prompt_lengths, micro.responses.shape[1], micro.sequences.shape[1])  # (b, t)
            with head_inputs_at(self.model, pos):
                logits = self.model(input_ids=micro.sequences, attention_mask=micro.attention_mask,
                                    use_cache=False).logits  # (b, t, V)
            logits = scaled(logits, temperature)
            logp = logprobs_from_logits(logits, micro.responses)
            if not with_entropy:
                return logp
            return logp, entropy_from_logits(logits if entropy_grad else logits.detach())
        inputs = {"input_ids": layout.input_ids, "position_ids": layout.position_ids,
                  "attention_mask": layout.attention_mask}
        logits, rows = logits_at(self.model, inputs, layout.scored_at)  # (M, V), (b, t)
        logits = scaled(logits, temperature)
        return logprobs_at(logits, rows, micro.responses, with_entropy, entropy_grad)

    def log_probs(self, exp: Experience) -> torch.Tensor:
        """(B, T) log-probs of this rank's shard at the sampling temperature: the reference's scoring call, and
        the policy's when it recomputes the PPO 'old' log-probs (rollout.old_logprobs=recompute)."""
        t = self.cfg.rollout.temperature
        return self._stack(self._forward_micro(exp, lambda m: self.response_logprobs(m, t)), exp.responses.shape[1])

    def response_values(self, micro: Experience) -> torch.Tensor:
        """(b, t) scalar-head outputs at the positions before each response token (critic values)."""
        pos = response_positions(micro.prompt_lengths, micro.responses.shape[1], micro.sequences.shape[1])  # (b, t)
        return scores_at(self.model, {"input_ids": micro.sequences, "attention_mask": micro.attention_mask}, pos)

    def sequence_scores(self, micro: Experience) -> torch.Tensor:
        """(b,) scalar-head output at each sequence's last token (a reward model's score)."""
        last = last_token_positions(micro.attention_mask)[:, None]  # (b, 1)
        return scores_at(self.model, {"input_ids": micro.sequences, "attention_mask": micro.attention_mask}, last)[:, 0]

    def _stack(self, parts: list[torch.Tensor], width: int) -> torch.Tensor:
        from rlhf.experience import pad_right

        return torch.cat([pad_right(p, width) if p.dim() == 2 else p for p in parts]).cpu()

    # ------------------------------------------------------------------ PPO update

    def ppo_update(self, exp: Experience, iteration: int,
                   loss_fn: Callable[[Experience], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                   items: Optional[Callable[[Experience], float]] = None) -> dict:
        """algo.ppo_epochs passes over this rank's shard in mini-batches (algo.mini_batch_size over all
        ranks), one optimizer step each (`trainer.step`, the supervised stages' step). `loss_fn(micro)`
        returns (the micro-batch's loss summed over its items, token-summed stats); `items(micro)` counts
        those items (default: response tokens; sequences for a sequence-level aggregation), and a step
        minimises the summed loss over the whole mini-batch's item count on every rank together. Stats are
        reported as token means. A mini-batch whose loss is non-finite is skipped and counted
        (train.nonfinite, train.max_nonfinite_skips), as in the supervised stages."""
        items = items or (lambda m: float(m.response_mask.sum()))
        a, t = self.cfg.algo, self.cfg.train
        per_rank = a.mini_batch_size // self.world_size
        micro = min(self.role_cfg.micro_batch_size, per_rank)
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "ppo_minibatches", iteration))
        t0 = time.perf_counter()
        # Every mini-batch of every epoch up front, on the CPU (trimming and token counts need no device
        # sync), and their global token counts in one collective.
        # With a shared prompt layout a group's rollouts stay together, so they share a micro-batch's rows.
        groups = prompt_groups(exp) if self.share_prompt else torch.arange(len(exp))
        orders = [shuffled_by_group(groups, gen) for _ in range(a.ppo_epochs)]
        minis = [exp.select(order[start : start + per_rank]) for order in orders
                 for start in range(0, len(exp), per_rank)]
        counts = all_reduce_sum([c for m in minis for c in (items(m), float(m.response_mask.sum()))])
        mini_items, mini_tokens = counts[0::2], counts[1::2]
        sums: dict[str, torch.Tensor] = {}  # summed loss and token-summed stats, kept on the device until the end
        norms, counted_items, counted_tokens, skipped = [], 0.0, 0.0, 0

        def micro_losses(mini: Experience, mini_sums: dict):
            for m in mini.micro_batches(micro, self.share_prompt):
                loss, stats = loss_fn(m.to(device()))
                for k, v in {"loss": loss, **stats}.items():
                    mini_sums[k] = mini_sums.get(k, 0.0) + v.detach()
                yield loss

        self.engine.train()
        for i, mini in enumerate(minis):
            where = f"{self.role} iteration {iteration + 1} mini-batch {i}"
            mini_sums: dict[str, torch.Tensor] = {}
            result = optimizer_step_over(self.engine, micro_losses(mini, mini_sums), mini_items[i], self.world_size,
                                         t.nonfinite, where)
            if result.skipped:
                self.nonfinite_skips = count_skip(self.nonfinite_skips, t.max_nonfinite_skips, where)
                skipped += 1
                continue
            for k, v in mini_sums.items():
                sums[k] = sums.get(k, 0.0) + v
            counted_items += mini_items[i]
            counted_tokens += mini_tokens[i]
            norms.append(result.grad_norm)  # the global norm at the mini-batch's last micro-batch
        self.engine.eval()
        keys = sorted(sums)  # the same on every rank: a skip is decided on all ranks together
        totals = all_reduce_sum([float(sums[k]) for k in keys])
        metrics = {k: v / max(counted_items if k == "loss" else counted_tokens, 1.0) for k, v in zip(keys, totals)}
        metrics["grad_norm"] = sum(n for n in norms if n is not None) / max(len(norms), 1)
        metrics["nonfinite_skipped"] = skipped
        metrics["nonfinite_skips"] = self.nonfinite_skips
        metrics["lr"] = self.engine.get_lr()[0]
        metrics["update_s"] = time.perf_counter() - t0
        metrics["memory_gb"] = peak_memory_gb()  # this rank's peak so far (rank 0's is what the driver logs)
        return metrics

    def grad_accum(self) -> int:
        per_rank = self.cfg.algo.mini_batch_size // self.world_size
        return per_rank // min(self.role_cfg.micro_batch_size, per_rank)

    # ------------------------------------------------------------------ checkpoints

    def save(self, ckpt_root: str, iteration: int) -> str:
        client_state = {"iteration": iteration, "nonfinite_skips": self.nonfinite_skips,
                        "frozen_from": self.role_cfg.frozen_source}
        # Nothing pruned here: the driver prunes once it has committed the iteration (rlhf.checkpoint).
        return str(save_checkpoint(self.engine, Path(ckpt_root) / self.role, iteration, client_state, None))

    def load(self, ckpt_root: str, tag: str) -> int:
        state = load_checkpoint(self.engine, Path(ckpt_root) / self.role, tag, f"{self.role}.deepspeed.stage")
        self.nonfinite_skips = int(state.get("nonfinite_skips", 0))
        self.after_load()
        return int(state.get("iteration", -1))

    def after_load(self) -> None:
        pass
