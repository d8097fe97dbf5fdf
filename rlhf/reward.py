"""The reward: a scalar-head reward model (from `trainer.reward`, or any
AutoModelForSequenceClassification with one label), or weighted Python functions named in
`reward.functions` (rule-based / verifiable rewards, see `rlhf/reward_functions.py`).

A reward model whose tokenizer differs from the policy's re-tokenizes the decoded text
(`reward.retokenize=true`); without that setting the mismatch is an error at start."""

from __future__ import annotations

import torch

from rlhf.experience import Experience, build_rollout
from rlhf.worker import RoleWorker
from trainer.model import build_reward_model


class RewardWorker(RoleWorker):
    def setup(self) -> None:
        from rlhf.reward_functions import build_functions

        self.functions = build_functions(self.role_cfg.functions)
        if not self.functions:
            self.build(build_reward_model)

    def scores(self, exp: Experience, texts: dict, first_index: int = 0) -> torch.Tensor:
        """(B, 1 + K) raw scores of this rank's shard: the score, then each of the K reward functions' own
        (none for a reward model). `texts` holds the decoded prompts and responses and each prompt's dataset
        row (what a reward function reads); `first_index` is the shard's first row in the batch."""
        if self.functions:
            from rlhf.reward_functions import combined_scores

            total, parts = combined_scores(self.functions, texts["prompts"], texts["responses"], texts["rows"],
                                           first_index)
            return torch.tensor([total, *parts.values()], dtype=torch.float32).T
        if self.role_cfg.retokenize:
            exp = self._retokenized(texts)
        return self._stack(self._forward_micro(exp, self.sequence_scores), 0)[:, None]

    def _retokenized(self, texts: dict) -> Experience:
        enc = self.tokenizer
        # Texts come without special tokens: the prompt gets this tokenizer's own (BOS), the response
        # its EOS, as the reward stage laid pairs out.
        prompts = [enc(p)["input_ids"] for p in texts["prompts"]]
        responses = [enc(r, add_special_tokens=False)["input_ids"] + [enc.eos_token_id] for r in texts["responses"]]
        return build_rollout(prompts, responses, enc.pad_token_id)
