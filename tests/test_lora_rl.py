"""LoRA adapters on the RL roles (`actor.peft=lora`, `critic.peft=lora`): the config, the generation replica that
follows the adapters (merged weights), and real GRPO runs on a local Ray instance (loopback) where only the adapters
train and the reference is the policy with its adapters off, with no reference group, equal to a separate one; resume;
PPO with a LoRA policy and critic."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from runs import tiny_ppo_model
from test_ppo import records, run_ppo
from trainer.adapters import add_adapters, copy_merged
from trainer.compose import compose
from trainer.config import ConfigError, PeftConfig

# Model paths so that the config composes without exports (nothing is loaded).
MODELS = ["actor.model.name_or_path=/m/policy", "critic.model.name_or_path=/m/reward",
          "reward.model.name_or_path=/m/reward"]


def _ppo(*overrides: str):
    from rlhf.config import validate

    cfg = compose("ppo", [*MODELS, *overrides])
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------------------------ config


def test_each_trained_role_takes_the_peft_group_and_a_lora_policy_is_its_own_reference():
    cfg = _ppo("actor.peft=lora", "critic.peft=lora", "critic.peft.r=4")
    assert (cfg.actor.peft.method, cfg.critic.peft.method, cfg.critic.peft.r) == ("lora", "lora", 4)
    assert cfg.reference_from_policy and cfg.active_roles == ("actor", "critic", "reward")
    # the default: every weight trains, and the KL term's reference is its own group
    assert _ppo().actor.peft.method == "none" and _ppo().active_roles == ("actor", "critic", "reference", "reward")
    assert _ppo("algo=grpo", "actor.peft=lora").active_roles == ("actor", "reward")  # no KL term: no reference at all
    forced = _ppo("algo=grpo", "actor.peft=lora", "algo.kl_coef=0.05", "reference.from_policy=false")
    assert not forced.reference_from_policy and forced.active_roles == ("actor", "reference", "reward")
    assert forced.reference.model.name_or_path == "/m/policy"


def test_a_lora_policy_trains_at_ten_times_the_full_rate_unless_an_lr_is_given():
    """At the full-training rate (2e-5) GRPO's adapters barely move on the default (docs/lora.md)."""
    from trainer.config import resolve_lr

    def lr(*overrides):
        a = _ppo("algo=grpo", *overrides).actor
        return resolve_lr(a.optim, a.peft.method, "actor.optim").lr

    assert (lr(), lr("actor.peft=lora"), lr("actor.peft=lora", "actor.optim.lr=5e-5")) == (2e-5, 2e-4, 5e-5)
    # A pre-trained policy or critic (50M parameters or more) gets the field's usual rates.
    cfg = _ppo("algo=ppo")
    big = cfg.actor.optim.large_model_params
    rates = [resolve_lr(cfg.role(role).optim, method, parameters=big).lr
             for role in ("actor", "critic") for method in ("none", "lora")]
    assert rates == [1e-6, 1e-5, 1e-5, 1e-4]


@pytest.mark.parametrize("overrides, message", [
    (["actor.peft=lora", "actor.peft.r=0"], r"actor\.peft\.r: must be > 0"),
    (["critic.peft=lora", "critic.peft.dropout=1.0"], r"critic\.peft\.dropout: must be in \[0, 1\)"),
    (["actor.peft=lora", "actor.peft.trainable_tokens=[a]"],
     r"actor\.peft\.trainable_tokens: RL roles train no token embeddings"),
    (["reward.peft.method=lora"], r"reward\.peft: only the trained roles"),
    (["reference.peft.method=lora"], r"reference\.peft: only the trained roles"),
    (["reference.from_policy=sometimes"], r"reference\.from_policy: must be one of auto\|false"),
    # the reference would silently be the policy's base instead of the model asked for
    (["actor.peft=lora", "reference.model.name_or_path=/m/other"],
     r"reference\.model\.name_or_path: is '/m/other'.*set reference\.from_policy=false"),
])
def test_bad_rl_peft_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _ppo(*overrides)


# ------------------------------------------------------------------------------------------ the replica


def test_the_replica_holds_the_adapted_model_merged_and_follows_its_updates(tmp_path):
    """What `PolicyWorker.refresh_replica` writes into the plain generation replica: its logits equal the adapted
    model's, at the start and after the adapters move (only the adapted layers rewritten)."""
    from transformers import AutoModelForCausalLM

    tiny_ppo_model(tmp_path)
    model = add_adapters(AutoModelForCausalLM.from_pretrained(tmp_path), PeftConfig(method="lora", r=4))
    replica = AutoModelForCausalLM.from_config(model.config)
    ids = torch.tensor([[1, 5, 9, 30, 7, 2], [1, 8, 8, 3, 4, 40]])
    copy_merged(model, replica)
    assert torch.equal(replica(input_ids=ids).logits, model(input_ids=ids).logits)  # lora_B starts at zero
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn_like(p))
    adapted = model(input_ids=ids).logits
    assert not torch.allclose(replica(input_ids=ids).logits, adapted, atol=1e-3), "the adapters moved"
    copy_merged(model, replica, changed_only=True)
    torch.testing.assert_close(replica(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ GRPO on Ray


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> list[str]:
    return tiny_ppo_model(tmp_path_factory.mktemp("tiny_model"))


# GRPO with a KL term in the loss; the actor's 2 ranks are under ZeRO-3 (asked for: auto would not partition this tiny
# model), so it generates with a replica; a learning rate at which the adapters move visibly in two iterations. The random-init policy never answers
# exactly, so a format reward that its samples sometimes meet gives the groups a spread: without one, the first update
# follows Adam's normalised noise (the KL's gradient at zero), and two runs part ways for nothing.
LORA_GRPO = ["algo=grpo", "rollout.prompts_per_iteration=4", "algo.mini_batch_size=8", "actor.micro_batch_size=4",
             "actor.peft=lora", "actor.deepspeed.stage=3", "algo.kl_coef=0.05", "actor.optim.lr=5e-3",
             "train.iterations=2", "train.save_every=1", "reward.functions=[{_target_: rlhf.reward_functions.regex_match, pattern: '^[a-m]', full: false}]"]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tiny_model) -> dict[str, tuple[Path, object]]:
    """The same LoRA GRPO run twice: the reference from the policy (the default) and from its own group."""
    root = tmp_path_factory.mktemp("lora_grpo")
    return {name: (root / name, run_ppo(root / name, tiny_model, *LORA_GRPO, *extra))
            for name, extra in (("from_policy", []), ("reference_group", ["reference.from_policy=false"]))}


def _roles(run: Path) -> list[str]:
    return [row.split()[0] for row in (run / "placement.txt").read_text().splitlines()[1:]]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_lora_policy_trains_only_its_adapters_and_starts_no_reference(lora_runs, tiny_model):
    run, proc = lora_runs["from_policy"]
    assert _roles(run) == ["actor", "actor", "reward"]  # a KL term, and still no reference group
    assert "algo=grpo roles=actor,reward" in proc.stdout
    assert "actor: parameters: 17,408 trained of 132,416 (13.15%)" in proc.stdout
    recs = records(run)
    # The adapters start at zero: the rollouts' policy is its reference (to the sampler's rounding) until its first
    # update moves them; the KL term is then in the loss. (Not necessarily in iteration 1's second mini-batch: a
    # mini-batch takes whole groups, and the first one's groups may all score alike, which moves nothing.)
    assert abs(recs[1]["kl/seq_mean"]) < 1e-6 and recs[2]["policy/kl_loss"] > 0
    assert recs[2]["kl/seq_mean"] != 0.0 and recs[2]["policy/approx_kl"] != 0.0
    assert recs[2]["policy/replica_refresh_s"] > 0  # the replica follows the adapters (merged)
    # The checkpoint holds the adapters and their optimizer state, and names where the frozen weights come from.
    tag = run / "checkpoints" / "actor" / "step_00000002"
    assert (tag / "FROZEN_FROM").read_text() == tiny_model[0].split("=", 1)[1]  # the policy's model
    states = torch.load(next(tag.glob("*model_states.pt")), map_location="cpu", weights_only=False)
    names = set(states.get("module") or {}) | {n for group in states.get("param_shapes") or [] for n in group}
    # (the tied output head is the frozen embedding under another name, which DeepSpeed keeps: docs/lora.md)
    assert names and all("lora_" in n or n.endswith("lm_head.weight") for n in names), sorted(names)[:5]
    assert not states.get("frozen_param_shapes"), "the frozen weights are left out"


@pytest.mark.distributed
@pytest.mark.slow
def test_the_adapters_off_reference_equals_a_separate_reference_group(lora_runs):
    (a, _), (b, _) = lora_runs["from_policy"], lora_runs["reference_group"]
    assert _roles(b) == ["actor", "actor", "reference", "reward"]
    ra, rb = records(a), records(b)
    assert ra[1]["reward/group_std_mean"] > 0, "the first update has a signal"
    for step in (1, 2):
        for key in ("kl/seq_mean", "policy/kl_loss", "policy/loss", "reward/score_raw_mean"):
            assert ra[step][key] == pytest.approx(rb[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert ra[2]["kl/seq_mean"] != 0.0


@pytest.mark.distributed
@pytest.mark.slow
def test_a_lora_run_resumed_from_its_first_iteration_equals_the_straight_run(lora_runs, tiny_model, tmp_path):
    """The adapters and their optimizer state come back from a checkpoint without the frozen weights (which the model
    source gives again), and the replica is refreshed from them: iteration 2 is the straight run's."""
    from rlhf.checkpoint import STATE_DIR

    straight, _ = lora_runs["from_policy"]
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints", resumed / "checkpoints")
    shutil.copy(straight / "eval_start.json", resumed / "eval_start.json")
    # As if the run had stopped after its first iteration's checkpoint.
    shutil.rmtree(resumed / "checkpoints" / "actor" / "step_00000002")
    (resumed / "checkpoints" / STATE_DIR / "step_00000002.json").unlink()
    (resumed / "checkpoints" / STATE_DIR / "latest").write_text("step_00000001")
    proc = run_ppo(resumed, tiny_model, *LORA_GRPO, "resume=auto")
    assert "resumed from" in proc.stdout and "step_00000001" in proc.stdout
    a, b = records(straight), records(resumed)
    for key in ("reward/score_raw_mean", "kl/seq_mean", "policy/loss", "policy/kl_loss", "response/length_mean"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-4, abs=1e-6), key


@pytest.mark.distributed
def test_resuming_a_lora_run_without_its_adapters_exits_2_before_ray_starts(lora_runs, tiny_model, tmp_path):
    straight, _ = lora_runs["from_policy"]
    proc = run_ppo(tmp_path / "whole", tiny_model, *LORA_GRPO, "actor.peft=none", f"resume={straight}", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: resume: checkpoint" in proc.stderr and "trains adapters on" in proc.stderr
    assert "this run a whole model (peft=none)" in proc.stderr and "roles=" not in proc.stdout  # no Ray, no groups


@pytest.mark.distributed
@pytest.mark.slow
def test_ppo_with_a_lora_policy_and_critic(tiny_model, tmp_path):
    """PPO's two trained roles on adapters: the critic's score head trains in full beside them (modules_to_save),
    and its checkpoint, like the policy's, leaves the frozen weights out."""
    run = tmp_path / "ppo"
    proc = run_ppo(run, tiny_model, "actor.peft=lora", "critic.peft=lora", "train.iterations=1")
    assert _roles(run) == ["actor", "actor", "critic", "reward"]  # PPO's KL term, and no reference group
    assert "critic: parameters: " in proc.stdout and "trained in full: score" in proc.stdout
    recs = records(run)
    assert recs[1]["critic/loss"] == recs[1]["critic/loss"] and recs[1]["critic/grad_norm"] > 0
    tag = run / "checkpoints" / "critic" / "step_00000001"
    assert (tag / "FROZEN_FROM").is_file()
    states = torch.load(next(tag.glob("*model_states.pt")), map_location="cpu", weights_only=False)
    names = set(states.get("module") or {}) | {n for group in states.get("param_shapes") or [] for n in group}
    assert any(".score.modules_to_save." in n for n in names), sorted(names)[:5]
    assert all("lora_" in n or ".score.modules_to_save." in n for n in names), sorted(names)[:5]


@pytest.mark.distributed
@pytest.mark.slow
def test_a_lora_critic_on_two_zero3_ranks_and_a_policy_generating_through_zero3(tiny_model, tmp_path):
    """The critic's adapters and full-trained head partitioned over 2 ZeRO-3 ranks, and the LoRA policy generating
    through its ZeRO-3 engine (`rollout.generation=zero3`) instead of a merged replica. The first iteration's rollouts
    come from the base either way (the adapters start at zero), and with every rollout in one mini-batch (mini-batches
    are drawn from each rank's shard, so smaller ones hold other rollouts on 2 ranks than on 1) the partitioned
    critic values them and updates on them as 1 ZeRO-3 rank does (the same construction path: the same random adapter
    init). In the second iteration the samples come from the updated adapters (their log-probs part from the
    adapters-off reference); each critic rank's checkpoint holds only the adapters and the head."""
    common = ["actor.peft=lora", "actor.deepspeed.stage=3", "critic.peft=lora", "critic.deepspeed.stage=3", "algo.kl_coef=0.05",
              "algo.mini_batch_size=8", "actor.micro_batch_size=4", "train.iterations=2"]
    run_ppo(tmp_path / "one", tiny_model, *common)
    run_ppo(tmp_path / "two", tiny_model, *common, "critic.devices_per_node=2", "rollout.generation=zero3")
    assert _roles(tmp_path / "two") == ["actor", "actor", "critic", "critic", "reward"]
    a, b = records(tmp_path / "one"), records(tmp_path / "two")
    for key in ("reward/score_raw_mean", "value/explained_variance", "critic/loss", "critic/grad_norm"):
        assert b[1][key] == pytest.approx(a[1][key], rel=1e-4, abs=1e-6), key
    assert b[2]["kl/seq_mean"] != 0.0 and b[2]["policy/approx_kl"] != 0.0
    rank_files = sorted((tmp_path / "two" / "checkpoints" / "critic" / "step_00000002").glob("*model_states.pt"))
    assert len(rank_files) == 2
    for rank_file in rank_files:
        states = torch.load(rank_file, map_location="cpu", weights_only=False)
        names = {n for group in states.get("param_shapes") or [] for n in group}
        assert names and all("lora_" in n or ".score.modules_to_save." in n for n in names), sorted(names)[:5]
