"""The reward: a scalar-head reward model (from `trainer.reward`, or any
AutoModelForSequenceClassification with one label), or a Python function named by
`reward.function._target_` (rule-based / verifiable rewards, see `rlhf/reward_functions.py`).

A reward model whose tokenizer differs from the policy's re-tokenizes the decoded text
(`reward.retokenize=true`); without that setting the mismatch is an error at start."""

from __future__ import annotations

import torch

from rlhf.experience import Experience, build_rollout
from rlhf.worker import RoleWorker
from trainer.model import build_reward_model


class RewardWorker(RoleWorker):
    def setup(self) -> None:
        rc = self.role_cfg
        self.function = None
        if rc.function is not None:
            from hydra.utils import instantiate

            self.function = instantiate(rc.function, _partial_=True)
            return
        self.build(build_reward_model)

    def scores(self, exp: Experience, texts: dict) -> torch.Tensor:
        """(B,) raw scores of this rank's shard. `texts` holds the decoded prompts, responses and
        reference answers of the shard (what a reward function reads)."""
        if self.function is not None:
            values = self.function(texts["prompts"], texts["responses"], texts["answers"])
            return torch.tensor([float(v) for v in values], dtype=torch.float32)
        if self.role_cfg.retokenize:
            exp = self._retokenized(texts)
        return self._stack(self._forward_micro(exp, self.sequence_scores), 0)

    def _retokenized(self, texts: dict) -> Experience:
        enc = self.tokenizer
        # Texts come without special tokens: the prompt gets this tokenizer's own (BOS), the response
        # its EOS, as the reward stage laid pairs out.
        prompts = [enc(p)["input_ids"] for p in texts["prompts"]]
        responses = [enc(r, add_special_tokens=False)["input_ids"] + [enc.eos_token_id] for r in texts["responses"]]
        return build_rollout(prompts, responses, enc.pad_token_id)
