"""LoRA adapters (peft=lora) on the supervised stages: config errors name the key, only the adapters train, the merged
and adapter exports load and agree, ZeRO-3 on 2 ranks equals 1 rank, DPO's reference is the base with adapters off,
resume equals the straight run with a checkpoint that holds only the adapters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runs import REPO, TINY, losses, run_env, run_stage, tiny_ppo_model, write_pairs_jsonl, write_sft_jsonl
from trainer.adapters import add_adapters, parameter_counts
from trainer.compose import compose
from trainer.config import ConfigError, PeftConfig, validate

# The tiny model of tests/runs.py: hidden 64, intermediate 128, 2 layers, 4 heads of 16 (k/v as wide as q).
HIDDEN, INTERMEDIATE, LAYERS = 64, 128, 2


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny random-init Llama saved as a Hugging Face directory: the frozen base every run here adapts."""
    out = tmp_path_factory.mktemp("base")
    tiny_ppo_model(out)
    return out


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return write_sft_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", 400)


def _lora_run(base_dir: Path, data: Path, *extra: str) -> list[str]:
    return [*TINY, f"model.name_or_path={base_dir}", "peft=lora", f"data.path={data}", "data.eval_path=null",
            "train.micro_batch_size=4", "optim.lr=1e-2", *extra]


@pytest.mark.parametrize("override,key", [
    ("peft.r=0", "peft.r"),
    ("peft.alpha=0", "peft.alpha"),
    ("peft.dropout=1.0", "peft.dropout"),
    ("peft.dropout=-0.1", "peft.dropout"),
    ("peft.method=qlora", "peft.method"),
    ("peft.target_modules=[]", "peft.target_modules"),
    ("peft.target_modules=[all-linear,q_proj]", "peft.target_modules"),
])
def test_bad_peft_values_name_the_key(override, key):
    cfg = compose("sft", ["peft=lora", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


@pytest.mark.parametrize("stage", ["sft", "instruct", "reward", "dpo"])
def test_every_stage_composes_with_lora_and_defaults_to_full_training(stage):
    assert compose(stage).peft.method == "none"
    cfg = compose(stage, ["peft=lora"])
    validate(cfg)
    assert (cfg.peft.method, cfg.peft.target_modules, cfg.peft.modules_to_save) == ("lora", ["all-linear"], None)


def _tiny_model(base_dir: Path, reward: bool = False):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if reward:
        return AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    return AutoModelForCausalLM.from_pretrained(base_dir)


def test_a_target_module_the_model_lacks_names_the_key_and_the_modules_it_has(base_dir):
    with pytest.raises(ConfigError, match=r"peft\.target_modules: the model has no module 'qkv_proj'; its linear "
                                          r"layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj"):
        add_adapters(_tiny_model(base_dir), PeftConfig(method="lora", target_modules=["q_proj", "qkv_proj"]))


def test_a_bad_target_module_exits_2_in_one_line(base_dir, small_data, tmp_path):
    proc = run_stage(tmp_path / "run", *_lora_run(base_dir, small_data, "peft.target_modules=[attn]"), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: peft.target_modules: the model has no module 'attn'")
    assert "Traceback" not in proc.stderr


def test_only_the_adapters_train_and_the_counts_are_theirs(base_dir):
    """all-linear: every projection of the blocks, not the output head; r * (in + out) parameters each. A reward
    model also trains its new scalar head in full (one row of `HIDDEN`)."""
    r = 8
    per_layer = r * (4 * (HIDDEN + HIDDEN) + 2 * (HIDDEN + INTERMEDIATE) + (INTERMEDIATE + HIDDEN))
    model = _tiny_model(base_dir)
    _, total = parameter_counts(model)
    adapted = add_adapters(model, PeftConfig(method="lora", r=r))
    trainable, adapted_total = parameter_counts(adapted)
    assert trainable == LAYERS * per_layer and adapted_total == total + trainable
    assert all(("lora_" in n) == p.requires_grad for n, p in adapted.named_parameters())

    reward = add_adapters(_tiny_model(base_dir, reward=True), PeftConfig(method="lora", r=r))
    assert parameter_counts(reward)[0] == LAYERS * per_layer + HIDDEN
    assert {n for n, p in reward.named_parameters() if p.requires_grad and "lora_" not in n} == \
        {"base_model.model.score.modules_to_save.default.weight"}


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.distributed
@pytest.mark.slow
def test_sft_with_lora_learns_and_exports_a_merged_model_and_an_adapter_that_agree(base_dir, small_data, tmp_path):
    """Unpartitioned on one rank (deepspeed.stage=auto): the loss goes down; hf_model/ is a plain causal LM that
    differs from the base only in the adapted projections; hf_adapter/ on the base gives the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "sft"
    out = run_stage(run_dir, *[o for o in _lora_run(base_dir, small_data, "train.max_steps=12")
                               if o != "train.export=false"]).stdout
    assert "parameters: 17,408 trained of 132,416 (13.15%)" in out
    assert "peft=lora r=8 alpha=16.0 on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in out
    curve = losses(run_dir)
    assert curve[12] < curve[1] - 0.1, curve

    merged = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    changed = {n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    projections = {f"model.layers.{i}.{m}.weight" for i in range(LAYERS) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert changed == projections

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run_dir / "hf_adapter")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])
    assert torch.allclose(_logits(merged, ids), _logits(adapted, ids), atol=1e-5)
    assert not torch.allclose(_logits(merged, ids), _logits(base, ids), atol=1e-3)
