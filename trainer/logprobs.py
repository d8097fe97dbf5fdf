"""Token log-probs and entropies from logits: pure tensor math shared by the supervised objectives (DPO's
sequence log-probs) and the RL roles (policy and reference log-probs, entropy). torch only, no I/O.

Shapes: B = rows, T = positions, V = vocabulary size.
"""

from __future__ import annotations

import torch


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[labels]: logits (B, T, V), labels (B, T) int -> (B, T) float32 (or float64).

    V may be ~150k, so avoid a full-batch float copy of the logits: for fp32/fp64 subtract a per-row logsumexp
    (autograd saves only the original logits); for bf16/fp16 upcast one row of B at a time, so without grad
    (rollout, reference model) the peak is one row's float copy. With grad, log_softmax still saves each row's
    float output for backward; a fused cross-entropy kernel would be the next step if that matters.
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # (B, T)
        return picked - lse
    rows = []
    for row, lab in zip(logits, labels):
        row_logp = torch.log_softmax(row.float(), dim=-1)  # (T, V), one row's float copy at a time
        rows.append(row_logp.gather(-1, lab.unsqueeze(-1)).squeeze(-1))  # (T,)
    return torch.stack(rows)  # (B, T)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits): (B, T, V) -> (B, T) float32, one row of B at a time to bound memory.

    H = logsumexp(l) - sum_v p_v * l_v, which avoids log(p) of underflowed probabilities.
    """
    rows = []
    for row in logits:
        row = row.float()  # (T, V)
        rows.append(torch.logsumexp(row, dim=-1) - (torch.softmax(row, dim=-1) * row).sum(-1))
    return torch.stack(rows)  # (B, T)


def logprobs_at(logits: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor,
                with_entropy: bool = False, entropy_grad: bool = False):
    """log softmax(logits[rows])[labels] without copying a (B, T, V) tensor: logits (M, V) float, rows and
    labels (B, T) int (rows index logits; several entries may share a row) -> (B, T). With `with_entropy` also the
    entropy of softmax(logits[rows]) (B, T), from the same log-sum-exp, carrying a gradient only with
    `entropy_grad` (H = lse - sum_v p_v * l_v, each of the M rows computed once)."""
    lse = torch.logsumexp(logits, dim=-1)  # (M,)
    logp = logits[rows, labels] - lse[rows]
    if not with_entropy:
        return logp
    if entropy_grad:
        probs = torch.exp(logits - lse[:, None])  # (M, V)
        entropy = lse - (probs * logits).sum(-1)
    else:
        with torch.no_grad():
            probs = (logits - lse[:, None]).exp_()  # (M, V), one buffer reused for p * l
            entropy = lse - probs.mul_(logits).sum(-1)
    return logp, entropy[rows]
