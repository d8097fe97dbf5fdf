"""Seeded randomness that depends only on named keys: `derive_seed` for every stream the runs draw
(data order, mini-batch order, sampling), and `SeededOrder`, the one endless seeded-permutation order
that both the supervised loop and PPO's prompt sampler read. Nothing here holds state a resumed run would
need: an order is a function of (seed, stream, position)."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's generators (torch.manual_seed seeds every device's): what
    transformers.set_seed does on CUDA and CPU, whose module (trainer_utils) imports peft and with it
    transformers' modeling code, seconds of start-up in processes that build no model."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed for the stream named by `keys` under the run's `seed`. A hash, so that streams never
    collide the way `seed * k + i` formulas do (seed 1 epoch 7 == seed 2 epoch 0 under `seed * 7 + epoch`),
    and stable across processes and Python versions (unlike `hash()`)."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class SeededOrder:
    """An endless order over `n` items: one seeded permutation per pass (epoch), so position p is item
    `permutation(p // n)[p % n]`. Reading positions in sequence keeps one permutation in memory."""

    def __init__(self, n: int, seed: int, stream: str):
        if n <= 0:
            raise ValueError(f"SeededOrder over {n} items")
        self.n, self.seed, self.stream = n, seed, stream
        self._cached: tuple[int, list[int]] = (-1, [])

    def permutation(self, epoch: int) -> list[int]:
        if self._cached[0] != epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.stream, epoch))
            self._cached = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._cached[1]

    def take(self, start: int, count: int) -> list[int]:
        """The items at positions start .. start + count - 1."""
        return [self.permutation(p // self.n)[p % self.n] for p in range(start, start + count)]
