"""LoRA adapters (peft=lora) on the supervised stages: config errors name the key, only the adapters train, the merged
and adapter exports load and agree, ZeRO-3 on 2 ranks equals 1 rank, DPO's reference is the base with adapters off,
resume equals the straight run with a checkpoint that holds only the adapters."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runs import (REPO, TINY, assert_same_losses, losses, metric, run_env, run_stage, tiny_ppo_model, write_pairs_jsonl,
                  write_sft_jsonl)
from trainer.adapters import add_adapters, describe_tokens, parameter_counts, trainable_token_ids
from trainer.compose import compose
from trainer.config import ConfigError, OptimConfig, PeftConfig, lr_note, resolve_lr, validate
from trainer.model import load_tokenizer

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


def test_both_halves_of_a_tied_embedding_in_modules_to_save_name_the_key(base_dir):
    """peft would fail with a KeyError ("attribute 'weight' already exists") building the second copy."""
    with pytest.raises(ConfigError, match=r"peft\.modules_to_save: embed_tokens and lm_head share one weight \(tied "
                                          r"embeddings\)"):
        add_adapters(_tiny_model(base_dir), PeftConfig(method="lora", modules_to_save=["embed_tokens", "lm_head"]))


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


def test_auto_trainable_tokens_are_the_special_tokens_in_the_training_data():
    """Padding aside; explicit token strings are taken as they are; a token the tokenizer lacks names the key."""
    tok = load_tokenizer(compose("sft").model)
    user, end, pad = (tok.convert_tokens_to_ids(t) for t in ("<|user|>", "<|end|>", "<|pad|>"))
    rows = [{"input_ids": [tok.bos_token_id, user, 40, end], "labels": [-100, -100, 40, end]},
            {"chosen_input_ids": [tok.bos_token_id, 41, tok.eos_token_id, pad], "rejected_input_ids": [42]}]
    auto = PeftConfig(method="lora")
    ids = trainable_token_ids(auto, tok, rows)
    assert ids == sorted([tok.bos_token_id, tok.eos_token_id, user, end])
    assert describe_tokens(ids, tok, auto) == ("peft.trainable_tokens: <|bos|>, <|eos|>, <|end|>, <|user|> (auto: "
                                               "the special tokens in the training data)")
    assert trainable_token_ids(PeftConfig(method="lora", trainable_tokens=[]), tok, rows) == []
    assert trainable_token_ids(PeftConfig(method="lora", trainable_tokens=["<|user|>", "a"]), tok, rows) == \
        sorted([user, tok.convert_tokens_to_ids("a")])
    assert trainable_token_ids(PeftConfig(method="none"), tok, rows) == []
    with pytest.raises(ConfigError, match=r"peft\.trainable_tokens: the tokenizer has no token '<\|tool\|>'"):
        trainable_token_ids(PeftConfig(method="lora", trainable_tokens=["<|tool|>"]), tok, rows)


def test_lr_auto_gives_adapters_their_own_rate_and_an_explicit_lr_is_kept():
    o = compose("instruct").optim
    assert (o.lr, resolve_lr(o, "none").lr, resolve_lr(o, "lora").lr) == ("auto", 3e-3, 1e-2)
    assert lr_note(o, "lora") == "optim.lr: auto -> 0.01 (peft.method=lora, from optim.lr_for)"
    dpo = compose("dpo").optim
    assert (dpo.lr, resolve_lr(dpo, "none").lr, resolve_lr(dpo, "lora").lr) == ("auto", 5e-5, 1e-3)
    sft = compose("sft").optim  # instruction tuning's rates (docs/lora.md)
    assert (sft.lr, resolve_lr(sft, "none").lr, resolve_lr(sft, "lora").lr) == ("auto", 3e-3, 1e-2)
    critic = compose("ppo", typed=False).critic.optim  # typed=False: no SFT export to resolve the roles' models
    assert (critic.lr, critic.lr_for["none"], critic.lr_for["lora"]) == ("auto", 5e-4, 2e-3)
    explicit = compose("instruct", ["peft=lora", "optim.lr=5e-3"]).optim
    assert resolve_lr(explicit, "lora").lr == 5e-3 and lr_note(explicit, "lora") is None
    with pytest.raises(ConfigError, match=r"optim\.lr: is auto and optim\.lr_for has no rate for peft\.method=lora; "
                                          r"set optim\.lr or optim\.lr_for\.lora"):
        resolve_lr(OptimConfig(lr="auto", lr_for={"none": 1e-3}), "lora")
    for override, key in (("optim.lr=fast", r"optim\.lr: must be > 0 or auto"),
                          ("optim.lr_for.lora=0", r"optim\.lr_for\.lora: must be > 0"),
                          ("+optim.lr_for.qlora=1e-3", r"optim\.lr_for: keys must be among none\|lora")):
        with pytest.raises(ConfigError, match=key):
            validate(compose("instruct", [override]))


def test_lr_auto_for_a_large_model_takes_the_pretrained_rates_and_says_so():
    """The rates above suit the ~1M-parameter embedded default; a model of large_model_params or more (a pre-trained
    one) gets the field's usual rates instead (TRL's SFT and DPO defaults, OpenRLHF's reward model's)."""
    big, small = 78_132_224, 857_216
    for stage, full, lora, tiny_full in (("sft", 2e-5, 2e-4, 3e-3), ("instruct", 2e-5, 2e-4, 3e-3),
                                         ("dpo", 1e-6, 1e-5, 5e-5), ("reward", 1e-5, 1e-4, 1e-3)):
        o = compose(stage).optim
        assert (resolve_lr(o, "none", parameters=big).lr, resolve_lr(o, "lora", parameters=big).lr) == (full, lora)
        assert resolve_lr(o, "none", parameters=small).lr == resolve_lr(o, "none").lr == tiny_full
        assert resolve_lr(o, "none", parameters=o.large_model_params).lr == full  # the threshold counts as large
    o = compose("sft").optim
    assert lr_note(o, "none", parameters=big) == ("optim.lr: auto -> 2e-05 (peft.method=none, 78,132,224 parameters, "
                                                  "at least optim.large_model_params=50,000,000; from "
                                                  "optim.lr_for_large)")
    assert lr_note(o, "none", parameters=small) == ("optim.lr: auto -> 0.003 (peft.method=none, 857,216 parameters, "
                                                    "under optim.large_model_params=50,000,000; from optim.lr_for)")
    with pytest.raises(ConfigError, match=r"optim\.lr_for_large: keys must be among none\|lora"):
        validate(compose("sft", ["+optim.lr_for_large.qlora=1e-4"]))


def test_a_run_counts_its_model_to_pick_the_rate(tmp_path):
    data = write_sft_jsonl(tmp_path / "sft.jsonl", 40)
    run_dir = tmp_path / "run"
    out = run_stage(run_dir, *TINY, f"data.path={data}", "data.eval_path=null", "train.max_steps=1",
                    "train.micro_batch_size=2", "optim.warmup_steps=0", "optim.min_lr_ratio=1.0",
                    "optim.large_model_params=1000").stdout
    assert "optim.lr: auto -> 2e-05 (peft.method=none, " in out and "from optim.lr_for_large)" in out
    assert metric(run_dir, "train/lr")[1] == pytest.approx(2e-5)


@pytest.mark.distributed
def test_instruct_with_lora_on_its_defaults_trains_the_chat_tokens_at_the_adapters_rate(base_dir, tmp_path):
    """`trainer.instruct peft=lora` with no lr or token override: the chat template's markers train beside the
    adapters at optim.lr_for.lora, both printed; the export holds them (merged and adapter agree)."""
    run_dir = tmp_path / "instruct"
    out = run_stage(run_dir, *[o for o in TINY if o != "train.export=false"], f"model.name_or_path={base_dir}",
                    "peft=lora", "train.max_steps=2", "train.micro_batch_size=4", stage="instruct").stdout
    assert re.search(r"optim\.lr: auto -> 0\.01 \(peft\.method=lora, [\d,]+ parameters, under "
                     r"optim\.large_model_params=50,000,000; from optim\.lr_for\)", out), out
    assert ("peft.trainable_tokens: <|bos|>, <|eos|>, <|end|>, <|system|>, <|user|>, <|assistant|> (auto: the special "
            "tokens in the training data)") in out
    assert metric(run_dir, "train/lr")[2] == pytest.approx(1e-2)  # the end of the 2-step warmup
    _adapter_agrees_with_merged(run_dir, base_dir)


def test_trained_token_rows_are_the_only_embedding_change_and_the_tied_head_follows(base_dir):
    """peft's trainable tokens: one delta row per token, shared by the tied output head; a step moves those rows of
    the embedding (and so of the head) and no other."""
    ids = [1, 5]
    model = add_adapters(_tiny_model(base_dir), PeftConfig(method="lora"), token_ids=ids)
    lora_only = parameter_counts(add_adapters(_tiny_model(base_dir), PeftConfig(method="lora")))[0]
    assert parameter_counts(model)[0] == lora_only + len(ids) * HIDDEN
    before = _tiny_model(base_dir).get_input_embeddings().weight.detach()
    batch = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    merged = model.merge_and_unload()
    moved = (merged.get_input_embeddings().weight != before).any(dim=1).nonzero().flatten().tolist()
    assert moved == ids
    assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.distributed
@pytest.mark.slow
def test_sft_with_lora_learns_and_exports_a_merged_model_and_an_adapter_that_agree(base_dir, small_data, tmp_path):
    """Unpartitioned on one rank (deepspeed.stage=auto): the loss goes down; hf_model/ is a plain causal LM that
    differs from the base only in the adapted projections and the trained tokens' embedding rows (bos and eos, the
    special tokens of prompt/completion data; the head is tied to them); hf_adapter/ on the base gives the same
    logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "sft"
    out = run_stage(run_dir, *[o for o in _lora_run(base_dir, small_data, "train.max_steps=12")
                               if o != "train.export=false"]).stdout
    assert "peft.trainable_tokens: <|bos|>, <|eos|> (auto: the special tokens in the training data)" in out
    assert "parameters: 17,536 trained of 132,544 (13.23%)" in out  # the adapters and 2 rows of 64
    assert "peft=lora r=8 alpha=16.0 on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in out
    curve = losses(run_dir)
    assert curve[12] < curve[1] - 0.1, curve

    merged = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    changed = {n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    projections = {f"model.layers.{i}.{m}.weight" for i in range(LAYERS) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert changed == projections | {"model.embed_tokens.weight", "lm_head.weight"}
    embedding = merged.get_input_embeddings().weight
    moved = (embedding != base.get_input_embeddings().weight).any(dim=1).nonzero().flatten().tolist()
    assert moved == [1, 2] and merged.get_output_embeddings().weight is embedding

    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run_dir / "hf_adapter")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])
    assert torch.allclose(_logits(merged, ids), _logits(adapted, ids), atol=1e-5)
    assert not torch.allclose(_logits(merged, ids), _logits(base, ids), atol=1e-3)


def _adapter_agrees_with_merged(run_dir: Path, base_dir: Path, reward: bool = False) -> None:
    """hf_model/ (merged, a plain Hugging Face model) and hf_adapter/ on the base give the same outputs."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    merged = auto.from_pretrained(run_dir / "hf_model")
    adapted = PeftModel.from_pretrained(_tiny_model(base_dir, reward), run_dir / "hf_adapter")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])
    assert torch.allclose(_logits(merged, ids), _logits(adapted, ids), atol=1e-5)


@pytest.mark.distributed
@pytest.mark.slow
def test_lora_under_zero3_on_two_ranks_equals_one_rank_and_exports(base_dir, small_data, tmp_path):
    """2 ranks x micro-batch 2 (ZeRO-3, gathering whole blocks) and 1 rank x 4 under ZeRO-3 follow the same loss
    curve; the export gathers the partitioned base and adapters."""
    common = [o for o in _lora_run(base_dir, small_data, "train.max_steps=6") if not o.startswith("train.micro")]
    one, two = tmp_path / "one", tmp_path / "two"
    run_stage(one, *common, "train.micro_batch_size=4", "deepspeed=zero3")
    out = run_stage(two, *[o for o in common if o != "train.export=false"], "train.micro_batch_size=2",
                    "deepspeed=zero3", nproc=2).stdout
    assert "zero_stage=3 " in out and "parameters: 17,536 trained of 132,544" in out
    l1, l2 = losses(one), losses(two)
    assert sorted(l1) == sorted(l2) == list(range(1, 7))
    for step in l1:
        assert l1[step] == pytest.approx(l2[step], rel=1e-4, abs=1e-5), (step, l1[step], l2[step])
    assert l1[6] < l1[1]
    _adapter_agrees_with_merged(two, base_dir)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, Path]:
    return write_pairs_jsonl(tmp_path_factory.mktemp("pairs"), 64, 16)


@pytest.mark.distributed
@pytest.mark.slow
def test_reward_with_lora_trains_its_head_in_full_under_zero3_and_exports_a_classifier(base_dir, pairs, tmp_path):
    run_dir = tmp_path / "reward"
    train, eval_ = pairs
    out = run_stage(run_dir, *[o for o in TINY if o != "train.export=false"], f"model.name_or_path={base_dir}",
                    "peft=lora", f"data.path={train}", f"data.eval_path={eval_}", "train.max_steps=3",
                    "train.micro_batch_size=8", "deepspeed=zero3", stage="reward").stdout
    assert "trained in full: score" in out
    _adapter_agrees_with_merged(run_dir, base_dir, reward=True)
    assert (run_dir / "hf_model" / "reward_stats.json").exists()


# DPO's reference with adapters, against a separate frozen copy of the base: the policy (base + an adapter that has
# moved: lora_B drawn away from its zero init) scores a batch of pairs with its adapters off, through the task's
# reference (dpo.reference=model) and through the cached pass's (dpo.reference=cached); then a training step runs
# with the reference pass inside it. argv: base directory, pairs file, ZeRO stage.
_REFERENCE_PROBE = """
import sys, torch
from transformers import AutoModelForCausalLM
from trainer.adapters import AdaptersOff, adapters_disabled, is_adapted
from trainer.config import DataConfig, DeepSpeedConfig, DPOConfig, ModelConfig, OptimConfig, PeftConfig
from trainer.engine import build_deepspeed_config, build_engine, init_distributed, zero3_init_context
from trainer.model import build_causal_lm, load_tokenizer
from trainer.objectives import DPOTask, sequence_logps
from trainer.preference import build_preference_data, collate_pairs
from trainer.reference_logps import compute_reference_logps
from trainer.step import optimizer_step_over

base, pairs, stage = sys.argv[1], sys.argv[2], int(sys.argv[3])
info = init_distributed()
mc = ModelConfig(name_or_path=base)
tok = load_tokenizer(mc)
rows = build_preference_data(DataConfig(path=pairs, eval_path=None, max_length=64), tok, seed=0).train[:4]
def collate(r):
    return collate_pairs(r, tok.pad_token_id, response_logps=True)
batch = collate(rows)
ds = DeepSpeedConfig(stage=stage)
ds_config = build_deepspeed_config(ds, 4, 1, 1, 1.0)
torch.manual_seed(0)
with zero3_init_context(ds_config):
    model = build_causal_lm(mc, tok, torch.float32)
    from trainer.adapters import add_adapters
    model = add_adapters(model, PeftConfig(method="lora"))
for name, p in model.named_parameters():
    if "lora_B" in name:
        torch.nn.init.normal_(p, std=0.2)
engine = build_engine(model, ds, OptimConfig(), ds_config, total_steps=1)
frozen = AutoModelForCausalLM.from_pretrained(base).eval()
with torch.no_grad():
    want = sequence_logps(frozen, batch)[0]
task = DPOTask(DPOConfig(reference="model"), reference=AdaptersOff(engine))
with torch.no_grad():
    p = task.pair_logps(engine, batch)
with adapters_disabled(engine.module):
    cached = compute_reference_logps(engine, rows, collate, 4, info, desc="reference")
got = torch.cat([p.ref_chosen, p.ref_rejected])
policy = torch.cat([p.chosen, p.rejected])
result = optimizer_step_over(engine, iter([task.loss(engine, batch).loss]), 4.0, 1, "stop", where="probe")
print("ref_err", float((got - want).abs().max()), "cached_err", float((cached.reshape(-1) - want).abs().max()),
      "policy_gap", float((policy - want).abs().max()), "loss", float(result.loss_sum))
"""


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_the_reference_with_adapters_off_equals_a_separate_copy_of_the_base(base_dir, pairs, stage):
    proc = subprocess.run([sys.executable, "-c", _REFERENCE_PROBE, str(base_dir), str(pairs[0]), str(stage)], cwd=REPO,
                          env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    values = proc.stdout.split()
    measured = {k: float(v) for k, v in zip(values[-8::2], values[-7::2])}
    assert measured["ref_err"] < 1e-4 and measured["cached_err"] < 1e-4, measured
    assert measured["policy_gap"] > 1e-2, measured  # the adapter is on for the policy
    assert measured["loss"] == measured["loss"] and measured["loss"] > 0, measured


def _checkpoint_bytes(run_dir: Path) -> int:
    step = (run_dir / "checkpoints" / "latest").read_text()
    return sum(f.stat().st_size for f in (run_dir / "checkpoints" / step).rglob("*") if f.is_file())


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("zero", ["auto", "zero3"])
def test_lora_resume_reproduces_the_straight_run_from_a_checkpoint_of_the_adapters(base_dir, small_data, tmp_path,
                                                                                    zero):
    """Unpartitioned (auto on one rank) and ZeRO-3: the checkpoint leaves the frozen base out, and resuming from it
    continues the straight run's loss curve exactly."""
    common = _lora_run(base_dir, small_data, "optim.decay_steps=8", f"deepspeed={zero}")
    straight, resumed, full = tmp_path / "straight", tmp_path / "resumed", tmp_path / "full"
    run_stage(straight, *common, "train.max_steps=8")
    run_stage(resumed, *common, "train.max_steps=4")
    proc = run_stage(resumed, *common, "train.max_steps=8", "resume=auto")
    assert "resumed from" in proc.stdout
    assert_same_losses(straight, resumed, 8)

    # The same model trained in full: its checkpoint holds the model and two Adam moments of every weight. (The
    # adapters' holds the tied embedding too at stage 0: DeepSpeed leaves out frozen parameters by name, and the tied
    # lm_head.weight is not one.)
    run_stage(full, *[o for o in common if o != "peft=lora"], "train.max_steps=1")
    sizes = _checkpoint_bytes(resumed), _checkpoint_bytes(full)
    print(f"checkpoint bytes with deepspeed={zero}: lora {sizes[0]}, full {sizes[1]}")
    assert sizes[0] < sizes[1] / 3, sizes


@pytest.mark.distributed
@pytest.mark.slow
def test_an_adapter_saved_by_peft_is_a_starting_point(base_dir, small_data, tmp_path):
    """peft.init_from: an adapter saved by peft itself (lora_B moved off zero so it changes the model) is what
    training starts from; with a negligible learning rate the export is that adapter on the base."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    theirs = get_peft_model(_tiny_model(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in theirs.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    theirs.save_pretrained(tmp_path / "adapter")

    run_dir = tmp_path / "run"
    out = run_stage(run_dir, *[o for o in _lora_run(base_dir, small_data, f"peft.init_from={tmp_path / 'adapter'}",
                                                    "train.max_steps=1", "optim.lr=1e-12", "optim.warmup_steps=0")
                               if o != "train.export=false"]).stdout
    assert "peft=lora r=4 alpha=8 on q_proj, v_proj" in out
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model")
    start = PeftModel.from_pretrained(_tiny_model(base_dir), tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])
    assert torch.allclose(_logits(merged, ids), _logits(start, ids), atol=1e-5)
    assert not torch.allclose(_logits(merged, ids), _logits(_tiny_model(base_dir), ids), atol=1e-3)


def test_a_missing_init_from_adapter_names_the_key(tmp_path):
    from trainer.adapters import check_adapter_source

    with pytest.raises(ConfigError, match=r"peft\.init_from=.*: no such directory"):
        check_adapter_source(PeftConfig(method="lora", init_from=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match=r"not an adapter directory \(no adapter_config.json\)"):
        check_adapter_source(PeftConfig(method="lora", init_from=str(tmp_path)))


@pytest.mark.distributed
@pytest.mark.slow
def test_dpo_with_lora_trains_the_same_with_the_reference_per_batch_or_cached(base_dir, pairs, tmp_path):
    """dpo.reference=model with adapters builds no second model (the policy with adapters off scores each batch),
    and trains exactly as the cached pass (also adapters off) does; the loss goes down."""
    train, eval_ = pairs
    common = [*TINY, f"model.name_or_path={base_dir}", "peft=lora", f"data.path={train}", "data.eval_path=null",
              "train.max_steps=4", "train.micro_batch_size=8", "optim.lr=1e-2"]
    cached, per_batch = tmp_path / "cached", tmp_path / "model"
    run_stage(cached, *common, stage="dpo")
    run_stage(per_batch, *common, "dpo.reference=model", stage="dpo")
    assert (cached / "reference_logps.safetensors").exists() and not (per_batch / "reference_logps.safetensors").exists()
    lc, lm = losses(cached), losses(per_batch)
    assert sorted(lc) == sorted(lm) == [1, 2, 3, 4]
    for step in lc:
        assert lc[step] == pytest.approx(lm[step], rel=1e-5, abs=1e-6), (step, lc[step], lm[step])
    assert lc[1] == pytest.approx(0.6931, abs=1e-3)  # log 2: the fresh adapter changes nothing yet
    assert lc[4] < lc[1]


@pytest.mark.distributed
@pytest.mark.slow
def test_resuming_adapters_on_another_base_or_without_adapters_exits_2(base_dir, small_data, tmp_path):
    """The checkpoint holds no frozen weights, so they must come from the same model source again."""
    import shutil

    run_dir, other = tmp_path / "run", tmp_path / "other_base"
    shutil.copytree(base_dir, other)
    run_stage(run_dir, *_lora_run(base_dir, small_data, "train.max_steps=1"))
    for change in (f"model.name_or_path={other}", "peft=none"):
        overrides = [o if not o.startswith(change.split("=")[0] + "=") else change
                     for o in _lora_run(base_dir, small_data, "train.max_steps=2", "resume=auto")]
        proc = run_stage(run_dir, *overrides, check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: resume: checkpoint") and f"trains adapters on {base_dir}, this run" in last, last
