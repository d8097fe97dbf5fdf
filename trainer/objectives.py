"""Training objectives: pure loss math plus the small task objects `fit` drives.

A task turns a collated batch into (sum of per-item losses, number of items).
`fit` divides by the item count of the whole global batch, so gradient
accumulation and data parallelism give the gradient of one big batch.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

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
