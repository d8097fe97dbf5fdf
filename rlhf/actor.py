"""The policy: generates rollouts, scores its own log-probs, and trains with the clipped surrogate.

Generation under ZeRO-3 would re-gather every layer for every new token. With
`rollout.generation=replica` (default) each rank keeps a plain copy of the policy that generates
with a KV cache and no ZeRO hooks; it is refreshed from the engine (one gather of the parameters)
after every update. `rollout.generation=zero3` generates through the engine itself, for comparison
and for models too large to hold whole on one device. A policy that is not partitioned (stage 0-2,
e.g. `auto` on one rank) needs no replica: its engine's module generates.

With `rollout.old_logprobs` resolving to generation, sampling also records each sampled token's
log-prob (`SampledLogprobs`), and the driver skips the policy's forward pass over the rollouts.

Each sequence is sampled with its own seed (`sample_responses`): its own generator draws its tokens, so a
prompt's samples depend on (seed, iteration, prompt position, sample index) alone, not on which rank or batch
they share.
"""

from __future__ import annotations

import inspect
import time
from typing import Optional

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from rlhf.algorithms import aggregate_loss, kl_estimate, loss_items, policy_loss_terms, truncated_is_weights
from rlhf.config import old_logprobs_from_generation
from rlhf.experience import Experience, Generation, cut_at_stop, first_appearance_ids
from rlhf.worker import RoleWorker
from trainer.adapters import adapters_disabled, copy_merged, is_adapted
from trainer.engine import device, torch_linear
from trainer.evaluate import left_pad, stop_token_ids
from trainer.model import build_causal_lm


class SampledLogprobs(LogitsProcessor):
    """Records log p(token) of every sampled token under softmax(logits / temperature), the
    distribution PPO's policy loss scores it with (`RoleWorker.response_logprobs`).

    `sample_responses` runs it first, before the temperature, top-k and top-p warpers and the sampler,
    so the scores seen here are the logits themselves (a unit test pins it). `generate` hands each processor
    the sequence so far:
    the token drawn at step k is read at step k+1, and the last one from the finished sequences
    (`finish`). Only one step's (B, V) log-softmax is held at a time."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.steps: list[torch.Tensor] = []  # (B,) per generated token
        self._pending = None  # (B, V) log-softmax of the step whose token is not known yet

    def _take(self, tokens: torch.Tensor) -> None:
        if self._pending is not None:
            self.steps.append(self._pending.gather(1, tokens[:, None]).squeeze(1))
        self._pending = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._take(input_ids[:, -1])
        self._pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """(B, new tokens) log-probs, given `generate`'s output (B, prompt + new tokens)."""
        self._take(sequences[:, -1])
        if not self.steps:
            return sequences.new_zeros((sequences.shape[0], 0), dtype=torch.float32)
        return torch.stack(self.steps, dim=1)


class SeededRowSampler(LogitsProcessor):
    """Draws each row's next token from softmax(scores) with that row's own generator and leaves only that
    token possible, so `generate`'s greedy pick takes it: a sequence's sample depends on its seed alone.

    Inverse-CDF sampling: one uniform number per row from its generator, then one batched search of the rows'
    cumulative probabilities, where a `multinomial` per row (the obvious way to use a generator per row) runs one
    full pass over the vocabulary per row and step (its cost: docs/benchmarks.md)."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        cdf = torch.softmax(scores.float(), dim=-1).cumsum_(-1)  # (B, V)
        u = torch.cat([torch.rand(1, generator=g, device=cdf.device) for g in self.generators])  # (B,)
        # The first token whose cumulative probability exceeds u (scaled to the row's total, which rounding
        # leaves a little off 1); a token of probability 0 never does.
        tokens = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp_(max=cdf.shape[1] - 1)  # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens, 0.0)


def shared_prefill(model, prompts: list[list[int]], input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """A KV cache of every left-padded row's prompt but its last token, computed once per distinct prompt and
    copied to the rows that repeat it (a group's samples), for `generate` to continue from; None when every
    prompt is distinct or one token wide. `generate` then runs only the last prompt token per row before
    sampling, at the positions it would have given the whole prompt (from the attention mask)."""
    from transformers import DynamicCache

    owner = first_appearance_ids(tuple(p) for p in prompts)  # (B,) each row's distinct prompt
    distinct = max(owner, default=-1) + 1
    if distinct == len(prompts) or input_ids.shape[1] < 2:
        return None
    rows = torch.tensor([owner.index(u) for u in range(distinct)])  # (U,) a row holding each distinct prompt
    ids, mask = input_ids[rows, :-1], attention_mask[rows, :-1]  # (U, W - 1)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as `generate` derives them
    cache = DynamicCache(config=getattr(model, "config", None))
    model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
          **cache_kwarg(model, cache))
    cache.reorder_cache(torch.tensor(owner, device=input_ids.device))  # (U, ...) -> (B, ...)
    return cache


def cache_kwarg(model, cache) -> dict:
    """`cache` as the keyword this Transformers version's models take: `cache` (since 5.2x), `past_key_values`
    before (deprecated after)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model's own takes **kwargs
    return {"cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values": cache}


@torch.no_grad()
def sample_responses(model, prompts: list[list[int]], seeds: Optional[list[int]], *, max_new_tokens: int,
                     temperature: float, top_k: int, top_p: float, stop_ids: list[int], pad_id: int,
                     record: bool = False, synced: bool = False,
                     share_prompt: bool = False) -> tuple[list[list[int]], Optional[list[list[float]]]]:
    """Responses to left-padded, KV-cached `prompts` (token ids, cut after the first stop token): greedy when
    `seeds` is None, else each row sampled with its own seed from softmax(logits / temperature) truncated by
    top-k then top-p (as `generate`'s own warpers would), and, with `record`, each sampled token's log-prob
    under the untruncated temperature-scaled distribution (the one PPO's loss scores). With `share_prompt`
    (rollout.share_prompt) a prompt that several rows repeat is prefilled once (`shared_prefill`); not with
    `synced` (ZeRO-3 ranks must run the same forward passes)."""
    dev = device()
    input_ids, attention_mask = left_pad(prompts, pad_id)
    input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
    recorder = SampledLogprobs(temperature) if record and seeds is not None else None
    processors = []
    if seeds is not None:
        processors = [p for p in (recorder,
                                  TemperatureLogitsWarper(temperature) if temperature != 1.0 else None,
                                  TopKLogitsWarper(top_k) if top_k > 0 else None,
                                  TopPLogitsWarper(top_p) if top_p < 1.0 else None,
                                  SeededRowSampler(seeds, dev)) if p is not None]
    with torch_linear():  # no gradients here: ZeRO-3's Linear wrapper would only cost time
        cache = shared_prefill(model, prompts, input_ids, attention_mask) if share_prompt and not synced else None
        prefilled = cache_kwarg(model, cache) if cache is not None else {}
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **prefilled,
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                             pad_token_id=pad_id, use_cache=True, synced_gpus=synced,
                             logits_processor=LogitsProcessorList(processors))
    stops = set(stop_ids)
    responses = [cut_at_stop(row.tolist(), stops) for row in out[:, input_ids.shape[1]:].cpu()]
    logps = None
    if recorder is not None:
        logps = [row[: len(resp)] for row, resp in zip(recorder.finish(out).cpu().tolist(), responses)]
    return responses, logps


class PolicyWorker(RoleWorker):
    trains = True

    def setup(self) -> None:
        self.build(build_causal_lm, total_steps=self.cfg.optimizer_steps, grad_accum=self.grad_accum())
        self.stop_ids = stop_token_ids(self.tokenizer)
        self.replica = None
        # A replica only pays under ZeRO-3: unpartitioned, the engine's own module generates as fast.
        if self.cfg.rollout.generation == "replica" and self.role_cfg.deepspeed.stage == 3:
            from transformers import AutoModelForCausalLM

            config = self.engine.module.config  # a peft model hands on its base model's
            # Built on the device: on the CPU, a large replica's random init, which refresh_replica overwrites
            # anyway, is slow and delays the start for nothing.
            with torch.device(device()):
                self.replica = AutoModelForCausalLM.from_config(config, dtype=next(self.engine.module.parameters()).dtype)
            self.replica.requires_grad_(False).eval()
            self.refresh_replica(changed_only=False)
        if self.rank == 0:
            how = ("recorded while sampling" if old_logprobs_from_generation(self.cfg.rollout, self.precision)
                   else "recomputed by a forward pass")
            print(f"policy: {self.precision}, old log-probs {how} (rollout.old_logprobs={self.cfg.rollout.old_logprobs})",
                  flush=True)

    def refresh_replica(self, changed_only: bool = True) -> float:
        """Copy the engine's current weights into the generation replica, gathered once (a replica exists
        only under ZeRO-3). With adapters (actor.peft) the replica is the plain model with them merged in, and
        after an update only the adapted layers (and any module trained in full) are rewritten."""
        if self.replica is None:
            return 0.0
        import deepspeed

        t0 = time.perf_counter()
        if is_adapted(self.engine.module):
            copy_merged(self.engine.module, self.replica, changed_only)
            return time.perf_counter() - t0
        params = dict(self.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            for name, p in self.replica.named_parameters():
                p.data.copy_(params[name].data)
        return time.perf_counter() - t0

    def reference_log_probs(self, exp: Experience) -> torch.Tensor:
        """(B, T) the reference's log-probs of this rank's shard when the reference is this policy with its adapters
        off (`PPOConfig.reference_from_policy`): the model it started from, with no second copy of the weights."""
        with adapters_disabled(self.engine.module):
            return self.log_probs(exp)

    def generate(self, prompts: list[list[int]], seeds: Optional[list[int]] = None) -> Generation:
        """Responses for this rank's prompts: greedy without `seeds`, else each sampled with its seed (a resumed
        run draws the same rollouts), with their tokens' log-probs when sampling records them
        (rollout.old_logprobs, or algo.tis_cap, which needs them beside recomputed ones)."""
        t0 = time.perf_counter()
        r = self.cfg.rollout
        record = seeds is not None and (old_logprobs_from_generation(r, self.precision) or
                                        self.cfg.algo.tis_cap is not None)
        model = self.engine.module if self.replica is None else self.replica
        # Every rank of a ZeRO-3 group takes part in each other's per-layer gathers until all have finished.
        synced = self.replica is None and self.role_cfg.deepspeed.stage == 3 and self.world_size > 1
        responses, logps = sample_responses(model, prompts, seeds, max_new_tokens=r.max_new_tokens,
                                            temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                                            stop_ids=self.stop_ids, pad_id=self.tokenizer.pad_token_id,
                                            record=record, synced=synced, share_prompt=self.share_prompt)
        return Generation(responses, logps, time.perf_counter() - t0)

    def train(self, exp: Experience, iteration: int, kl_coef: float) -> dict:
        """One policy update on this rank's shard; `kl_coef` weighs the KL term when algo.kl_in=loss. The loss is
        algo.ratio's clipped surrogate (with algo.tis_cap's importance weights), aggregated as algo.loss_agg."""
        a, temperature = self.cfg.algo, self.cfg.rollout.temperature

        def loss_fn(m: Experience):
            logp, entropy = self.response_logprobs(m, temperature, with_entropy=True,
                                                   entropy_grad=bool(a.entropy_coef))
            mask = m.response_mask
            tokens = mask.sum()
            weights = None if a.tis_cap is None else truncated_is_weights(m.old_logp, m.rollout_logp, a.tis_cap)
            terms, stats = policy_loss_terms(logp, m.old_logp, m.advantages, mask, a.clip_eps, a.clip_eps_high,
                                             a.ratio, weights)
            loss, _ = aggregate_loss(terms, mask, a.loss_agg)
            out = {"clip_frac": stats["clip_frac"] * tokens, "approx_kl": stats["approx_kl"] * tokens,
                   "entropy": (entropy.detach() * mask).sum()}
            if weights is not None:
                out["tis_weight"] = (weights * mask).sum()
                out["tis_capped_frac"] = ((weights >= a.tis_cap).float() * mask).sum()
            if a.entropy_coef:
                loss = loss - a.entropy_coef * aggregate_loss(entropy, mask, a.loss_agg)[0]
            if a.kl_in == "loss" and m.ref_logp is not None:
                kl = kl_estimate(logp, m.ref_logp, a.kl_estimator)  # (b, t)
                loss = loss + kl_coef * aggregate_loss(kl, mask, a.loss_agg)[0]
                out["kl_loss"] = (kl.detach() * mask).sum()
            return loss, out

        metrics = self.ppo_update(exp, iteration, loss_fn, items=lambda m: loss_items(m.response_mask, a.loss_agg))
        metrics["replica_refresh_s"] = self.refresh_replica()
        return metrics

    def after_load(self) -> None:
        self.refresh_replica(changed_only=False)
