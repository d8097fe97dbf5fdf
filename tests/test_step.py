"""trainer/step.py, the one optimizer step of every trained model: a non-finite loss is skipped (no update)
or stops the run, on a real DeepSpeed engine; and the PPO policy's update goes through it, skipping and
counting non-finite mini-batches as the supervised loop does."""

from __future__ import annotations

import pytest
import torch

from runs import PPO_SMALL, tiny_ppo_model
from trainer.config import DeepSpeedConfig, OptimConfig, resolve_zero_stage
from trainer.engine import build_deepspeed_config, build_engine, init_distributed
from trainer.step import NonFiniteError, count_skip, optimizer_step_over

NAN = float("nan")


@pytest.fixture(scope="module")
def world_of_one():
    return init_distributed()  # a world of one on a free loopback port


def linear_engine(grad_accum: int):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    ds = resolve_zero_stage(DeepSpeedConfig(), 1)
    config = build_deepspeed_config(ds, 1, grad_accum, 1, 1.0)
    return build_engine(model, ds, OptimConfig(lr=0.1, warmup_steps=0), config, 10)


def micro_losses(engine, scales: list[float]):
    """One loss per micro-batch: the model's output on a fixed input, times `scale` (NaN makes it non-finite)."""
    for scale in scales:
        yield engine(torch.ones(1, 4)).sum() * scale


def weights(engine) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in engine.module.parameters()])


def test_a_non_finite_first_micro_batch_skips_the_step_and_a_finite_one_updates(world_of_one):
    engine = linear_engine(grad_accum=2)
    before = weights(engine)
    skipped = optimizer_step_over(engine, micro_losses(engine, [NAN, 1.0]), 2, 1, "skip", "step 0")
    assert skipped.skipped and skipped.grad_norm is None and torch.equal(weights(engine), before)
    done = optimizer_step_over(engine, micro_losses(engine, [1.0, 1.0]), 2, 1, "skip", "step 1")
    assert not done.skipped and done.grad_norm > 0 and not torch.equal(weights(engine), before)


def test_non_finite_later_in_the_window_or_with_stop_ends_the_run_naming_the_step(world_of_one):
    engine = linear_engine(grad_accum=2)
    with pytest.raises(NonFiniteError, match=r"^step 3: non-finite loss in micro-batch 1"):
        optimizer_step_over(engine, micro_losses(engine, [1.0, NAN]), 2, 1, "skip", "step 3")
    engine = linear_engine(grad_accum=2)
    with pytest.raises(NonFiniteError, match=r"^step 4: non-finite loss; stopping \(train\.nonfinite=stop"):
        optimizer_step_over(engine, micro_losses(engine, [NAN, 1.0]), 2, 1, "stop", "step 4")


def test_skips_are_counted_up_to_the_limit():
    assert count_skip(1, 2, "x") == 2
    with pytest.raises(NonFiniteError, match="x: 3 non-finite losses skipped, more than train.max_nonfinite_skips=2"):
        count_skip(2, 2, "x")


@pytest.fixture(scope="module")
def policy(world_of_one, tmp_path_factory):
    """A real PPO policy worker (no Ray: this process is its one rank) on the tiny model."""
    from rlhf.actor import PolicyWorker
    from trainer.compose import compose

    cfg = compose("ppo", [*tiny_ppo_model(tmp_path_factory.mktemp("tiny")), *PPO_SMALL,
                          "train.max_nonfinite_skips=3"])
    worker = PolicyWorker(cfg, "actor", 0, 1)
    worker.info = world_of_one
    worker.setup()
    return worker


def rollout(policy, advantage: float):
    from rlhf.experience import build_rollout

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 100, (4 + i % 3,), generator=g).tolist() for i in range(8)]
    responses = [torch.randint(5, 100, (3 + i % 2,), generator=g).tolist() for i in range(8)]
    exp = build_rollout(prompts, responses, policy.tokenizer.pad_token_id)
    old = policy.log_probs(exp)
    return exp.with_fields(old_logp=old, ref_logp=old, advantages=torch.full_like(old, advantage))


def test_a_ppo_update_with_a_non_finite_loss_is_skipped_and_counted_then_stops(policy):
    before = weights(policy.engine)
    metrics = policy.train(rollout(policy, NAN), 0, 0.0)  # 8 rollouts, mini-batches of 4: two steps
    assert metrics["nonfinite_skipped"] == 2 and metrics["nonfinite_skips"] == 2
    assert torch.equal(weights(policy.engine), before)
    metrics = policy.train(rollout(policy, 1.0), 1, 0.0)
    assert metrics["nonfinite_skipped"] == 0 and metrics["nonfinite_skips"] == 2
    assert not torch.equal(weights(policy.engine), before) and metrics["grad_norm"] > 0
    with pytest.raises(NonFiniteError, match=r"actor iteration 3 mini-batch 1: 4 non-finite losses skipped, "
                                             r"more than train\.max_nonfinite_skips=3"):
        policy.train(rollout(policy, NAN), 2, 0.0)
