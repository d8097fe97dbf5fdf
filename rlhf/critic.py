"""The critic: a scalar-head model (initialised from the reward model by default) that predicts a
value before every response token and trains with the clipped value loss."""

from __future__ import annotations

import torch

from rlhf.algorithms import value_loss
from rlhf.experience import Experience
from rlhf.worker import RoleWorker
from trainer.model import build_reward_model
from trainer.reward_stats import read_reward_stats


class CriticWorker(RoleWorker):
    """Values live on the scale of the normalised rewards: a critic initialised from a reward model
    whose scores PPO normalises ((s - mean) / std, `algo.normalize_reward`) applies the same map to
    its head's output, so its first values are already on the returns' scale (as OpenRLHF does)."""

    trains = True

    def setup(self) -> None:
        self.build(build_reward_model, total_steps=self.cfg.optimizer_steps, grad_accum=self.grad_accum())
        stats = read_reward_stats(self.role_cfg.model.name_or_path) if self.cfg.algo.normalize_reward else None
        self.value_scale = (stats["mean"], stats["std"]) if stats else (0.0, 1.0)

    def response_values(self, micro: Experience) -> torch.Tensor:
        mean, std = self.value_scale
        return (super().response_values(micro) - mean) / std

    def values(self, exp: Experience) -> torch.Tensor:
        """(B, T) values of this rank's shard."""
        return self._stack(self._forward_micro(exp, self.response_values), exp.responses.shape[1])

    def train(self, exp: Experience, iteration: int) -> dict:
        eps = self.cfg.algo.value_clip_eps

        def loss_fn(m: Experience):
            tokens = m.response_mask.sum()
            loss, stats = value_loss(self.response_values(m), m.values, m.returns, m.response_mask, eps)
            return loss * tokens, {"value_clip_frac": stats["value_clip_frac"] * tokens}

        return self.ppo_update(exp, iteration, loss_fn)
