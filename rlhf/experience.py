"""The rollout batch that travels between PPO phases, and how it is laid out, split and trimmed; what a
policy rank's generation returns.

Sequences are `[prompt | response | pad]`, right-padded, so positions count from 0 at each
prompt's first token exactly as they did during generation (where prompts were left-padded and
positions came from the attention mask). Per-token fields are aligned to response tokens: entry t
belongs to response token t, which the logits at sequence position `prompt_length + t - 1` score.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch


@dataclass
class Experience:
    sequences: torch.Tensor  # (B, L) long: prompt then response, right-padded
    attention_mask: torch.Tensor  # (B, L) long: 1 on prompt and response tokens
    prompt_lengths: torch.Tensor  # (B,) long
    responses: torch.Tensor  # (B, T) long: the response tokens, right-padded
    response_mask: torch.Tensor  # (B, T) float: 1 up to and including EOS or the truncation point
    old_logp: Optional[torch.Tensor] = None  # (B, T) policy log-probs at generation time
    # (B, T) the sampler's own log-probs, kept beside recomputed old_logp for truncated importance sampling
    rollout_logp: Optional[torch.Tensor] = None
    ref_logp: Optional[torch.Tensor] = None  # (B, T) reference log-probs
    values: Optional[torch.Tensor] = None  # (B, T) critic values V(s_t) before response token t
    scores: Optional[torch.Tensor] = None  # (B,) sequence scores (normalised and clipped)
    rewards: Optional[torch.Tensor] = None  # (B, T) token-level rewards
    advantages: Optional[torch.Tensor] = None  # (B, T)
    returns: Optional[torch.Tensor] = None  # (B, T)
    # A micro-batch's rows with each shared prompt once (rollout.share_prompt), built on the CPU by
    # `micro_batches` before the micro-batch moves to the device, so no log-prob pass syncs to build it. Kept by
    # `to`; a selection or trim of the rows drops it.
    layout: Optional["SharedPromptLayout"] = None

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def _map(self, fn, layout: Optional["SharedPromptLayout"] = None) -> "Experience":
        return Experience(**{f.name: (None if v is None else fn(f.name, v))
                             for f in dataclasses.fields(self) if f.name != "layout"
                             for v in [getattr(self, f.name)]}, layout=layout)

    def select(self, index) -> "Experience":
        """The rows `index` (a slice, list or tensor of row indices)."""
        return self._map(lambda _, v: v[index])

    def to(self, device) -> "Experience":
        return self._map(lambda _, v: v.to(device), None if self.layout is None else self.layout.to(device))

    def with_fields(self, **fields) -> "Experience":
        return dataclasses.replace(self, **fields)

    def shards(self, n: int) -> list["Experience"]:
        """n equal, contiguous shards (rank r gets rows [r*B/n, (r+1)*B/n))."""
        size = len(self) // n
        if size * n != len(self):
            raise ValueError(f"{len(self)} rollouts do not split evenly over {n} ranks")
        return [self.select(slice(r * size, (r + 1) * size)) for r in range(n)]

    def trimmed(self) -> "Experience":
        """Drop the padding columns no row of this (micro-)batch needs."""
        width_l = int(self.attention_mask.sum(1).max())
        width_t = max(int(self.response_mask.sum(1).max()), 1)
        return self._map(lambda name, v: v[:, :width_l] if name in ("sequences", "attention_mask")
                         else (v[:, :width_t] if v.dim() == 2 else v))

    def micro_batches(self, size: int, share_prompt: bool = False) -> Iterator["Experience"]:
        """Trimmed micro-batches of `size` rows, with `share_prompt` each with its `shared_prompt_layout`."""
        for start in range(0, len(self), size):
            micro = self.select(slice(start, start + size)).trimmed()
            yield micro.with_fields(layout=shared_prompt_layout(micro)) if share_prompt else micro


@dataclass
class Generation:
    """What one policy rank's `generate` returns for its share of the prompts."""

    responses: list[list[int]]  # token ids per prompt, cut after the first stop token
    logprobs: Optional[list[list[float]]]  # each response token's sampled log-prob; None unless sampling records them
    seconds: float  # wall time of the call on the rank


def pad_right(x: torch.Tensor, width: int, value=0) -> torch.Tensor:
    """(B, w) -> (B, width), padding columns on the right with `value`."""
    if x.shape[1] >= width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)


def pad_rows(rows: list[list[float]], width: int, value: float = 0.0) -> torch.Tensor:
    """Ragged per-token values (one list per rollout) -> (B, width) float32, right-padded with `value`."""
    out = torch.full((len(rows), width), value, dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def cut_at_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """A generated response up to and including its first stop token (the rest is padding)."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1]
    return tokens


def build_rollout(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> Experience:
    """Lay prompts and their responses out as `[prompt | response | pad]` rows."""
    width_t = max(1, max(len(r) for r in responses))
    width_l = max(len(p) + len(r) for p, r in zip(prompts, responses))
    b = len(prompts)
    sequences = torch.full((b, width_l), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, width_l), dtype=torch.long)
    resp = torch.full((b, width_t), pad_id, dtype=torch.long)
    resp_mask = torch.zeros((b, width_t), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = len(p) + len(r)
        sequences[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attention_mask[i, :n] = 1
        resp[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        resp_mask[i, : len(r)] = 1.0
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return Experience(sequences, attention_mask, lengths, resp, resp_mask)


def response_positions(prompt_lengths: torch.Tensor, width_t: int, width_l: int) -> torch.Tensor:
    """(B, T) sequence positions whose outputs score response token t: prompt_length + t - 1
    (clamped into the sequence for padding entries, which the response mask hides)."""
    t = torch.arange(width_t, device=prompt_lengths.device)
    return (prompt_lengths[:, None] + t[None, :] - 1).clamp(max=width_l - 1)


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each right-padded row's last real token (where a reward model reads its score)."""
    return attention_mask.sum(1) - 1


@dataclass
class SharedPromptLayout:
    """A micro-batch of B rollouts laid out for one forward pass with each distinct prompt once: R rows
    `[prompt | response 1 | response 2 | ...]` (the responses of the rows that share the prompt), under a mask
    that lets each response see the prompt and itself but no other response, with every response's positions
    continuing from its prompt as they would alone (`shared_prompt_layout`)."""

    input_ids: torch.Tensor  # (R, W) long, right-padded
    position_ids: torch.Tensor  # (R, W) long
    attention_mask: torch.Tensor  # (R, 1, W, W) bool: True = may attend
    scored_at: torch.Tensor  # (B, T) long: the flat position in (R * W) whose output scores response token t of rollout b

    def to(self, device) -> "SharedPromptLayout":
        return SharedPromptLayout(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))


def first_appearance_ids(keys: Iterable[tuple]) -> list[int]:
    """An id per key, equal for equal keys, numbered in order of first appearance."""
    ids: dict[tuple, int] = {}
    return [ids.setdefault(key, len(ids)) for key in keys]


def prompt_groups(exp: Experience) -> torch.Tensor:
    """(B,) long: a group id per rollout, equal for rollouts whose prompts are the same tokens (a GRPO group's
    samples), numbered in order of first appearance."""
    rows = zip(exp.sequences.tolist(), exp.prompt_lengths.tolist())
    return torch.tensor(first_appearance_ids(tuple(row[:n]) for row, n in rows), dtype=torch.long)


def shuffled_by_group(groups: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B,) a random order of the rollouts that keeps each group's rollouts together (in their order), groups in
    a random order: `groups` (B,) from `prompt_groups`. With every rollout its own group, `torch.randperm(B)`."""
    n = int(groups.max()) + 1 if len(groups) else 0
    members = [torch.nonzero(groups == g).flatten() for g in range(n)]
    return torch.cat([members[g] for g in torch.randperm(n, generator=generator).tolist()]) if n else groups


def shared_prompt_layout(exp: Experience) -> Optional[SharedPromptLayout]:
    """The layout of `exp`'s rollouts with each distinct prompt computed once, or None when no two rollouts share
    one (the plain `[prompt | response | pad]` rows cost the same then). Padding is token 0, which each pad
    position reads alone and nothing scores.

    Response token t of a rollout is scored by the output at the position before it in its own sequence: its
    prompt's last position for t = 0 (shared by the group), else its own token t - 1; padding entries of
    (B, T) point at the prompt's last position too (the response mask hides them)."""
    groups = prompt_groups(exp)
    n_groups = int(groups.max()) + 1 if len(groups) else 0
    if n_groups == len(exp):
        return None
    seqs, lengths = exp.sequences.tolist(), exp.attention_mask.sum(1).tolist()
    prompt_len = exp.prompt_lengths.tolist()
    members: list[list[int]] = [[] for _ in range(n_groups)]
    for b, g in enumerate(groups.tolist()):
        members[g].append(b)
    widths = [prompt_len[m[0]] + sum(lengths[b] - prompt_len[b] for b in m) for m in members]
    R, W = n_groups, max(widths)
    input_ids = torch.zeros((R, W), dtype=torch.long)  # (R, W)
    position_ids = torch.zeros((R, W), dtype=torch.long)  # (R, W)
    part = torch.zeros((R, W), dtype=torch.long)  # (R, W): 0 prompt, k + 1 the k-th response, < 0 padding
    pos = torch.zeros(exp.responses.shape, dtype=torch.long)  # (B, T): row-local position scoring token t
    for r, m in enumerate(members):
        p = prompt_len[m[0]]
        input_ids[r, :p] = torch.tensor(seqs[m[0]][:p])
        position_ids[r, :p] = torch.arange(p)
        offset = p
        for k, b in enumerate(m):
            n = lengths[b] - p  # response tokens
            input_ids[r, offset:offset + n] = torch.tensor(seqs[b][p:lengths[b]])
            position_ids[r, offset:offset + n] = torch.arange(p, p + n)
            part[r, offset:offset + n] = k + 1
            pos[b, :] = p - 1
            if n > 1:
                pos[b, 1:n] = torch.arange(offset, offset + n - 1)
            offset += n
        part[r, offset:] = -1 - torch.arange(W - offset)  # each pad token alone: it attends only itself
        position_ids[r, offset:] = torch.arange(W - offset)
    causal = torch.ones(W, W, dtype=torch.bool).tril()  # (W, W)
    q, k = part[:, :, None], part[:, None, :]  # (R, W, 1), (R, 1, W)
    mask = causal & ((q == k) | ((k == 0) & (q > 0)))  # (R, W, W): own part, or a response reading its prompt
    return SharedPromptLayout(input_ids, position_ids, mask[:, None], groups[:, None] * W + pos)
