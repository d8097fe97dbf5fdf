"""Training objectives: pure loss math plus the small task objects `fit` drives.

A task turns a collated batch into (sum of per-item losses, number of items).
`fit` divides by the item count of the whole global batch, so gradient
accumulation and data parallelism give the gradient of one big batch.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Protocol, Union

import torch
import torch.nn.functional as F

from trainer.config import ConfigError, DPOConfig
from trainer.engine import torch_linear
from trainer.logprobs import logprobs_from_logits

IGNORE_INDEX = -100


class LossWithMetrics(NamedTuple):
    """What a task's `loss` returns when it also reports training metrics: `sums` are per-item sums
    (e.g. correct pairs, summed rewards) that `fit` adds up over its log window and logs as
    `train/<name>` = sum / loss items, the mean per item over all ranks."""

    loss: torch.Tensor  # scalar with grad: the sum of per-item losses
    sums: dict[str, float]


class Task(Protocol):
    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Loss items in the batch, known before the forward pass."""

    def loss(self, model, batch: dict[str, torch.Tensor]) -> Union[torch.Tensor, LossWithMetrics]:
        """Sum of per-item losses (a scalar with grad), alone or with metric sums."""


def split_loss(out: Union[torch.Tensor, LossWithMetrics]) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss, metric sums) of what `Task.loss` returned."""
    return (out.loss, out.sums) if isinstance(out, LossWithMetrics) else (out, {})


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy from every position's logits: what `CausalLMTask.loss` computes from the
    trained positions' only (the definition its test compares against).

    logits: (B, T, V) — position t scores token t+1; labels: (B, T) with IGNORE_INDEX
    on tokens that are not trained. Returns a scalar (sum over trained tokens)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


class CausalLMTask:
    """Next-token prediction on the trained (unmasked) tokens: SFT and instruction tuning."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """`token_nll_sum` of the model's logits, computed only where a trained token is predicted: the output head
        (hidden x vocabulary per position, the largest matmul of a model with a realistic vocabulary) and the
        cross-entropy skip prompts, padding and packed rows' untrained tokens."""
        targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
        trained = targets != IGNORE_INDEX
        at = F.pad(trained, (0, 1))  # (B, T): the positions whose logits are needed
        # No attention_mask: with use_cache off, restarting position_ids make
        # transformers build a block-diagonal mask, isolating packed examples.
        with head_inputs_at(model, at):
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return F.cross_entropy(logits.float(), targets[trained], reduction="sum")  # logits: (N, V), N trained tokens


@contextmanager
def head_inputs_at(model, at: torch.Tensor):
    """Inside, the output head of `model` (a causal LM, possibly under a DeepSpeed engine or peft) sees only the
    hidden states `at` selects, so the model's logits come out for those positions alone: with `at` a (B, T) bool
    mask, (N, V), N = at.sum(), in row-major order; with `at` (B, K) positions, (B, K, V), row b's k-th at
    position at[b, k]. The head's input is swapped by a forward pre-hook, so any model whose head is its output
    embeddings works, under ZeRO-3 (whose own hooks gather the weight) too. The last block's MLP runs only there
    too (`final_layers_only_at`)."""
    unwrapped = getattr(model, "module", model)
    with final_layers_only_at(unwrapped, at, unwrapped.get_output_embeddings()):
        yield


def scores_at(model, inputs: dict[str, torch.Tensor], at: torch.Tensor) -> torch.Tensor:
    """The float scores of a scalar-head model (`AutoModelForSequenceClassification` of a decoder, head `score`)
    only at the positions `at` selects, as `head_inputs_at` selects them: (N,) for a (B, T) bool mask, (B, K) for
    positions. A packed reward batch reads one per sequence, a PPO critic one per response token, a reward model one
    per rollout. The head's output is caught on its way out, and spread back to every position (zeros elsewhere)
    for the model's own pooling, which nobody reads here; any model with a `score` layer works, under ZeRO-3 too."""
    unwrapped = getattr(model, "module", model)
    head = getattr(unwrapped, "score", None)
    if head is None:
        raise ConfigError("this needs a model with a `score` head (AutoModelForSequenceClassification of a "
                          "decoder): packed preference batches (set data.packing=false) and PPO critics/rewards")
    caught: list[torch.Tensor] = []
    with final_layers_only_at(unwrapped, at, head, caught=caught):
        model(**inputs, use_cache=False)
    return caught[0].squeeze(-1).float()


@contextmanager
def final_layers_only_at(model, at: torch.Tensor, head: torch.nn.Module, caught: Optional[list] = None):
    """Inside, `head` (the module `model` applies to its final hidden states) and the last block's MLP
    (`last_block_mlp`, where that is safe) run only at the positions `at` selects ((B, T) bool mask, or (B, K)
    positions): what the block computes elsewhere only reaches the head at positions nobody reads, so the head's
    output there is the same, and the block costs a fraction of its work where few positions are read (SFT's
    completions, RL's responses, a reward model's last tokens). The MLP's output is spread back to every position;
    the head's is left as the selection gives it, or with `caught` appended to it and spread back (a model that
    reads the head's output by position, a sequence classifier's pooling)."""

    def select(hidden: torch.Tensor, at: torch.Tensor) -> torch.Tensor:  # (B, T, H)
        if at.dtype == torch.bool:
            return hidden[at]  # (N, H)
        return hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, K, H)

    def spread(picked: torch.Tensor, like: torch.Tensor, at: torch.Tensor) -> torch.Tensor:  # -> (B, T, picked's last)
        zeros = picked.new_zeros((*like.shape[:-1], picked.shape[-1]))  # positions not selected get zeros
        if at.dtype == torch.bool:
            return zeros.masked_scatter(at[..., None], picked)
        return zeros.scatter(1, at[..., None].expand(-1, -1, picked.shape[-1]), picked)

    def only_at(module: torch.nn.Module, distinct: bool, spread_back: bool, catch: Optional[list] = None) -> list:
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (whole input, where), until the output is handled

        def before(_module, args):
            hidden = args[0]  # (B, T, H)
            # Positions may repeat (padding entries point at a real one). Spread back, a repeat would count that
            # position's gradient once per copy, so a module whose output is spread back runs at each one once.
            mask = at if at.dtype == torch.bool or not distinct else torch.zeros(
                hidden.shape[:2], dtype=torch.bool, device=at.device).scatter_(1, at, True)
            pending.append((hidden, mask))
            return (select(hidden, mask), *args[1:])

        def after(_module, _args, out):
            like, mask = pending.pop()
            if catch is not None:
                catch.append(out)
            return spread(out, like, mask) if spread_back else None

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    # The head's output, read at every position asked for (repeats too), is what callers use; spread back, it only
    # feeds a pooling nobody reads.
    handles = only_at(head, distinct=False, spread_back=caught is not None, catch=caught)
    mlp = last_block_mlp(model)
    if mlp is not None:
        handles += only_at(mlp, distinct=True, spread_back=True)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def last_block_mlp(model) -> Optional[torch.nn.Module]:
    """The MLP of the last decoder block of a Transformers causal LM, where running it at some positions only gives
    the same result at those positions: a position-wise MLP (a class named `...MLP`; not a mixture of experts, whose
    routing and balancing see every token) outside gradient checkpointing (which runs the block again in backward,
    after the hooks are gone, and would find other shapes). None where there is none such."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        return None
    # Transformers marks the checkpointed blocks (and, in older versions, the decoder that runs them).
    if getattr(layers[-1], "gradient_checkpointing", False) or getattr(decoder, "gradient_checkpointing", False):
        return None
    mlp = getattr(layers[-1], "mlp", None)
    return mlp if isinstance(mlp, torch.nn.Module) and type(mlp).__name__.endswith("MLP") else None


def bradley_terry_loss_sum(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor, center_coef: float = 0.0
) -> torch.Tensor:
    """Summed pairwise loss of a reward model.

    chosen, rejected, margin: (B,) scores and required margins. Per pair:
    -logsigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected)^2.
    Returns a scalar (sum over pairs); `fit` divides by the global pair count."""
    chosen, rejected = chosen.float(), rejected.float()
    loss = -F.logsigmoid(chosen - rejected - margin)
    if center_coef:
        loss = loss + center_coef * (chosen + rejected) ** 2
    return loss.sum()


def pair_scores(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores, each (B,), of a batch from `collate_pairs`: both halves go
    through the model in one forward pass (chosen sequences first).

    A padded batch uses the model's own pooling (the last non-padding token). A packed batch
    holds several sequences per row, so the per-token scores of the head (`model.score`, the
    scalar head of `AutoModelForSequenceClassification` decoders) are caught on their way out
    and read at each sequence's last token (`score_index`)."""
    if "score_index" not in batch:
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return scores.squeeze(-1).chunk(2)  # (2B, 1) -> 2 x (B,)
    # attention_mask is None (sequences isolated by restarting position_ids) or, with a shared
    # prompt, a (R, 1, T, T) mask that transformers passes to attention as it is.
    inputs = {k: batch.get(k) for k in ("input_ids", "position_ids", "attention_mask")}
    at, rows = flat_positions(batch["score_index"], batch["input_ids"].shape)
    return scores_at(model, inputs, at)[rows].chunk(2)  # (M,) -> 2 x (B,)


class RewardTask:
    """Bradley-Terry preference loss for a scalar-head reward model."""

    def __init__(self, center_coef: float = 0.0):
        self.center_coef = center_coef

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["margin"].numel()

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen, rejected = pair_scores(model, batch)
        return bradley_terry_loss_sum(chosen, rejected, batch["margin"], self.center_coef)


def flat_positions(index: torch.Tensor, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """`index`, flat positions into (R, T) = `shape` (any shape, repeats allowed), as the (R, T) bool mask of the M
    distinct positions and, shaped like `index`, each entry's row among them in row-major order."""
    at = torch.zeros(shape.numel(), dtype=torch.bool, device=index.device)  # (R * T,)
    at[index] = True
    return at.view(shape), (torch.cumsum(at, 0) - 1)[index]


def logits_at(model, inputs: dict[str, torch.Tensor], index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits only where `index` points: `index` holds flat positions into (rows, T) of
    `inputs["input_ids"]`, any shape, repeats allowed. Returns (M, V) logits at the M distinct positions (the head
    runs once per position, however often it is asked for) and, shaped like `index`, each entry's row in them."""
    at, rows = flat_positions(index, inputs["input_ids"].shape)
    with head_inputs_at(model, at):
        logits = model(**inputs, use_cache=False).logits  # (M, V)
    return logits, rows


# ------------------------------------------------------------------------------------------------- DPO


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs, token counts), each (2B,) float32, of the response tokens of the 2B sequences
    (chosen first) of a batch from `collate_pairs(..., response_logps=True)`, in any of its layouts.

    The model's logits are computed only where a response token is predicted (`logp_index`, flat into
    (rows, T); `head_inputs_at`), so a shared-prompt row scores the first rejected token from the prompt's last
    position."""
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
    logits, rows = logits_at(model, inputs, batch["logp_index"])  # (M, V), (N,)
    picked = logits[rows]  # (N, V)
    token_logps = logprobs_from_logits(picked[None], batch["logp_target"][None])[0].float()  # (N,)
    sequences = 2 * batch["margin"].numel()
    seq = batch["logp_sequence"]
    sums = torch.zeros(sequences, dtype=torch.float32, device=token_logps.device).index_add(0, seq, token_logps)
    counts = torch.bincount(seq, minlength=sequences).float()  # (2B,)
    return sums, counts


@dataclass
class PairLogps:
    """Log-probs of B preference pairs' responses, each (B,): summed over the response tokens under the policy
    and the reference (zeros where the loss needs no reference), and the response token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


class PairLosses(NamedTuple):
    loss: torch.Tensor  # (B,) per-pair loss
    chosen_reward: torch.Tensor  # (B,) implicit rewards, detached: what accuracy and margins are read from
    rejected_reward: torch.Tensor


def _log_ratio_rewards(p: PairLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return beta * (p.chosen - p.ref_chosen).detach(), beta * (p.rejected - p.ref_rejected).detach()


def dpo_sigmoid_loss(p: PairLogps, c: DPOConfig) -> PairLosses:
    """DPO (TRL loss_type="sigmoid"): -log sigmoid(beta * delta), delta = the chosen log-ratio minus the
    rejected one. With label_smoothing eps, cDPO: -(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)
    (TRL's sigmoid before 1.x, and its CPOTrainer's)."""
    delta = (p.chosen - p.ref_chosen) - (p.rejected - p.ref_rejected)  # (B,)
    eps = c.label_smoothing
    loss = -(1 - eps) * F.logsigmoid(c.beta * delta) - eps * F.logsigmoid(-c.beta * delta)
    return PairLosses(loss, *_log_ratio_rewards(p, c.beta))


def dpo_hinge_loss(p: PairLogps, c: DPOConfig) -> PairLosses:
    """SLiC's hinge (TRL loss_type="hinge"): relu(1 - beta * delta)."""
    delta = (p.chosen - p.ref_chosen) - (p.rejected - p.ref_rejected)  # (B,)
    return PairLosses(torch.relu(1 - c.beta * delta), *_log_ratio_rewards(p, c.beta))


def dpo_ipo_loss(p: PairLogps, c: DPOConfig) -> PairLosses:
    """IPO (TRL loss_type="ipo"): (delta_avg - 1 / (2 beta))^2 with each log-ratio divided by its response's token
    count, as TRL does (the form the IPO authors confirmed); rewards are beta * the summed log-ratios, as TRL logs."""
    delta = ((p.chosen - p.ref_chosen) / p.chosen_tokens.clamp(min=1.0)
             - (p.rejected - p.ref_rejected) / p.rejected_tokens.clamp(min=1.0))  # (B,)
    return PairLosses((delta - 1 / (2 * c.beta)) ** 2, *_log_ratio_rewards(p, c.beta))


def simpo_loss(p: PairLogps, c: DPOConfig) -> PairLosses:
    """SimPO (TRL CPOTrainer loss_type="simpo" with cpo_alpha=0): no reference; a response's reward is beta times
    its log-prob averaged per token, and the loss -log sigmoid(r_chosen - r_rejected - simpo_gamma)."""
    chosen = p.chosen / p.chosen_tokens.clamp(min=1.0)  # (B,)
    rejected = p.rejected / p.rejected_tokens.clamp(min=1.0)
    logits = (chosen - rejected) - c.simpo_gamma / c.beta
    return PairLosses(-F.logsigmoid(c.beta * logits), c.beta * chosen.detach(), c.beta * rejected.detach())


# dpo.loss -> its loss function; each maps PairLogps to per-pair losses and implicit rewards.
PAIR_LOSSES: dict[str, Callable[[PairLogps, DPOConfig], PairLosses]] = {
    "sigmoid": dpo_sigmoid_loss,
    "hinge": dpo_hinge_loss,
    "ipo": dpo_ipo_loss,
    "simpo": simpo_loss,
}
REFERENCE_FREE_LOSSES = ("simpo",)


def needs_reference(c: DPOConfig) -> bool:
    return c.loss not in REFERENCE_FREE_LOSSES


class PairEval(NamedTuple):
    """One batch of held-out pairs as `trainer.evaluate.pairwise_metrics` reads it."""

    chosen: torch.Tensor  # (B,) scores: a reward model's, or DPO's implicit rewards
    rejected: torch.Tensor  # (B,)
    loss_sum: torch.Tensor  # scalar: the summed per-pair loss
    sums: dict[str, float]  # per-pair sums of further metrics, reported as eval/<name> means


def reward_pair_eval(model, batch: dict[str, torch.Tensor]) -> PairEval:
    """A reward model's scores and Bradley-Terry loss (with each pair's margin, no centering term)."""
    chosen, rejected = (s.float() for s in pair_scores(model, batch))
    return PairEval(chosen, rejected, bradley_terry_loss_sum(chosen, rejected, batch["margin"]), {})


class DPOTask:
    """Direct preference optimisation of a causal LM on preference pairs (`dpo.loss` picks the loss).

    The reference log-probs come with the batch (`ref_chosen_logps`, `ref_rejected_logps`: dpo.reference=cached),
    from a frozen `reference` model (dpo.reference=model; with adapters, the policy with its adapters off), or are
    not needed (simpo)."""

    def __init__(self, cfg: DPOConfig, reference: Optional[torch.nn.Module] = None):
        self.cfg, self.reference = cfg, reference
        self.pair_loss = PAIR_LOSSES[cfg.loss]

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["margin"].numel()

    def pair_logps(self, model, batch: dict[str, torch.Tensor]) -> PairLogps:
        # The reference first: when it is the policy with its adapters off (trainer.adapters.AdaptersOff), its
        # gradient-free pass must not come between the policy's forward and backward.
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"].float(), batch["ref_rejected_logps"].float()
        elif self.reference is not None:
            with torch.no_grad(), torch_linear():
                ref_chosen, ref_rejected = sequence_logps(self.reference, batch)[0].chunk(2)
        elif not needs_reference(self.cfg):
            ref_chosen = ref_rejected = None
        else:
            raise ValueError(f"dpo.loss={self.cfg.loss} needs reference log-probs: the batch has none and there is "
                             f"no reference model")
        logps, counts = sequence_logps(model, batch)
        chosen, rejected = logps.chunk(2)  # (B,) each
        if ref_chosen is None:
            ref_chosen = ref_rejected = torch.zeros_like(chosen)
        return PairLogps(chosen, rejected, ref_chosen, ref_rejected, *counts.chunk(2))

    def loss(self, model, batch: dict[str, torch.Tensor]) -> LossWithMetrics:
        p = self.pair_logps(model, batch)
        out = self.pair_loss(p, self.cfg)
        return LossWithMetrics(out.loss.sum(), {
            **_reward_sums(p, out),
            "rewards/margin": float((out.chosen_reward - out.rejected_reward).sum()),
            "rewards/accuracy": float((out.chosen_reward > out.rejected_reward).sum()),
        })

    def pair_eval(self, model, batch: dict[str, torch.Tensor]) -> PairEval:
        """Held-out pairs: the implicit rewards (pairwise_metrics reads accuracy and margin off them), the
        loss, and the rewards and log-probs of each side."""
        p = self.pair_logps(model, batch)
        out = self.pair_loss(p, self.cfg)
        return PairEval(out.chosen_reward, out.rejected_reward, out.loss.sum(), _reward_sums(p, out))


def _reward_sums(p: PairLogps, out: PairLosses) -> dict[str, float]:
    return {"rewards/chosen": float(out.chosen_reward.sum()), "rewards/rejected": float(out.rejected_reward.sum()),
            "logps/chosen": float(p.chosen.detach().sum()), "logps/rejected": float(p.rejected.detach().sum())}
