"""DPO stage: the losses on hand-computed cases, log-probs and losses against TRL's own code, the shared-prompt
gather against each sequence scored alone, real 1- and 2-process runs, resume, the reference cache, the export,
and config errors that name the key."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reports import assert_report
from runs import TINY, losses, metric, run_stage, write_pairs_jsonl
from trainer.config import DPOConfig, ModelConfig, TinyModelConfig
from trainer.objectives import PAIR_LOSSES, DPOTask, PairLogps, sequence_logps

SMALL = TinyModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=128)


def _logps(chosen, rejected, ref_chosen=(0.0,), ref_rejected=(0.0,), chosen_tokens=(1.0,), rejected_tokens=(1.0,)):
    t = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return PairLogps(t(chosen), t(rejected), t(ref_chosen), t(ref_rejected), t(chosen_tokens), t(rejected_tokens))


def _log1p_exp(x: float) -> float:
    return math.log1p(math.exp(x))  # -log sigmoid(-x)


def test_each_loss_on_hand_computed_cases():
    # log-ratios: chosen -3 - (-5) = 2, rejected -4 - (-3) = -1, so delta = 3; responses of 2 and 4 tokens.
    p = _logps([-3.0], [-4.0], [-5.0], [-3.0], [2.0], [4.0])
    beta = 0.5

    out = PAIR_LOSSES["sigmoid"](p, DPOConfig(beta=beta))
    assert out.loss.item() == pytest.approx(_log1p_exp(-1.5), rel=1e-6)  # -log sigmoid(0.5 * 3)
    assert out.chosen_reward.item() == pytest.approx(1.0) and out.rejected_reward.item() == pytest.approx(-0.5)

    cdpo = PAIR_LOSSES["sigmoid"](p, DPOConfig(beta=beta, label_smoothing=0.2)).loss.item()
    assert cdpo == pytest.approx(0.8 * _log1p_exp(-1.5) + 0.2 * _log1p_exp(1.5), rel=1e-6)

    assert PAIR_LOSSES["hinge"](p, DPOConfig(beta=beta)).loss.item() == pytest.approx(0.0)  # relu(1 - 1.5)
    assert PAIR_LOSSES["hinge"](p, DPOConfig(beta=0.1)).loss.item() == pytest.approx(0.7, rel=1e-6)

    # IPO: per-token log-ratios 2/2 - (-1)/4 = 1.25; (1.25 - 1/(2*0.5))^2 = 0.0625
    ipo = PAIR_LOSSES["ipo"](p, DPOConfig(beta=beta))
    assert ipo.loss.item() == pytest.approx(0.0625, rel=1e-6)
    assert ipo.chosen_reward.item() == pytest.approx(1.0)  # rewards stay beta * the summed log-ratio, as TRL logs

    # SimPO: no reference; averages -3/2 and -4/4, rewards 0.5 * -1.5 and 0.5 * -1;
    # -log sigmoid(0.5 * ((-1.5 + 1) - 0.3 / 0.5)) = -log sigmoid(-0.55)
    simpo = PAIR_LOSSES["simpo"](p, DPOConfig(beta=beta, loss="simpo", simpo_gamma=0.3))
    assert simpo.loss.item() == pytest.approx(_log1p_exp(0.55), rel=1e-6)
    assert simpo.chosen_reward.item() == pytest.approx(-0.75) and simpo.rejected_reward.item() == pytest.approx(-0.5)


def test_losses_push_chosen_up_and_rejected_down():
    for name in PAIR_LOSSES:
        chosen = torch.zeros(2, requires_grad=True)
        rejected = torch.zeros(2, requires_grad=True)
        zeros = torch.zeros(2)
        p = PairLogps(chosen, rejected, zeros, zeros, torch.full((2,), 3.0), torch.full((2,), 3.0))
        PAIR_LOSSES[name](p, DPOConfig(loss=name)).loss.sum().backward()
        assert torch.all(chosen.grad < 0) and torch.all(rejected.grad > 0), name


# ------------------------------------------------------------------------------------------- log-probs


@pytest.fixture(scope="module")
def tokenizer():
    from trainer.model import load_tokenizer

    return load_tokenizer(ModelConfig())


def _tiny_lm(tokenizer, seed: int):
    from transformers import LlamaForCausalLM

    from trainer.model import tiny_llama_config

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(ModelConfig(tiny=SMALL), tokenizer)).eval()


def _pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> dict:
    return {"chosen_input_ids": prompt + chosen, "rejected_input_ids": prompt + rejected, "margin": 0.0,
            "chosen_response_mask": [0] * len(prompt) + [1] * len(chosen),
            "rejected_response_mask": [0] * len(prompt) + [1] * len(rejected)}


def _alone(model, ids: list[int], mask: list[int]) -> torch.Tensor:
    """The summed log-probs of one sequence's response tokens, the sequence through the model on its own."""
    logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)  # (T, V)
    return sum(logp[j - 1, ids[j]] for j in range(1, len(ids)) if mask[j])


def test_response_logps_are_the_same_padded_packed_and_with_the_prompt_shared(tokenizer):
    """Shared-prompt rows lay a pair out as [prompt | chosen tail | rejected tail]: the first rejected token is
    predicted from the prompt's last position, not from the chosen tail's end that precedes it in the row.
    Every layout must give each sequence scored alone, and the same gradients."""
    from trainer.preference import collate_pairs

    model = _tiny_lm(tokenizer, seed=0)
    g = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(3, 500, (int(n),), generator=g).tolist()

    rows = [_pair(tokens(p), tokens(n), tokens(m)) for p, n, m in torch.randint(1, 20, (6, 3), generator=g)]
    start = tokens(3)
    rows.append(_pair(tokens(5), start + tokens(2), start + tokens(4)))  # responses share their first tokens
    rows.append(_pair(tokens(6), start, start + tokens(3)))  # the chosen response a prefix of the rejected one
    rows.append({**_pair([], tokens(4), tokens(5)), "chosen_response_mask": [0, 1, 1, 1],
                 "rejected_response_mask": [0, 0, 1, 1, 1]})  # nothing shared, prompt-less

    model.zero_grad()
    alone = torch.stack([_alone(model, r[f"{side}_input_ids"], r[f"{side}_response_mask"])
                         for side in ("chosen", "rejected") for r in rows])
    (alone[:len(rows)] - alone[len(rows):]).sum().backward()
    expected = [alone.detach(), model.model.embed_tokens.weight.grad.clone()]

    layouts = [{}, {"pack_length": 48}, {"pack_length": 48, "share_prompt": True}]
    for layout in layouts:
        batch = collate_pairs(rows, tokenizer.pad_token_id, response_logps=True, **layout)
        model.zero_grad()
        logps, counts = sequence_logps(model, batch)
        (logps[:len(rows)] - logps[len(rows):]).sum().backward()
        assert torch.allclose(logps.detach(), expected[0], atol=1e-4), (layout, logps, expected[0])
        assert torch.allclose(model.model.embed_tokens.weight.grad, expected[1], atol=1e-5), layout
        assert counts.tolist() == [sum(r[f"{s}_response_mask"][1:]) for s in ("chosen", "rejected") for r in rows]
    shared = collate_pairs(rows, tokenizer.pad_token_id, pack_length=48, share_prompt=True)
    packed = collate_pairs(rows, tokenizer.pad_token_id, pack_length=48)
    assert shared["input_ids"].numel() < packed["input_ids"].numel()  # the prompts really are laid out once


class _Engine:
    """What the reference pass needs of a DeepSpeed engine: call it, and its `module`."""

    def __init__(self, module, refuse: bool = False):
        self.module, self.refuse = module, refuse

    def __call__(self, **inputs):
        assert not self.refuse, "the cache should have been read, not recomputed"
        return self.module(**inputs)


def test_reference_cache_holds_each_pairs_logps_is_reused_and_refuses_other_pairs(tmp_path, tokenizer):
    from trainer.config import ConfigError
    from trainer.engine import DistInfo
    from trainer.preference import collate_pairs
    from trainer.reference_logps import attach_reference_logps

    model = _tiny_lm(tokenizer, seed=0)
    g = torch.Generator().manual_seed(1)
    rows = [_pair(*(torch.randint(3, 500, (int(n),), generator=g).tolist() for n in lengths))
            for lengths in torch.randint(1, 12, (5, 3), generator=g)]

    def collate(batch_rows):
        return collate_pairs(batch_rows, tokenizer.pad_token_id, pack_length=32, share_prompt=True,
                             response_logps=True)

    def fresh():
        return [{k: v for k, v in r.items() if not k.startswith("ref_")} for r in rows]

    path, info = tmp_path / "reference_logps.safetensors", DistInfo(rank=0, local_rank=0, world_size=1)
    attach_reference_logps(path, _Engine(model), {"train": rows, "eval": []}, collate, 2, info, "the start")
    with torch.no_grad():
        alone = [[float(_alone(model, r[f"{side}_input_ids"], r[f"{side}_response_mask"])) for r in rows]
                 for side in ("chosen", "rejected")]
    assert [r["ref_chosen_logp"] for r in rows] == pytest.approx(alone[0], abs=1e-4)
    assert [r["ref_rejected_logp"] for r in rows] == pytest.approx(alone[1], abs=1e-4)

    again = fresh()
    attach_reference_logps(path, _Engine(model, refuse=True), {"train": again}, collate, 2, info, "another start")
    assert [(r["ref_chosen_logp"], r["ref_rejected_logp"]) for r in again] == \
        [(r["ref_chosen_logp"], r["ref_rejected_logp"]) for r in rows]  # exactly what the first pass wrote

    changed = fresh()
    changed[3]["rejected_input_ids"] = changed[3]["rejected_input_ids"][:-1] + [7]
    with pytest.raises(ConfigError, match=r"dpo\.reference: .* other train pairs"):
        attach_reference_logps(path, _Engine(model, refuse=True), {"train": changed}, collate, 2, info, "the start")
    eval_rows = fresh()[:2]  # a split the file lacks, from a starting model other than the file's: refused
    with pytest.raises(ConfigError, match="lacks the eval pairs"):
        attach_reference_logps(path, _Engine(model), {"train": fresh(), "eval": eval_rows}, collate, 2, info,
                               "another start")


# ------------------------------------------------------------------------------------------- against TRL


@pytest.fixture(scope="module")
def trl_pairs():
    from trainer.synthetic import make_rows

    rows = make_rows("preference", "train", seed=0)[:6]
    return [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]


@pytest.fixture(scope="module")
def trl_dpo(tokenizer, trl_pairs, tmp_path_factory):
    """TRL's DPOTrainer on the pairs, with a policy and a different frozen reference (so the log-ratios are not 0)."""
    from datasets import Dataset
    from trl import DPOConfig as TRLDPOConfig
    from trl import DPOTrainer

    args = TRLDPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to="none", use_cpu=True, bf16=False,
                        per_device_train_batch_size=1, max_length=64, beta=0.1)
    return DPOTrainer(model=_tiny_lm(tokenizer, seed=0), ref_model=_tiny_lm(tokenizer, seed=1), args=args,
                      train_dataset=Dataset.from_list(trl_pairs), processing_class=tokenizer)


def _our_pairs(trl_pairs, tokenizer) -> list[dict]:
    from trainer.preference import tokenize_pair

    return [tokenize_pair(row, "auto", tokenizer, 64, "drop")[0] for row in trl_pairs]


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo"])
def test_loss_and_logps_equal_trl_dpo_trainer(loss, trl_dpo, trl_pairs, tokenizer):
    """Per pair: TRL's tokens and completion mask are ours, and its loss, log-probs and rewards equal ours
    (our log-probs from the shared-prompt packed layout, the default)."""
    from trainer.preference import collate_pairs

    ours = _our_pairs(trl_pairs, tokenizer)
    reference = trl_dpo.ref_model
    task = DPOTask(DPOConfig(beta=0.1, loss=loss), reference=reference)
    batch = collate_pairs(ours, tokenizer.pad_token_id, pack_length=64, share_prompt=True, response_logps=True)
    with torch.no_grad():
        p = task.pair_logps(trl_dpo.model, batch)
        out = task.pair_loss(p, task.cfg)
    trl_dpo.loss_types, trl_dpo.loss_weights = [loss], [1.0]
    for i, example in enumerate(trl_dpo.train_dataset):
        assert ours[i]["chosen_input_ids"] == example["prompt_ids"] + example["chosen_ids"]
        assert ours[i]["rejected_response_mask"] == [0] * len(example["prompt_ids"]) + [1] * len(example["rejected_ids"])
        mode = "train" if trl_dpo.model.training else "eval"  # where TRL files this pass's metrics
        trl_dpo._metrics[mode].clear()
        with torch.no_grad():
            trl_loss = trl_dpo._compute_loss(trl_dpo.model, trl_dpo.data_collator([example]), False)
        m = {k: v[0] for k, v in trl_dpo._metrics[mode].items()}
        assert out.loss[i].item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6), (i, loss)
        assert p.chosen[i].item() == pytest.approx(m["logps/chosen"], rel=1e-5)
        assert p.rejected[i].item() == pytest.approx(m["logps/rejected"], rel=1e-5)
        assert out.chosen_reward[i].item() == pytest.approx(m["rewards/chosen"], rel=1e-4, abs=1e-6)
        assert out.rejected_reward[i].item() == pytest.approx(m["rewards/rejected"], rel=1e-4, abs=1e-6)


def test_simpo_equals_trl_cpo_trainers_simpo(trl_dpo, trl_pairs, tokenizer):
    """SimPO as TRL's CPOTrainer computes it (loss_type="simpo", cpo_alpha=0): its own length-averaged log-probs
    (`get_batch_logps`) and its own `cpo_loss`."""
    from trl.experimental.cpo import CPOTrainer

    from trainer.preference import collate_pairs

    policy = trl_dpo.model
    ours = _our_pairs(trl_pairs, tokenizer)
    cfg = DPOConfig(beta=2.0, loss="simpo", simpo_gamma=0.5)
    sequences = [(p[f"{side}_input_ids"], p[f"{side}_response_mask"]) for side in ("chosen", "rejected") for p in ours]
    width = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), width), tokenizer.pad_token_id)  # TRL's padded layout, chosen first
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), -100)  # -100 off the response, as CPOTrainer masks
    for i, (ids, mask) in enumerate(sequences):
        input_ids[i, :len(ids)], attention_mask[i, :len(ids)] = torch.tensor(ids), 1
        labels[i, :len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask)])
    with torch.no_grad():
        batch = collate_pairs(ours, tokenizer.pad_token_id, pack_length=64, share_prompt=True, response_logps=True)
        out = PAIR_LOSSES["simpo"](DPOTask(cfg).pair_logps(policy, batch), cfg)
        logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
        avg = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
        fake_self = SimpleNamespace(alpha=0.0, beta=cfg.beta, label_smoothing=0.0, loss_type="simpo",
                                    simpo_gamma=cfg.simpo_gamma, accelerator=SimpleNamespace(device="cpu"))
        trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(fake_self, *avg.chunk(2))
    assert torch.allclose(out.loss, trl_losses, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.chosen_reward, trl_chosen, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out.rejected_reward, trl_rejected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, Path]:
    return write_pairs_jsonl(tmp_path_factory.mktemp("pairs"), 256, 32)


def _dpo_args(pairs, *extra: str) -> list[str]:
    train, eval_ = pairs
    # model=tiny: never pick up an SFT export a developer has under outputs/sft. The random init is a poor
    # policy, so a larger beta and lr make the runs move in a few steps.
    return ["model=tiny", *TINY, f"data.path={train}", f"data.eval_path={eval_}", "optim.lr=3e-3", "dpo.beta=0.5",
            "train.eval_generate_samples=0", "train.eval_at_start=false", *extra]


@pytest.mark.distributed
def test_dpo_one_and_two_process_runs_agree_and_learn(tmp_path, pairs):
    """The default stage (auto) on both: this model's training state is far under
    deepspeed.auto_partition_above_gb, so the two ranks train it unpartitioned, gradients all-reduced (the
    supervised stages' one- and two-rank ZeRO-3 runs agree in tests/test_training.py and tests/test_reward.py)."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = _dpo_args(pairs, "train.max_steps=8", "train.eval_every=8", "logger.report=true")
    run_stage(one, *common, "train.micro_batch_size=8", stage="dpo")
    out = run_stage(two, *common, "train.micro_batch_size=4", nproc=2, stage="dpo").stdout
    assert "deepspeed.stage: auto -> 0 (training state 0.0" in out and " GB, 2 ranks;" in out and "zero_stage=0 (auto)" in out
    l1, l2 = losses(one), losses(two)
    assert sorted(l1) == list(range(1, 9)) == sorted(l2)
    for step in l1:
        assert l1[step] == pytest.approx(l2[step], rel=1e-4, abs=1e-5), (step, l1[step], l2[step])
    for key in ("train/rewards/margin", "train/logps/chosen", "train/logps/rejected", "train/rewards/accuracy"):
        a, b = metric(one, key), metric(two, key)
        # At step 1 the rewards are 0 up to rounding, which the two layouts round differently: no accuracy there.
        steps = range(2 if key.endswith("accuracy") else 1, 9)
        assert all(a[s] == pytest.approx(b[s], rel=1e-4, abs=1e-5) for s in steps), (key, a, b)
    assert l1[1] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference at the first step
    assert sum(l1[s] for s in (6, 7, 8)) / 3 < math.log(2) - 0.05
    e1 = json.loads((one / "eval_metrics.json").read_text())
    e2 = json.loads((two / "eval_metrics.json").read_text())
    for key in ("eval/accuracy", "eval/loss", "eval/margin", "eval/logps/chosen", "eval/accuracy/format"):
        assert e1[key] == pytest.approx(e2[key], rel=1e-4, abs=1e-5), key
    for run in (one, two):
        assert (run / "reference_logps.safetensors").exists()
        # Written once, by rank 0, with DPO's plots from the run's metrics.
        assert_report(run, [run], {"loss", "lr", "grad_norm", "dpo_rewards", "dpo_margin", "dpo_accuracy"})


@pytest.mark.distributed
def test_dpo_resume_reproduces_the_straight_run_and_reuses_the_reference_cache(tmp_path, pairs):
    from safetensors.torch import load_file

    common = _dpo_args(pairs, "train.micro_batch_size=8", "optim.decay_steps=6", "train.eval_every=3")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_stage(straight, *common, "train.max_steps=6", stage="dpo")
    run_stage(resumed, *common, "train.max_steps=3", stage="dpo")
    cache = resumed / "reference_logps.safetensors"
    first = load_file(cache)
    mtime = cache.stat().st_mtime_ns
    proc = run_stage(resumed, *common, "train.max_steps=6", "resume=auto", stage="dpo")
    assert "read from" in proc.stdout and cache.stat().st_mtime_ns == mtime  # reused, not recomputed
    assert set(first) == {"train/chosen", "train/rejected", "eval/chosen", "eval/rejected"}
    ls, lr = losses(straight), losses(resumed)
    assert sorted(lr) == list(range(1, 7))
    for step in ls:
        assert ls[step] == pytest.approx(lr[step], rel=1e-5, abs=1e-6), (step, ls[step], lr[step])
    es, er = metric(straight, "eval/accuracy"), metric(resumed, "eval/accuracy")
    assert es == er and sorted(es) == [3, 6]


@pytest.mark.distributed
def test_frozen_reference_model_trains_like_the_cached_reference_and_exports_a_causal_lm(tmp_path, pairs):
    """Under ZeRO-3, where the frozen copy is an inference engine of its own and the export is gathered."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached, frozen = tmp_path / "cached", tmp_path / "frozen"
    common = _dpo_args(pairs, "train.max_steps=4", "train.micro_batch_size=8", "train.eval_every=4", "deepspeed=zero3")
    run_stage(cached, *common, stage="dpo")
    run_stage(frozen, *common, "dpo.reference=model", "train.export=true", stage="dpo")
    assert not (frozen / "reference_logps.safetensors").exists()
    lc, lf = losses(cached), losses(frozen)
    for step in lc:
        assert lc[step] == pytest.approx(lf[step], rel=1e-5, abs=1e-6), (step, lc[step], lf[step])

    model = AutoModelForCausalLM.from_pretrained(frozen / "hf_model").eval()
    tok = AutoTokenizer.from_pretrained(frozen / "hf_model")
    ids = tok("Add the two numbers.\n1 2 + 3 4\nAnswer:", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]


@pytest.mark.parametrize("override,key", [
    ("dpo.beta=0", "dpo.beta"),
    ("dpo.loss=kto", "dpo.loss"),
    ("dpo.label_smoothing=0.5", "dpo.label_smoothing"),
    ("dpo.loss=ipo dpo.label_smoothing=0.1", "dpo.label_smoothing"),
    ("dpo.simpo_gamma=-1", "dpo.simpo_gamma"),
    ("dpo.reference=none", "dpo.reference"),
    ("data.format=prompt_completion", "data.format"),
])
def test_bad_dpo_values_name_the_key(override, key):
    from trainer.compose import compose
    from trainer.config import ConfigError, validate

    cfg = compose("dpo", ["model=tiny", *override.split()])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_the_entry_point_exits_2_naming_the_key(tmp_path):
    proc = run_stage(tmp_path, "model=tiny", "dpo.loss=kto", stage="dpo", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "dpo.loss" in proc.stderr and "Traceback" not in proc.stderr
