"""Training objectives: pure loss math plus the small task objects `fit` drives.

A task turns a collated batch into (sum of per-item losses, number of items).
`fit` divides by the item count of the whole global batch, so gradient
accumulation and data parallelism give the gradient of one big batch.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from trainer.config import ConfigError

IGNORE_INDEX = -100


class Task(Protocol):
    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """Loss items in the batch, known before the forward pass."""

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum of per-item losses (a scalar with grad)."""


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy.

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
        # No attention_mask: with use_cache off, restarting position_ids make
        # transformers build a block-diagonal mask, isolating packed examples.
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        return token_nll_sum(logits, batch["labels"])


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
    per_token = per_token_scores(model, input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                 attention_mask=batch.get("attention_mask"))
    return per_token.reshape(-1)[batch["score_index"]].chunk(2)  # (R * T,) -> 2 x (B,)


def per_token_scores(model, **inputs) -> torch.Tensor:
    """(R, T) float scores of a scalar-head model (`AutoModelForSequenceClassification` of a
    decoder, head `score`) at every position, not only the one the model pools at: a packed
    reward batch reads one per sequence, a PPO critic reads one per response token.

    The head's output is caught on its way out by a forward hook, so any model with a
    `score` layer works, under ZeRO-3 too."""
    head = getattr(getattr(model, "module", model), "score", None)
    if head is None:
        raise ConfigError("this needs a model with a `score` head (AutoModelForSequenceClassification of a "
                          "decoder): packed preference batches (set data.packing=false) and PPO critics/rewards")
    caught = []
    handle = head.register_forward_hook(lambda _module, _inputs, out: caught.append(out))
    try:
        model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return caught[0].squeeze(-1).float()


class RewardTask:
    """Bradley-Terry preference loss for a scalar-head reward model."""

    def __init__(self, center_coef: float = 0.0):
        self.center_coef = center_coef

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["margin"].numel()

    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen, rejected = pair_scores(model, batch)
        return bradley_terry_loss_sum(chosen, rejected, batch["margin"], self.center_coef)
