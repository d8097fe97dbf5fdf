"""The reference policy: the frozen starting point whose log-probs the KL penalty compares against."""

from __future__ import annotations

import torch

from rlhf.experience import Experience
from rlhf.worker import RoleWorker
from trainer.model import build_causal_lm


class ReferenceWorker(RoleWorker):
    def setup(self) -> None:
        self.build(build_causal_lm)

    def log_probs(self, exp: Experience) -> torch.Tensor:
        """(B, T) reference log-probs of this rank's shard (same temperature as the policy's)."""
        t = self.cfg.rollout.temperature
        return self._stack(self._forward_micro(exp, lambda m: self.response_logprobs(m, t)), exp.responses.shape[1])
