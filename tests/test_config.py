"""Every config in conf/ composes and validates; mistakes fail at start naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from trainer.config import CONF_DIR, ConfigError, TrainingJobConfig, register_configs, validate
from trainer.engine import build_deepspeed_config, lr_multiplier

REPO = Path(__file__).resolve().parent.parent
CONF = CONF_DIR


def _compose(name: str, overrides=()):
    register_configs()
    if not OmegaConf.has_resolver("tf_run_id"):
        OmegaConf.register_new_resolver("tf_run_id", lambda: "test")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        # output_dir normally interpolates Hydra's runtime dir, which compose() lacks.
        return compose(config_name=name, overrides=["output_dir=.", *overrides])


def _typed(dcfg) -> TrainingJobConfig:
    cfg = OmegaConf.to_object(dcfg)
    assert isinstance(cfg, TrainingJobConfig)
    return cfg


@pytest.mark.parametrize("name", ["sft", "instruct"])
@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "deepspeed").glob("*.yaml")))
def test_every_deepspeed_preset_composes_and_validates(name, preset):
    cfg = _typed(_compose(name, [f"deepspeed={preset}"]))
    validate(cfg, world_size=2)
    ds = build_deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"]["stage"] == cfg.deepspeed.stage
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 2
    assert "auto" not in str(ds)


@pytest.mark.parametrize("group", ["logger", "data", "optim", "model"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        overrides = [f"{group}={option}"]
        if option == "hf":
            overrides.append("model.name_or_path=some/model")
        if option == "jsonl":
            overrides.append("data.path=some.jsonl")
        cfg = _typed(_compose("sft", overrides))
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


def test_lr_schedule_warmup_then_cosine_to_floor():
    from trainer.config import OptimConfig

    o = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, o, 110) == pytest.approx(0.1)
    assert lr_multiplier(9, o, 110) == pytest.approx(1.0)
    assert lr_multiplier(10, o, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, o, 110) == pytest.approx(0.55)
    assert lr_multiplier(110, o, 110) == pytest.approx(0.1)
    assert lr_multiplier(500, o, 110) == pytest.approx(0.1)
