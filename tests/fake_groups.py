"""Stand-ins for the RL driver's actor groups: they answer at once and log every call and wait, so the driver's
iteration logic runs with no Ray and no model (tests/test_ppo.py, tests/test_grpo.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from rlhf.config import PPOConfig
from rlhf.experience import Generation


class FakeGroup:
    """An actor group that answers at once, logging each call. `answers` replaces the default answer of a
    method: answers[method](shard, *args) -> one rank's result."""

    def __init__(self, role: str, world_size: int, log: list, answers: Optional[dict[str, Callable]] = None):
        self.role, self.world_size, self.log, self.answers = role, world_size, log, answers or {}

    def answer(self, method: str, shard, *args):
        if method in self.answers:
            return self.answers[method](shard, *args)
        if method == "generate":  # this rank's responses, with their sampled log-probs
            return Generation([[10, 11, 2] for _ in shard[0]], [[-1.0, -1.0, -1.0] for _ in shard[0]], 0.0)
        if method == "train":
            return {"loss": 0.0}
        if method == "scores":  # (b, 1): the score alone, as a reward model gives it
            return torch.ones(len(shard[0]), 1)
        return torch.zeros(len(shard), shard.responses.shape[1])  # log_probs, values

    def call_sharded(self, method: str, shards, *args):
        from rlhf.group import PendingCall

        self.log.append(("call", self.role, method, args[0] if method == "train" else None))
        return PendingCall(self, method, [self.answer(method, s, *args) for s in shards])

    def call_per_rank(self, method: str, args):
        from rlhf.group import PendingCall

        # generate gets (prompts, seeds) per rank: the first seed stands for the call
        self.log.append(("call", self.role, method, args[0][1][0] if method == "generate" else None))
        return PendingCall(self, method, [self.answer(method, a) for a in args])


def scheduling_driver(monkeypatch, run_dir: Path, iterations: int, overlap: bool, cfg: Optional[PPOConfig] = None,
                      answers: Optional[dict[str, dict[str, Callable]]] = None, prompts: int = 8):
    """A Driver whose groups are FakeGroups (answers[role] overrides their answers) and whose waits are logged:
    its iteration logic, no Ray. Only the roles `cfg` runs get a group."""
    import rlhf.driver
    from trainer.config import LoggerConfig, ModelConfig
    from trainer.metrics import MetricsLogger
    from trainer.model import load_tokenizer

    log: list = []

    def wait_all(pending):
        log.append(("wait", tuple((p.group.role, p.method) for p in pending)))
        return [list(p.refs) for p in pending]

    monkeypatch.setattr(rlhf.driver, "wait_all", wait_all)
    if cfg is None:
        cfg = PPOConfig()
        cfg.rollout.prompts_per_iteration = 4
    cfg.rollout.overlap_critic_update = overlap
    cfg.train.iterations, cfg.train.samples_every = iterations, 0
    sizes = {"actor": 2, "critic": 1, "reference": 1, "reward": 1}
    groups = {role: FakeGroup(role, sizes[role], log, (answers or {}).get(role)) for role in cfg.active_roles}
    train_prompts = [SimpleNamespace(prompt_ids=[1, 5 + i], answer="", row={"answer": ""}) for i in range(prompts)]
    driver = rlhf.driver.Driver(cfg, run_dir, groups, load_tokenizer(ModelConfig()), train_prompts, eval_prompts=[],
                                logger=MetricsLogger(run_dir, LoggerConfig(), {}, job_type="ppo", enabled=False))
    return driver, log
