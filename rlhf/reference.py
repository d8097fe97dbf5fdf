"""The reference policy: the frozen starting point whose log-probs the KL penalty compares against."""

from __future__ import annotations

from rlhf.worker import RoleWorker
from trainer.model import build_causal_lm


class ReferenceWorker(RoleWorker):
    """Its scoring call is `RoleWorker.log_probs`, at the policy's sampling temperature."""

    def setup(self) -> None:
        self.build(build_causal_lm)
