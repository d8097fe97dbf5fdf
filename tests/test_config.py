"""Every config in conf/ composes and validates; mistakes fail at start naming the key."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trainer.compose import compose
from trainer.contracts import STAGE_MODULES
from trainer.config import (CONF_DIR, ConfigError, DeepSpeedConfig, TrainingJobConfig, resolve_zero_stage,
                            training_state_bytes, validate, zero_stage_note)
from trainer.engine import build_deepspeed_config, lr_multiplier

REPO = Path(__file__).resolve().parent.parent
CONF = CONF_DIR


def _compose(name: str, overrides=()):
    return compose(name, overrides, typed=False)


def _typed(dcfg) -> TrainingJobConfig:
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, TrainingJobConfig)
    return cfg


@pytest.mark.parametrize("name", ["sft", "instruct", "reward", "dpo"])
@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "deepspeed").glob("*.yaml")))
def test_every_deepspeed_preset_composes_and_validates(name, preset):
    cfg = _typed(_compose(name, [f"deepspeed={preset}"]))
    validate(cfg, world_size=2)
    ds = build_deepspeed_config(cfg.deepspeed, cfg.train.micro_batch_size, cfg.train.grad_accum, 2,
                                cfg.optim.max_grad_norm)
    assert ds["zero_optimization"]["stage"] == (3 if preset == "auto" else cfg.deepspeed.stage)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 2
    assert "auto" not in str(ds)


@pytest.mark.parametrize("fields,world_size,state_gb,stage", [
    ({}, 1, None, 0),  # one rank: nothing to partition
    ({}, 1, 50.0, 0),
    ({}, 2, None, 3),  # several ranks, the model's size unknown: partitioned
    ({}, 16, 2.5, 3),  # several ranks, a state over auto_partition_above_gb (2)
    ({}, 16, 1.9, 0),  # under it: every rank holds it whole
    ({"auto_partition_above_gb": 0.5}, 2, 1.0, 3),
    ({"auto_partition_above_gb": 0}, 2, 0.001, 3),
    ({"offload_optimizer": True}, 1, None, 2),  # ZeRO-Offload needs a ZeRO optimizer
    ({"offload_optimizer": True}, 4, 0.1, 2),
    ({"offload_param": True, "offload_optimizer": True}, 1, 0.1, 3),  # parameter offload is ZeRO-3 only
    ({"stage": 3}, 1, None, 3),  # an explicit stage is kept
    ({"stage": 0}, 8, 100.0, 0),
])
def test_auto_zero_stage_partitions_only_what_there_is_and_is_worth_partitioning(fields, world_size, state_gb, stage):
    state_bytes = None if state_gb is None else int(state_gb * 1e9)
    ds = resolve_zero_stage(DeepSpeedConfig(**fields), world_size, state_bytes)
    assert ds.stage == stage
    note = zero_stage_note(DeepSpeedConfig(**fields), ds, world_size, state_bytes)
    assert (note is None) == ("stage" in fields)
    assert note is None or note.startswith(f"deepspeed.stage: auto -> {stage} (")
    if state_bytes is None:  # the DeepSpeed JSON of a stage still auto knows no size: the rule by world size
        assert build_deepspeed_config(DeepSpeedConfig(**fields), 4, 1, world_size, 1.0)["zero_optimization"]["stage"] == stage


def test_training_state_counts_16_bytes_per_trained_parameter_and_the_weights_of_frozen_ones():
    assert training_state_bytes(1000, trained=True, precision="fp32") == 16000
    assert training_state_bytes(1000, trained=True, precision="bf16") == 16000
    assert training_state_bytes(1000, trained=False, precision="bf16") == 2000
    assert training_state_bytes(1000, trained=False, precision="fp32") == 4000


@pytest.mark.parametrize("scalar_head", [False, True])
def test_parameters_are_counted_from_the_config_as_the_built_model_has_them(scalar_head):
    import torch

    from trainer.model import build_causal_lm, build_reward_model, count_parameters, load_tokenizer

    cfg = _typed(_compose("sft")).model
    tokenizer = load_tokenizer(cfg)
    built = (build_reward_model if scalar_head else build_causal_lm)(cfg, tokenizer, torch.float32)
    assert count_parameters(cfg, tokenizer, scalar_head) == sum(p.numel() for p in built.parameters())


def test_trained_stages_default_to_auto_and_frozen_ppo_roles_to_plain_replicas():
    for name in ("sft", "instruct", "reward", "dpo"):
        assert _compose(name).deepspeed.stage == "auto"

    ppo = _compose("ppo")
    assert [ppo[r].deepspeed.stage for r in ("actor", "critic", "reference", "reward")] == ["auto", "auto", 0, 0]


@pytest.mark.parametrize("group", ["logger", "data", "optim", "model"])
def test_every_group_option_composes(group, tmp_path, monkeypatch):
    # The *_export models resolve to the newest run under outputs/<stage>: give them one.
    monkeypatch.chdir(tmp_path)
    for stage in ("sft", "reward"):
        (tmp_path / "outputs" / stage / "run1" / "hf_model").mkdir(parents=True)
        (tmp_path / "outputs" / stage / "run1" / "train_state.json").write_text("{}")
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        overrides = [f"{group}={option}"]
        if option == "hf":
            overrides.append("model.name_or_path=some/model")
        if option.endswith("jsonl"):
            overrides.append("data.path=some.jsonl")
        root = "reward" if "preference" in option else "sft"
        cfg = _typed(_compose(root, overrides))
        validate(cfg)


def test_typo_key_fails_with_hydra_message():
    with pytest.raises(Exception, match="micro_batch_sise"):
        _compose("sft", ["train.micro_batch_sise=4"])


def test_wrong_type_fails():
    with pytest.raises(Exception, match="max_steps"):
        _typed(_compose("sft", ["train.max_steps=ten"]))


@pytest.mark.parametrize(
    "override,key",
    [
        ("optim.lr=0", "optim.lr"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("train.grad_accum=-1", "train.grad_accum"),
        ("data.max_length=0", "data.max_length"),
        ("deepspeed.stage=4", "deepspeed.stage"),
        ("train.nonfinite=ignore", "train.nonfinite"),
        ("data.format=csv", "data.format"),
    ],
)
def test_semantic_errors_name_the_key(override, key):
    cfg = _typed(_compose("sft", [override]))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_cli_reports_config_error_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.sft", "optim.lr=-1", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "optim.lr" in proc.stderr
    assert "Traceback" not in proc.stderr


# What a newcomer mistypes first, and the one line each gets. The composing errors are Hydra's and OmegaConf's,
# raised the same way inside a run (where tuneforge catches them from Hydra's reporter) and by `compose`.
TYPOS = [
    (["train.max_stepz=3"], "train.max_stepz: no such setting; did you mean train.max_steps?"),
    (["+train.max_stepz=3"], "train.max_stepz: no such setting; did you mean train.max_steps?"),  # Hydra's own hint
    (["+seeed=3"], "seeed: no such setting; did you mean seed?"),
    (["train.max_steps=abc"], "train.max_steps: Value 'abc' of type 'str' could not be converted to Integer "
                              "(Error merging override train.max_steps=abc)"),
    (["data=synthetic_sf"], "In 'sft': Could not find 'data/synthetic_sf'; the options are jsonl, preference_jsonl, "
                            "synthetic_instruct, synthetic_preference, synthetic_sft"),
]


@pytest.mark.parametrize("overrides,line", TYPOS)
def test_a_mistyped_override_is_one_line_naming_the_key(overrides, line):
    from trainer.compose import error_line

    with pytest.raises(Exception) as err:
        compose("sft", overrides)
    assert error_line(err.value) == line


def test_an_rl_role_without_its_export_is_one_line_naming_the_role(tmp_path, monkeypatch):
    from trainer.compose import error_line

    monkeypatch.chdir(tmp_path)  # no outputs/sft here
    with pytest.raises(Exception) as err:
        compose("ppo", ["algo=grpo"])
    assert error_line(err.value) == ("actor.model.name_or_path: no finished sft run with an exported model under "
                                     "outputs/sft/: run `python -m trainer.sft` first, or set this role's "
                                     "model.name_or_path")


@pytest.mark.parametrize("module,overrides,line", [
    ("trainer.sft", TYPOS[0][0], TYPOS[0][1]),
    ("trainer.sft", TYPOS[1][0], TYPOS[1][1]),
    ("rlhf.ppo", ["algo=grpoo"], "In 'ppo': Could not find 'algo/grpoo'; the options are grpo, ppo, ppo_kl_loss, "
                                 "reinforce_pp, rloo"),
])
def test_the_cli_exits_2_with_that_line_before_anything_is_written(module, overrides, line, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", module, *overrides, f"hydra.run.dir={run}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {line}"
    assert "HYDRA_FULL_ERROR" not in proc.stderr and not (run / "config.yaml").exists()


def test_epochs_become_steps_rounded_up_and_the_length_is_said_in_both_units():
    from trainer.config import TrainConfig, resolve_max_steps

    t, note = resolve_max_steps(TrainConfig(max_steps=800, epochs=2), sequences=10, global_batch=4)
    assert t.max_steps == 5 and note == "train.max_steps: train.epochs=2 -> 5 (10 training sequences, global batch 4)"
    assert resolve_max_steps(TrainConfig(epochs=0.5), 10, 4)[0].max_steps == 2  # 1.25 steps: the last one partial
    t, note = resolve_max_steps(TrainConfig(max_steps=800), 3200, 16)
    assert t.max_steps == 800 and note.startswith("train.max_steps=800: 4.00 epochs of the 3200 training sequences")


def test_a_warmup_that_outlasts_the_run_is_said():
    from trainer.config import OptimConfig, warmup_note

    assert warmup_note(OptimConfig(lr=3e-3, warmup_steps=30), 31) is None
    assert warmup_note(OptimConfig(lr=3e-3, warmup_steps=30), 30) == (
        "warning: optim.warmup_steps=30 is not shorter than the run's 30 steps: the rate rises the whole run and never "
        "reaches optim.lr=0.003; lower optim.warmup_steps")


def test_a_warmup_ratio_becomes_steps_of_the_schedule_and_says_so():
    from trainer.config import OptimConfig, resolve_warmup

    o, note = resolve_warmup(OptimConfig(warmup_ratio=0.1), 45)
    assert o.warmup_steps == 5 and note == "optim.warmup_steps: optim.warmup_ratio=0.1 -> 5 (of the schedule's 45 optimizer steps)"
    o, note = resolve_warmup(OptimConfig(warmup_ratio=0.05, decay_steps=200), 45, "actor.optim")  # the schedule's
    assert o.warmup_steps == 10 and note.startswith("actor.optim.warmup_steps: actor.optim.warmup_ratio=0.05 -> 10 ")
    assert resolve_warmup(OptimConfig(warmup_steps=7), 45) == (OptimConfig(warmup_steps=7), None)


def test_an_rl_roles_warmup_ratio_is_of_its_optimizer_steps_over_the_run_said_by_the_driver(capsys):
    from rlhf.ppo import resolve_rates

    random_init = [f"{role}.model.name_or_path=null" for role in ("actor", "critic", "reference", "reward")]
    cfg = compose("ppo", [*random_init, "train.iterations=10", "rollout.prompts_per_iteration=8",
                          "algo.mini_batch_size=4", "algo.ppo_epochs=2", "actor.optim.warmup_ratio=0.25"])
    assert cfg.optimizer_steps == 10 * 2 * (8 * cfg.rollout.samples_per_prompt // 4)
    resolve_rates(cfg)
    assert cfg.actor.optim.warmup_steps == math.ceil(0.25 * cfg.optimizer_steps)
    assert (f"actor.optim.warmup_steps: actor.optim.warmup_ratio=0.25 -> {cfg.actor.optim.warmup_steps} (of the "
            f"schedule's {cfg.optimizer_steps} optimizer steps)") in capsys.readouterr().out
    assert cfg.critic.optim.warmup_steps == 0  # the critic's own setting, untouched


def test_a_warmup_ratio_beside_warmup_steps_or_out_of_range_is_an_error():
    with pytest.raises(ConfigError, match=r"^optim\.warmup_steps and optim\.warmup_ratio are both set: give one"):
        compose("sft", ["optim.warmup_ratio=0.1", "optim.warmup_steps=5"])
    with pytest.raises(ConfigError, match=r"^critic\.optim\.warmup_steps and critic\.optim\.warmup_ratio are both"):
        compose("ppo", ["critic.optim.warmup_ratio=0.1", "critic.optim.warmup_steps=5"])
    compose("sft", ["optim.warmup_ratio=0.1"])  # the group's default warmup_steps is not the user's
    with pytest.raises(ConfigError, match=r"optim\.warmup_ratio: must be in \[0, 1\) or null, got 1\.5"):
        validate(_typed(_compose("sft", ["optim.warmup_ratio=1.5"])))


def test_epochs_and_max_steps_typed_together_is_an_error_and_epochs_must_be_positive():
    with pytest.raises(ConfigError, match=r"^train\.max_steps and train\.epochs are both set: give one"):
        compose("sft", ["train.epochs=2", "train.max_steps=100"])
    with pytest.raises(ConfigError, match=r"train\.epochs: must be > 0"):
        validate(_typed(_compose("sft", ["train.epochs=0"])))


def test_lr_schedule_warmup_then_cosine_to_floor():
    from trainer.config import OptimConfig

    o = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, o, 110) == pytest.approx(0.1)
    assert lr_multiplier(9, o, 110) == pytest.approx(1.0)
    assert lr_multiplier(10, o, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, o, 110) == pytest.approx(0.55)
    assert lr_multiplier(110, o, 110) == pytest.approx(0.1)
    assert lr_multiplier(500, o, 110) == pytest.approx(0.1)


def test_each_stage_accepts_only_its_own_data_formats():
    validate(_typed(_compose("reward", ["data.format=preference_conversations"])))
    with pytest.raises(ConfigError, match=r"data\.format: must be one of auto\|preference_text"):
        validate(_typed(_compose("reward", ["data.format=prompt_completion"])))
    with pytest.raises(ConfigError, match=r"data\.format"):
        validate(_typed(_compose("sft", ["data.format=preference_text"])))


def test_prompt_sharing_needs_packing_and_a_4d_mask_attention():
    validate(_typed(_compose("reward", ["data.packing=false", "preference_loss.share_prompt=false"])))
    with pytest.raises(ConfigError, match=r"preference_loss\.share_prompt: needs data\.packing=true"):
        validate(_typed(_compose("reward", ["data.packing=false"])))
    with pytest.raises(ConfigError, match=r"preference_loss\.share_prompt: needs model\.attn_implementation"):
        validate(_typed(_compose("reward", ["model.attn_implementation=flash_attention_2"])))


def test_latest_export_is_the_newest_finished_run(tmp_path):
    from trainer.config import latest_export

    assert latest_export(str(tmp_path / "missing")) is None
    for run, finished in (("2026-01-01_10-00-00", True), ("2026-01-02_10-00-00", True), ("2026-01-03_10-00-00", False)):
        (tmp_path / run / "hf_model").mkdir(parents=True)
        if finished:  # train_state.json is written after the export completes
            (tmp_path / run / "train_state.json").write_text("{}")
    assert latest_export(str(tmp_path)) == str(tmp_path / "2026-01-02_10-00-00" / "hf_model")


@pytest.mark.parametrize("stage", ["reward", "dpo"])
def test_preference_stages_default_model_falls_back_to_tiny_without_an_sft_export(stage, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no outputs/sft here
    cfg = _typed(_compose(stage))
    assert cfg.model.name_or_path is None and cfg.stage == stage
    (tmp_path / "outputs/sft/2026-01-01_10-00-00/hf_model").mkdir(parents=True)
    (tmp_path / "outputs/sft/2026-01-01_10-00-00/train_state.json").write_text("{}")
    cfg = _typed(_compose(stage))
    assert cfg.model.name_or_path == "outputs/sft/2026-01-01_10-00-00/hf_model"


PPO_GROUPS = ("actor", "critic", "reference", "reward_source", "rollout", "algo", "cluster")


@pytest.mark.parametrize("group", PPO_GROUPS)
def test_every_ppo_group_option_composes_and_validates(group, tmp_path, monkeypatch):
    from rlhf.config import PPOConfig
    from rlhf.config import validate as validate_ppo

    monkeypatch.chdir(tmp_path)
    for stage in ("sft", "reward"):
        (tmp_path / "outputs" / stage / "run1" / "hf_model").mkdir(parents=True)
        (tmp_path / "outputs" / stage / "run1" / "train_state.json").write_text("{}")
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        cfg = OmegaConf.to_object(_compose("ppo", [f"{group}={option}"]))
        assert isinstance(cfg, PPOConfig)
        validate_ppo(cfg)
        assert cfg.actor.model.name_or_path == str(Path("outputs/sft/run1/hf_model"))
        expected = "sft" if (group, option) == ("critic", "from_policy") else "reward"
        assert cfg.critic.model.name_or_path == str(Path(f"outputs/{expected}/run1/hf_model"))


def test_ppo_without_an_sft_export_names_the_stage_to_run(tmp_path, monkeypatch):
    from omegaconf.errors import InterpolationResolutionError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(InterpolationResolutionError, match=r"python -m trainer\.sft"):
        OmegaConf.to_object(_compose("ppo"))


@pytest.mark.parametrize("override,key", [
    ("rollout.prompts_per_iteration=5", "actor.num_nodes/devices_per_node"),
    ("algo.mini_batch_size=48", "algo.mini_batch_size"),
    ("algo.kl_estimator=k4", "algo.kl_estimator"),
    ("cluster.colocate=sometimes", "cluster.colocate"),
    ("rollout.generation=vllm", "rollout.generation"),
    ("train.save_every=-2", "train.save_every"),
    ("algo=grpo actor.model.attn_implementation=flash_attention_2", "rollout.share_prompt"),
])
def test_bad_ppo_values_name_the_key(override, key, tmp_path, monkeypatch):
    from rlhf.config import validate as validate_ppo

    roles = ("actor", "critic", "reference", "reward")  # the roles' keys (the reward's group is reward_source)
    cfg = OmegaConf.to_object(_compose("ppo", [f"{r}.model.name_or_path=x" for r in roles] + override.split()))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_ppo(cfg)


@pytest.mark.parametrize("save_every,saved", [(0, [6]), (2, [2, 4, 6]), (4, [4, 6]), (-1, [])])
def test_ppo_checkpoints_at_save_every_and_the_end_unless_minus_one(save_every, saved):
    from rlhf.config import PPOTrainConfig

    t = PPOTrainConfig(iterations=6, save_every=save_every)
    assert [step for step in range(1, 7) if t.saves_at(step)] == saved


def test_a_killed_builds_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    import os
    import time

    from trainer.cli import _remove_stale_build_locks

    stale, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    _remove_stale_build_locks(tmp_path)
    assert not stale.exists() and fresh.exists()


def test_renamed_keys_keep_working_for_a_release_with_a_note(capsys):
    cfg = compose("reward", ["reward.center_coef=0.25", "reward.share_prompt=false"])
    assert cfg.preference_loss.center_coef == 0.25 and cfg.preference_loss.share_prompt is False
    err = capsys.readouterr().err
    assert "reward.center_coef is renamed preference_loss.center_coef" in err
    assert "reward.share_prompt is renamed preference_loss.share_prompt" in err
    ppo = compose("ppo", ["reward=exact_match"], typed=False)
    assert ppo.reward.functions[0]._target_ == "rlhf.reward_functions.exact_match"
    assert "reward is renamed reward_source" in capsys.readouterr().err


def test_a_critic_free_run_needs_only_the_exports_of_the_roles_it_runs(tmp_path, monkeypatch):
    from omegaconf.errors import InterpolationResolutionError

    from rlhf.config import validate as validate_ppo

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs" / "sft" / "run1" / "hf_model").mkdir(parents=True)
    (tmp_path / "outputs" / "sft" / "run1" / "train_state.json").write_text("{}")
    cfg = compose("ppo", ["algo=grpo"])  # no reward export: GRPO scores with exact match and has no critic
    validate_ppo(cfg)
    assert cfg.active_roles == ("actor", "reward") and cfg.critic.model.name_or_path is None
    assert cfg.reward.functions[0]["_target_"] == "rlhf.reward_functions.exact_match"
    with_kl = compose("ppo", ["algo=grpo", "algo.kl_coef=0.04"])
    assert with_kl.active_roles == ("actor", "reference", "reward")
    assert with_kl.reference.model.name_or_path == str(Path("outputs/sft/run1/hf_model"))
    with pytest.raises(InterpolationResolutionError, match=r"python -m trainer\.reward"):
        compose("ppo")  # PPO's critic starts from the reward export


def test_grpo_on_a_given_policy_needs_no_export_and_its_reference_is_that_policy(tmp_path, monkeypatch):
    from rlhf.config import validate as validate_ppo

    monkeypatch.chdir(tmp_path)  # no outputs/: neither an SFT nor a reward export exists
    cfg = compose("ppo", ["algo=grpo", "actor.model.name_or_path=/models/policy"])
    validate_ppo(cfg)
    assert cfg.reward.model.name_or_path is None and cfg.critic.model.name_or_path is None
    with_kl = compose("ppo", ["algo=grpo", "algo.kl_coef=0.04", "actor.model.name_or_path=/models/policy"])
    assert with_kl.reference.model.name_or_path == "/models/policy"  # KL to where the policy started
    own = compose("ppo", ["algo=grpo", "algo.kl_coef=0.04", "actor.model.name_or_path=/models/policy",
                          "reference.model.name_or_path=/models/other"])
    assert own.reference.model.name_or_path == "/models/other" and own.actor.model.name_or_path == "/models/policy"


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_an_empty_data_path_names_the_key(stage):
    from rlhf.config import validate as validate_ppo

    check = validate_ppo if stage == "ppo" else validate
    overrides = [f"{r}.model.name_or_path=x" for r in ("actor", "critic", "reference", "reward")] if stage == "ppo" else []
    with pytest.raises(ConfigError, match=r"data\.path: is empty"):
        check(compose(stage, [*overrides, "data.path="]))


# ------------------------------------------------------------------------------------------ model sources


def test_a_model_source_that_cannot_load_names_the_key_and_why(tmp_path):
    from trainer.config import ModelConfig
    from trainer.model import check_model_source

    run = tmp_path / "sft_run"
    (run / "hf_model").mkdir(parents=True)
    (run / "hf_model" / "config.json").write_text("{}")
    (tmp_path / "weights.bin").write_text("x")
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    cases = {
        str(tmp_path / "nope"): r"actor\.model\.name_or_path=.*nope: no such directory",
        str(tmp_path / "weights.bin"): r"is a file; expected a directory holding config\.json",
        str(run): rf"not a model directory \(no config\.json\); did you mean {run / 'hf_model'}\?",
        str(no_tokenizer): r"name_or_path=.*no_tokenizer: not a tokenizer directory \(no tokenizer_config\.json\)",
        "nobody/no-such-model": r"no such local directory, and as a Hub model name: it is not in the local Hugging "
                                r"Face cache and HF_HUB_OFFLINE=1 forbids downloading it",
    }
    for source, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            check_model_source(ModelConfig(name_or_path=source), "actor.model")
    with pytest.raises(ConfigError, match=r"model\.tokenizer=.*nope: no such directory"):
        check_model_source(ModelConfig(tokenizer=str(tmp_path / "nope")), "model")
    check_model_source(ModelConfig(), "model")  # the tiny default loads nothing


@pytest.mark.parametrize("stage", ["sft", "ppo"])
def test_a_missing_model_exits_2_in_one_line_before_anything_is_written(stage, tmp_path):
    from tests.runs import run_env, tiny_ppo_model

    missing = tmp_path / "no_such_model"
    if stage == "ppo":  # every role but the reward model loads: the check covers each role, not just the policy
        overrides = [*tiny_ppo_model(tmp_path / "tiny"), f"reward.model.name_or_path={missing}"]
        key = "reward.model.name_or_path"
    else:
        overrides, key = [f"model.name_or_path={missing}"], "model.name_or_path"
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", STAGE_MODULES[stage], *overrides, f"hydra.run.dir={run}"],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {key}={missing}: no such directory"
    assert "Traceback" not in proc.stderr and not (run / "config.yaml").exists()


def test_a_micro_batch_larger_than_the_data_exits_2_naming_both_numbers(tmp_path):
    from tests.runs import run_env, write_sft_jsonl

    data = write_sft_jsonl(tmp_path / "three.jsonl", 3)
    proc = subprocess.run([sys.executable, "-m", "trainer.sft", "model.tiny.num_hidden_layers=1", f"data.path={data}",
                           "data.packing=false", "data.eval_path=null", "train.micro_batch_size=8",
                           f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == ("error: train.micro_batch_size: 8 is larger than the 3 "
                                                    "training rows")


def test_a_tiny_model_takes_a_larger_vocabulary_and_refuses_a_smaller_one():
    """model.tiny.vocab_size gives the random-init model a realistic vocabulary's embedding and softmax (the
    benchmarks' compute-bound size) while the data uses the tokenizer's tokens; fewer rows than tokens would index
    past the embedding."""
    from trainer.model import load_tokenizer, tiny_llama_config

    cfg = compose("sft", ["model.tiny.vocab_size=32000"]).model
    tokenizer = load_tokenizer(cfg)
    assert tiny_llama_config(cfg, tokenizer).vocab_size == 32000
    assert tiny_llama_config(compose("sft").model, tokenizer).vocab_size == len(tokenizer)
    with pytest.raises(ConfigError, match=rf"model\.tiny\.vocab_size: 100 is smaller than the tokenizer's "
                                          rf"{len(tokenizer)} tokens"):
        tiny_llama_config(compose("sft", ["model.tiny.vocab_size=100"]).model, tokenizer)


@pytest.mark.parametrize("module,groups,line", [
    ("trainer.sft", ["data", "deepspeed", "logger", "model", "optim", "peft"],
     "deepspeed: auto, zero0, zero2, zero3, zero3_offload"),
    ("rlhf.ppo", ["actor", "algo", "cluster", "critic", "data", "logger", "reference", "reward_source", "rollout"],
     "algo: grpo, ppo, ppo_kl_loss, reinforce_pp, rloo"),
])
def test_help_lists_the_groups_of_the_stage_it_runs(module, groups, line):
    """`--help` lists the config groups the stage composes from, with their options, not every group under conf/
    (a supervised stage's help had the RL roles' groups), then the config."""
    from tests.runs import run_env

    proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, env=run_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed, config = proc.stdout.split("== Configuration groups ==")[1].split("== Config ==")
    assert [row.split(":")[0] for row in listed.strip().splitlines()[1:] if row.strip()] == groups
    assert line in listed.splitlines()
    assert f"stage: {module.split('.')[-1]}" in config.splitlines()
