"""SDPA one packed sequence at a time: attention that costs what the sequences need, not what their row does.

A packed row holds several sequences, each isolated by position ids that restart at 0. Under transformers' own
`sdpa`, such a row gets a dense block-diagonal mask and costs attention over the whole row (B x T x T), most of it
masked away; on a GPU the mask also rules out SDPA's flash kernel. Here, where the rows are packed, the sequences
are gathered into padded batches of similar length (the longest at most twice the shortest) and each batch runs
SDPA's causal kernel with no mask: the arithmetic is sum(n x L^2) over those batches. A sequence's padding lies
after its last token, so causality alone keeps every real query off it. Gathering costs copies and a kernel call
per batch, so it pays only where it saves each query many keys: where it would save fewer than `MIN_SAVED_KEYS`
on average (short rows, or few long sequences per row), the rows run with the block-diagonal mask built here, as
transformers would. Rows of one sequence each run causal SDPA as they are. Everything else (a padding mask, a 4D
mask such as the shared-prompt layouts', a KV cache) goes to transformers' `sdpa` unchanged.

`use_for(model)` switches a model to it where its attention is plain causal SDPA (`ARCHITECTURES`, without a
sliding window); `trainer.model` calls it for `model.attn_implementation=sdpa` unless
`model.per_sequence_attention=false`. The result equals transformers' `sdpa` (tests/test_packed_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, find_packed_sequence_indices, sdpa_mask

NAME = "tuneforge_sdpa"
# Causal decoders whose attention forwards `position_ids` to the attention function and adds nothing to SDPA but
# an optional sliding window (refused in `use_for`).
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
# Keys per query that gathering must save on average to be used. On a 2-core CPU, the tiny model's SFT step with
# per-sequence attention broke even near 250 saved keys (docs/benchmarks.md, "Packed rows attending one sequence
# at a time").
MIN_SAVED_KEYS = 256


@dataclass(frozen=True)
class Layout:
    """How one forward's rows run: `buckets` (sequences gathered), else `mask` (B, 1, T, T) bool, else neither
    (a sequence per row: causal SDPA on the rows as they are).

    Each bucket is (n, L): the flat (B*T) row of each token of n sequences, padded to the longest (L) with the
    sequence's own first token, a key no real query reaches, since padding follows the sequence under a causal
    mask. `slots` (B*T,): where each token's output lies in the buckets' outputs flattened one after another."""
    buckets: tuple[torch.Tensor, ...] = ()
    slots: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None


def layout(position_ids: torch.Tensor) -> Layout:
    """The layout of rows with these (B, T) position ids; see `Layout`. Sequences are told apart as transformers'
    `sdpa` tells them apart (`find_packed_sequence_indices`: wherever a position is not the previous one plus 1)."""
    B, T = position_ids.shape
    seq = find_packed_sequence_indices(position_ids)  # (B, T) sequence number within the row; None: one per row
    if seq is None:
        return Layout()
    starts = torch.ones_like(seq, dtype=torch.bool)  # (B, T) True at each sequence's first token
    starts[:, 1:] = seq[:, 1:] != seq[:, :-1]
    first = starts.reshape(-1).nonzero().squeeze(1)  # (S,) flat index of each sequence's first token
    lengths = torch.diff(first, append=first.new_tensor([B * T]))  # (S,) sequences never cross rows
    by_length = torch.sort(lengths, descending=True)
    lengths_sorted, first_sorted = by_length.values.tolist(), first[by_length.indices]
    groups, i = [], 0
    while i < len(lengths_sorted):  # the longest left, with every sequence more than half its length
        j = i
        while j < len(lengths_sorted) and 2 * lengths_sorted[j] > lengths_sorted[i]:
            j += 1
        groups.append((i, j))
        i = j
    saved_per_query = (B * T * T - sum((j - i) * lengths_sorted[i] ** 2 for i, j in groups)) / (B * T)
    if saved_per_query < MIN_SAVED_KEYS:
        causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
        return Layout(mask=((seq[:, :, None] == seq[:, None, :]) & causal)[:, None])
    buckets, real_rows = [], []
    for i, j in groups:
        steps = torch.arange(lengths_sorted[i], device=position_ids.device)  # (L,)
        real = steps < by_length.values[i:j, None]  # (n, L)
        index = first_sorted[i:j, None] + torch.where(real, steps, 0)  # (n, L)
        buckets.append(index)
        real_rows.append(torch.where(real.reshape(-1), index.reshape(-1), -1))  # (n*L,) -1 where padding
    found = torch.cat(real_rows)  # (sum n*L,) the flat row whose output each slot holds
    real_slots = (found >= 0).nonzero().squeeze(1)
    slots = torch.empty(B * T, dtype=torch.long, device=position_ids.device)
    slots[found[real_slots]] = real_slots
    return Layout(buckets=tuple(buckets), slots=slots)


# The layout of the last position ids seen: every layer of one forward (and its recompute under gradient
# checkpointing) receives the same tensor, so the layout is worked out once per forward. Kept with the tensor
# (so its identity stays its own), its version (bumped by any in-place change) and the batch size.
_last: list = [None, None, None]


def _layout_of(position_ids: torch.Tensor, batch_size: int) -> Layout:
    key = (position_ids._version, batch_size)
    if _last[0] is not position_ids or _last[1] != key:  # (1, T) ids shared by the rows are expanded to (B, T)
        _last[:] = position_ids, key, layout(position_ids.expand(batch_size, -1))
    return _last[2]


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
              is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-function interface. query (B, H, T, D), key/value (B, Hkv, S, D) ->
    ((B, T, H, D), None)."""
    if attention_mask is not None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    position_ids = kwargs.get("position_ids")
    if position_ids is None or kwargs.get("sliding_window") is not None:
        # `_mask` built no mask, so rows can only be told apart here: never attend across sequences silently
        raise RuntimeError(f"{NAME} needs the position ids and no sliding window (got sliding_window="
                           f"{kwargs.get('sliding_window')!r}); set model.per_sequence_attention=false")
    B, H, T, D = query.shape
    gqa = {"enable_gqa": True} if key.shape[1] != H else {}
    plan = _layout_of(position_ids, B)
    if not plan.buckets:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=plan.mask, dropout_p=dropout,
                                             is_causal=plan.mask is None, scale=scaling, **gqa)
        return out.transpose(1, 2).contiguous(), None

    # (B, h, T, D) -> (B*T, h, D): a view, the projections' own (B, T, h, D) layout
    q, k, v = (x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (query, key, value))
    outs = []
    for index in plan.buckets:
        o = F.scaled_dot_product_attention(q[index].transpose(1, 2), k[index].transpose(1, 2),
                                           v[index].transpose(1, 2), dropout_p=dropout, is_causal=True,
                                           scale=scaling, **gqa)  # (n, H, L, D)
        outs.append(o.transpose(1, 2).flatten(0, 1))  # (n*L, H, D)
    return torch.cat(outs)[plan.slots].view(B, T, H, D), None


def _mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
          attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """transformers' mask interface: no mask for a fresh pass over unpadded rows (`attention` isolates the packed
    sequences itself); anything else gets `sdpa`'s own mask."""
    # offsets are tensors, or nonzero, only with a cache
    fresh = q_length == kv_length and isinstance(q_offset, int) and isinstance(kv_offset, int) and (
        q_offset == kv_offset == 0)
    if fresh and (attention_mask is None or bool(attention_mask.all())):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, _mask)


def unsupported(config) -> Optional[str]:
    """Why a model with this config keeps transformers' `sdpa` (None: it can attend per sequence)."""
    if getattr(config, "model_type", None) not in ARCHITECTURES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {', '.join(ARCHITECTURES)}"
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attention is {getattr(config, '_attn_implementation', None)!r}, not sdpa"
    if getattr(config, "sliding_window", None) is not None or any(
            kind != "full_attention" for kind in (getattr(config, "layer_types", None) or ())):
        return "it has a sliding window"
    return None


def use_for(model) -> bool:
    """Switch `model` (loaded with `sdpa`) to per-sequence SDPA where its attention allows it; True if it did."""
    if unsupported(model.config) is not None:
        return False
    model.set_attn_implementation(NAME)
    return True
