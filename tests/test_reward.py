"""Reward-model stage: the Bradley-Terry math, pair metrics on known rewards, real
1- and 2-process ZeRO-3 runs, resume, export, the report, and interoperability with TRL."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from reports import assert_report
from runs import TINY, losses, run_stage, write_pairs_jsonl
from trainer.engine import DistInfo
from trainer.evaluate import pairwise_metrics
from trainer.objectives import RewardTask, bradley_terry_loss_sum


def test_bradley_terry_loss_matches_hand_computed_values():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    margin = torch.tensor([0.0, 1.0])
    expected = math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0))
    assert bradley_terry_loss_sum(chosen, rejected, margin).item() == pytest.approx(expected, rel=1e-6)
    # centering adds coef * (r_c + r_r)^2 per pair: (2 + 0)^2 + 0 = 4
    centred = bradley_terry_loss_sum(chosen, rejected, margin, center_coef=0.5).item()
    assert centred == pytest.approx(expected + 0.5 * 4.0, rel=1e-6)


def test_bradley_terry_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.zeros(3, requires_grad=True)
    rejected = torch.zeros(3, requires_grad=True)
    bradley_terry_loss_sum(chosen, rejected, torch.zeros(3)).backward()
    assert torch.all(chosen.grad < 0) and torch.all(rejected.grad > 0)
    assert torch.allclose(chosen.grad, torch.full((3,), -0.5))  # d/dx -logsigmoid(x) at 0


class KnownRewards(torch.nn.Module):
    """Scores a sequence with the reward table entry of its last real token."""

    def __init__(self, table: dict[int, float]):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask, use_cache=False):
        last = attention_mask.sum(-1) - 1
        tokens = input_ids[torch.arange(len(input_ids)), last]
        return SimpleNamespace(logits=torch.tensor([[self.table[int(t)]] for t in tokens]))


class Engine:
    def __init__(self, module):
        self.module = module

    def __call__(self, **kw):
        return self.module(**kw)


def _collate(rows):
    from trainer.preference import collate_pairs

    return collate_pairs(rows, pad_id=0)


def test_pairwise_metrics_on_known_rewards():
    # token -> reward; sequences end in that token
    engine = Engine(KnownRewards({1: 1.0, 2: 3.0, 3: -1.0, 4: 0.0}))
    rows = [
        {"chosen_input_ids": [5, 2], "rejected_input_ids": [5, 6, 1], "margin": 0.0, "kind": "a",
         "family_split": "trained", "phrasing": "seen"},  # 3 > 1 right
        {"chosen_input_ids": [3], "rejected_input_ids": [5, 4], "margin": 0.0, "kind": "a",
         "family_split": "heldout", "phrasing": "heldout"},  # -1 < 0 wrong
        {"chosen_input_ids": [5, 5, 4], "rejected_input_ids": [3], "margin": 2.0, "kind": "b"},  # 0 > -1 right
    ]
    m = pairwise_metrics(engine, rows, _collate, batch_size=2, info=DistInfo(rank=0, world_size=1, local_rank=0))
    assert m["eval/accuracy"] == pytest.approx(2 / 3)
    assert m["eval/accuracy/a"] == pytest.approx(0.5) and m["eval/accuracy/b"] == pytest.approx(1.0)
    assert m["eval/accuracy/trained_families_seen_phrasing"] == 1.0
    assert m["eval/accuracy/a/heldout_families_heldout_phrasing"] == 0.0
    assert "eval/accuracy/b/trained_families_seen_phrasing" not in m  # row 3 has no split columns
    assert m["eval/margin"] == pytest.approx((2.0 - 1.0 + 1.0) / 3)
    scores = torch.tensor([3.0, 1.0, -1.0, 0.0, 0.0, -1.0])
    assert m["eval/reward_mean"] == pytest.approx(scores.mean().item())
    assert m["eval/reward_std"] == pytest.approx(scores.std(unbiased=False).item(), rel=1e-6)
    expected_loss = bradley_terry_loss_sum(torch.tensor([3.0, -1.0, 0.0]), torch.tensor([1.0, 0.0, -1.0]),
                                           torch.tensor([0.0, 0.0, 2.0])).item() / 3
    assert m["eval/loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_reward_task_scores_chosen_and_rejected_in_one_forward():
    calls = []
    table = {1: 2.0, 2: -2.0}

    def model(**kw):
        calls.append(kw["input_ids"].shape)
        return KnownRewards(table)(**kw)

    batch = _collate([{"chosen_input_ids": [1], "rejected_input_ids": [7, 2], "margin": 0.5}])
    task = RewardTask()
    assert task.count(batch) == 1
    loss = task.loss(model, batch)
    assert len(calls) == 1 and calls[0][0] == 2
    assert loss.item() == pytest.approx(math.log1p(math.exp(-(2.0 + 2.0 - 0.5))), rel=1e-6)


def test_packed_and_prompt_sharing_pairs_score_exactly_like_padded_pairs():
    """Several sequences per row (positions restarting, scores read at each end), and pairs laid
    out once with their shared prompt, give the scores and gradients of the model's own padded
    pooling."""
    from transformers import AutoModelForSequenceClassification

    from trainer.config import ModelConfig, TinyModelConfig
    from trainer.model import load_tokenizer, tiny_llama_config
    from trainer.objectives import pair_scores
    from trainer.preference import collate_pairs

    tokenizer = load_tokenizer(ModelConfig())
    config = tiny_llama_config(ModelConfig(tiny=TinyModelConfig(hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, intermediate_size=128)), tokenizer)
    config.num_labels, config.pad_token_id = 1, tokenizer.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    g = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(3, 500, (int(n),), generator=g).tolist()

    rows = []
    for p, n, m in torch.randint(1, 25, (7, 3), generator=g):
        prompt = tokens(p)
        rows.append({"chosen_input_ids": prompt + tokens(n), "rejected_input_ids": prompt + tokens(m), "margin": 0.5})
    prompt = tokens(6)
    rows.append({"chosen_input_ids": prompt, "rejected_input_ids": prompt + tokens(3), "margin": 0.0})  # a prefix
    rows.append({"chosen_input_ids": tokens(5), "rejected_input_ids": tokens(9), "margin": 0.0})  # nothing shared

    padded = collate_pairs(rows, tokenizer.pad_token_id)
    packed = collate_pairs(rows, tokenizer.pad_token_id, pack_length=64)
    shared = collate_pairs(rows, tokenizer.pad_token_id, pack_length=64, share_prompt=True)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # really several per row
    assert (shared["input_ids"] != tokenizer.pad_token_id).sum() < (packed["input_ids"] != tokenizer.pad_token_id).sum()
    results, rows_seen = [], []  # rows the last block's MLP computes, seen inside it
    model.model.layers[-1].mlp.down_proj.register_forward_pre_hook(
        lambda _module, args: rows_seen.append(args[0].shape[:-1].numel()))
    for batch in (padded, packed, shared):
        model.zero_grad()
        chosen, rejected = pair_scores(model, batch)
        bradley_terry_loss_sum(chosen, rejected, batch["margin"]).backward()
        results.append((chosen.detach(), rejected.detach(), model.score.weight.grad.clone(),
                        model.model.embed_tokens.weight.grad.clone(),
                        model.model.layers[-1].mlp.down_proj.weight.grad.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.allclose(a, b, atol=1e-5), (a, b)
    # Padded, the model pools after running the block at every position; packed, only each sequence's last token.
    assert rows_seen == [padded["input_ids"].numel(), 2 * len(rows), 2 * len(rows)]


# ------------------------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, Path]:
    return write_pairs_jsonl(tmp_path_factory.mktemp("pairs"), 400, 48)


def _reward_args(pairs, *extra: str) -> list[str]:
    train, eval_ = pairs
    # model=tiny: never pick up an SFT export a developer has under outputs/sft.
    return ["model=tiny", *TINY, f"data.path={train}", f"data.eval_path={eval_}", "optim.lr=3e-3", *extra]


@pytest.mark.distributed
def test_reward_one_and_two_process_zero3_runs_agree_and_learn(tmp_path, pairs):
    one, two = tmp_path / "one", tmp_path / "two"
    common = _reward_args(pairs, "train.max_steps=12", "train.eval_every=12")
    # ZeRO-3 asked for on both (auto would partition neither this small model; see the SFT test of the same name).
    run_stage(one, *common, "train.micro_batch_size=8", "deepspeed=zero3", stage="reward")
    run_stage(two, *common, "train.micro_batch_size=4", "deepspeed=zero3", nproc=2, stage="reward")
    l1, l2 = losses(one), losses(two)
    assert sorted(l1) == list(range(1, 13)) == sorted(l2)
    for step in l1:
        assert l1[step] == pytest.approx(l2[step], rel=1e-4, abs=1e-5), (step, l1[step], l2[step])
    first, last = sum(l1[s] for s in (1, 2, 3)) / 3, sum(l1[s] for s in (10, 11, 12)) / 3
    assert last < first - 0.1, f"Bradley-Terry loss did not go down: {first:.3f} -> {last:.3f}"
    e1 = json.loads((one / "eval_metrics.json").read_text())
    e2 = json.loads((two / "eval_metrics.json").read_text())
    for key in ("eval/accuracy", "eval/loss", "eval/reward_mean", "eval/reward_std", "eval/accuracy/format"):
        assert e1[key] == pytest.approx(e2[key], rel=1e-4, abs=1e-5), key
    assert e1["eval/accuracy"] > 0.5
    rec = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert any("train/samples_per_s" in r for r in rec)


@pytest.mark.distributed
def test_reward_resume_reproduces_the_straight_run(tmp_path, pairs):
    common = _reward_args(pairs, "train.micro_batch_size=8", "optim.decay_steps=8", "data.eval_path=null")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_stage(straight, *common, "train.max_steps=8", stage="reward")
    run_stage(resumed, *common, "train.max_steps=4", stage="reward")
    run_stage(resumed, *common, "train.max_steps=8", "resume=auto", stage="reward")
    ls, lr = losses(straight), losses(resumed)
    assert sorted(lr) == list(range(1, 9))
    for step in ls:
        assert ls[step] == pytest.approx(lr[step], rel=1e-5, abs=1e-6), (step, ls[step], lr[step])


def _hf_scores(model_dir: Path, eval_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected scores of every eval pair from a reloaded Hugging Face directory."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from trainer.config import DataConfig
    from trainer.objectives import pair_scores
    from trainer.preference import build_preference_data, collate_pairs

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    cfg = DataConfig(path=str(eval_path), eval_path=str(eval_path), max_length=64, overlong="drop")
    rows = build_preference_data(cfg, tokenizer, seed=0).eval
    with torch.no_grad():
        chosen, rejected = pair_scores(model, collate_pairs(rows, tokenizer.pad_token_id))
    return chosen, rejected


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, pairs) -> tuple[Path, str]:
    """A run that evaluates twice and exports: its directory and what it printed."""
    run_dir = tmp_path_factory.mktemp("rm") / "run"
    proc = run_stage(run_dir, *_reward_args(pairs, "train.max_steps=10", "train.eval_every=5", "train.export=true",
                                            "train.micro_batch_size=8", "logger.report=true"), stage="reward")
    return run_dir, proc.stdout


@pytest.fixture(scope="module")
def trained_reward_model(reward_run) -> Path:
    return reward_run[0]


@pytest.mark.distributed
def test_reward_run_reports_its_plots_and_announces_its_export(reward_run, pairs):
    run_dir, stdout = reward_run
    plots = assert_report(run_dir, [run_dir], {"loss", "lr", "grad_norm", "tokens_per_s", "pairwise_accuracy",
                                               "margin", "reward_stats"})
    accuracy = {c.metric for p in plots if p.name == "pairwise_accuracy" for c in p.curves}
    groups = {k for k in json.loads((run_dir / "eval_metrics.json").read_text()) if k.startswith("eval/accuracy/")}
    kinds = {json.loads(line)["kind"] for line in pairs[1].read_text().splitlines()}
    assert accuracy == {"eval/accuracy", *groups} and {f"eval/accuracy/{k}" for k in kinds} <= groups, accuracy
    assert {c.metric for p in plots if p.name == "reward_stats" for c in p.curves} == {"eval/reward_mean",
                                                                                        "eval/reward_std"}
    assert "pairwise accuracy per split and kind" in (run_dir / "report.html").read_text().lower()
    assert re.search(r"model \(model.tiny\) built in \d+\.\d s \(attention: sdpa per packed sequence\)\n", stdout)
    assert f"exporting to {run_dir / 'hf_model'}: gathering the weights ..." in stdout
    assert re.search(rf"exported to {re.escape(str(run_dir / 'hf_model'))} in \d+\.\d s \(gather \d+\.\d s, "
                     rf"save \d+\.\d s\)", stdout), stdout


@pytest.mark.distributed
def test_reward_export_reloads_with_identical_scores(trained_reward_model, pairs):
    run_dir = trained_reward_model
    stats = json.loads((run_dir / "hf_model" / "reward_stats.json").read_text())
    evals = json.loads((run_dir / "eval_metrics.json").read_text())
    chosen, rejected = _hf_scores(run_dir / "hf_model", pairs[1])
    scores = torch.cat([chosen, rejected])
    assert stats["pairs"] == len(chosen) == 48 and stats["split"] == "eval"
    assert stats["mean"] == pytest.approx(scores.mean().item(), abs=1e-5)
    assert stats["std"] == pytest.approx(scores.std(unbiased=False).item(), rel=1e-4, abs=1e-6)
    assert stats["accuracy"] == pytest.approx((chosen > rejected).float().mean().item())
    assert evals["eval/reward_mean"] == pytest.approx(stats["mean"], abs=1e-6)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(run_dir / "hf_model")
    assert config.num_labels == 1 and config.pad_token_id is not None


def _trl_trainer(model, tokenizer, out_dir: Path, train_path: Path, eval_path: Path, max_steps: int):
    from datasets import load_dataset
    from trl import RewardConfig, RewardTrainer

    files = {"train": str(train_path), "eval": str(eval_path)}
    ds = load_dataset("json", data_files=files).select_columns(["prompt", "chosen", "rejected"])
    args = RewardConfig(
        output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        learning_rate=3e-3, report_to="none", use_cpu=True, bf16=False, activation_checkpointing=False,
        save_strategy="no", logging_steps=1, max_length=64,
    )
    return RewardTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=ds["train"],
                         eval_dataset=ds["eval"])


@pytest.mark.distributed
def test_trl_reward_trainer_evaluates_our_export_identically(trained_reward_model, pairs, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf_dir = trained_reward_model / "hf_model"
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir)
    trainer = _trl_trainer(model, AutoTokenizer.from_pretrained(hf_dir), tmp_path / "trl", *pairs, max_steps=1)
    trl_metrics = trainer.evaluate()
    ours = json.loads((hf_dir / "reward_stats.json").read_text())
    assert trl_metrics["eval_accuracy"] == pytest.approx(ours["accuracy"], abs=1e-6)
    assert trl_metrics["eval_mean_reward"] == pytest.approx(ours["mean"], abs=1e-4)


@pytest.mark.distributed
def test_a_trl_reward_trainer_output_trains_here(tmp_path, pairs):
    """TRL trains and saves a reward model; our stage loads it (backbone and head, not a
    fresh head) and, at a negligible learning rate, scores the eval pairs as TRL did."""
    from transformers import AutoModelForSequenceClassification

    from trainer.config import ModelConfig, TinyModelConfig
    from trainer.model import load_tokenizer, tiny_llama_config

    tokenizer = load_tokenizer(ModelConfig())
    config = tiny_llama_config(ModelConfig(tiny=TinyModelConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128)), tokenizer)
    config.num_labels = 1
    torch.manual_seed(0)
    trainer = _trl_trainer(AutoModelForSequenceClassification.from_config(config), tokenizer, tmp_path / "trl",
                           *pairs, max_steps=10)
    trainer.train()
    trl_dir = tmp_path / "trl_model"
    trainer.save_model(str(trl_dir))
    tokenizer.save_pretrained(str(trl_dir))
    trl_eval = trainer.evaluate()

    run_dir = tmp_path / "ours"
    args = _reward_args(pairs, f"model.name_or_path={trl_dir}", "optim.lr=1e-12", "train.max_steps=1",
                        "train.eval_every=1", "train.micro_batch_size=8", "optim.warmup_steps=0")
    args.remove("model=tiny")
    run_stage(run_dir, *args, stage="reward")
    ours = json.loads((run_dir / "eval_metrics.json").read_text())
    assert ours["eval/accuracy"] == pytest.approx(trl_eval["eval_accuracy"], abs=1e-6)
    assert ours["eval/reward_mean"] == pytest.approx(trl_eval["eval_mean_reward"], abs=1e-4)

