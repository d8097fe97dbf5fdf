"""Real training runs through the entry points: 1 and 2 ZeRO-3 processes (gloo),
rank equivalence, exact resume, preemption, non-finite handling, HF export."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reports import assert_report
from runs import REPO, TINY, assert_same_losses, losses, metric, run_env, run_stage, signal_when, write_sft_jsonl


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return write_sft_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", 600)


@pytest.mark.distributed
def test_one_and_two_process_zero3_runs_train_and_agree(tmp_path, small_data):
    """2 ranks x micro-batch 2 and 1 rank x micro-batch 4 see the same global batches
    and must produce the same loss curve; both runs actually learn. Both ask for ZeRO-3: auto would
    train this small model unpartitioned (from another random init: zero.Init draws the weights in
    another order), which tests/test_dpo.py's test of the same kind covers."""
    common = [*TINY, f"data.path={small_data}", "data.eval_path=null", "train.max_steps=8", "optim.lr=3e-3"]
    one = tmp_path / "one"
    two = tmp_path / "two"
    assert "zero_stage=3 " in run_stage(one, *common, "train.micro_batch_size=4", "deepspeed=zero3").stdout
    assert "zero_stage=3 " in run_stage(two, *common, "train.micro_batch_size=2", "deepspeed=zero3", nproc=2).stdout

    l1, l2 = losses(one), losses(two)
    assert sorted(l1) == list(range(1, 9)) == sorted(l2)
    for step in l1:
        assert l1[step] == pytest.approx(l2[step], rel=1e-4, abs=1e-5), (step, l1[step], l2[step])
    assert l1[8] < l1[1] - 0.5, "loss did not go down"

    # One run directory for both ranks; only rank 0 wrote logs and configs.
    assert (two / "metrics.jsonl").exists() and (two / "config.yaml").exists()
    assert json.loads((two / "train_state.json").read_text())["world_size"] == 2
    ckpt = two / "checkpoints" / "step_00000008"
    assert (ckpt / "COMPLETE").exists()
    assert {p.name for p in ckpt.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    ds = json.loads((two / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 4


# Builds a ZeRO-3 engine in a fresh process and says which F.linear it left: after the build, inside
# `torch_linear()`, and after that.
_LINEAR_PROBE = """
import sys, torch
from trainer.config import DeepSpeedConfig, ModelConfig, OptimConfig
from trainer.engine import build_deepspeed_config, build_engine, init_distributed, torch_linear, zero3_init_context
from trainer.model import build_causal_lm, load_tokenizer
init_distributed()
plain = torch.nn.functional.linear
ds = DeepSpeedConfig(stage=3, memory_efficient_linear=sys.argv[1] == "true")
ds_config = build_deepspeed_config(ds, 2, 1, 1, 1.0)
with zero3_init_context(ds_config):
    model = build_causal_lm(ModelConfig(), load_tokenizer(ModelConfig()), torch.float32)
build_engine(model, ds, OptimConfig(), ds_config, total_steps=1)
seen = [torch.nn.functional.linear is plain]
with torch_linear():
    seen.append(torch.nn.functional.linear is plain)
seen.append(torch.nn.functional.linear is plain)
print(" ".join("plain" if s else "wrapped" for s in seen))
"""


@pytest.mark.parametrize("memory_efficient_linear,seen", [("true", "wrapped plain wrapped"),
                                                          ("false", "plain plain plain")])
def test_torch_linear_undoes_zero3s_process_wide_linear_wrapper_for_a_while(memory_efficient_linear, seen):
    """ZeRO-3's memory-efficient Linear replaces torch's F.linear in the whole process (DeepSpeed's default);
    PPO's gradient-free passes (the policy's plain generation replica among them) run inside
    `torch_linear()`, which hands torch's op back and restores the wrapper for training."""
    proc = subprocess.run([sys.executable, "-c", _LINEAR_PROBE, memory_efficient_linear], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == seen


def test_forming_the_cpu_process_group_compiles_nothing(tmp_path):
    """DeepSpeed's CPU backend would JIT-compile its inference all-reduce op as the group forms (minutes on this
    machine, once per environment, and a ninja check in every process after); training never calls it."""
    probe = ("from trainer.engine import init_distributed; init_distributed(); "
             "import deepspeed.comm.comm as c; print('op', c.cdb.shm_comm_op)")
    extensions = tmp_path / "torch_extensions"
    env = {**run_env(), "TORCH_EXTENSIONS_DIR": str(extensions)}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "op None" in proc.stdout
    assert not extensions.exists() or not any(extensions.iterdir())


def gradient_buffer_ranks(tmp_path: Path, ranks: int) -> tuple[dict, str]:
    """tests/gradient_buffer_ranks.py under `launch.torchrun` on `ranks` ranks: its results and its output."""
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "launch.torchrun", "--standalone", f"--nproc_per_node={ranks}",
                           "tests/gradient_buffer_ranks.py", str(out)], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.distributed
def test_two_unpartitioned_ranks_average_gradients_in_one_buffer_exactly_as_deepspeed_does(tmp_path):
    """`trainer.engine.gradients_in_one_buffer` and `clipping_that_keeps_its_norm`: two steps on 2 ranks at stage 0
    (different data per rank, two micro-batches per step, a parameter with no gradient) leave every weight bit for
    bit where DeepSpeed's own stage-0 averaging and clipping leave it, with a clip that bites and one that does not,
    averaged in the memory the two ranks share (`trainer.shared_rows`, as on one host) and by all-reduce (as where
    they share none), every gradient a view of the one buffer throughout, and the norm the clipping kept is the one
    reported."""
    results, _ = gradient_buffer_ranks(tmp_path, 2)
    assert results.pop("left behind") == [] and len(results) == 4
    for case, result in results.items():
        assert result["buffered"] and result["bound"] and result["kept_norm"], case
        assert result["rows"] == (2 if case.endswith("shared") else 1), case  # both ranks' rows in one mapping
        assert result["equal"], (case, result["max_diff"])
        assert result["moved"] >= 4, "the trained weights moved"
        assert result["norms"] == pytest.approx(result["reference_norms"], rel=1e-5) and len(result["norms"]) == 2
    for how in ("shared", "all-reduce"):
        assert min(results[f"0.05 {how}"]["norms"]) > 0.05, "the small clip bites"
        assert max(results[f"1000000.0 {how}"]["norms"]) < 1e6


@pytest.mark.distributed
def test_one_unpartitioned_rank_keeps_its_gradients_in_one_buffer_exactly_as_deepspeed_does(tmp_path):
    """One rank at stage 0 (a PPO critic, a single-process SFT run): the gradients live in one buffer made once
    (no flat copy and copy back per step, nothing freed and faulted in again) and the weights end bit for bit
    where DeepSpeed's own engine leaves them, with a clip that bites and one that does not."""
    results, stdout = gradient_buffer_ranks(tmp_path, 1)
    assert results.pop("left behind") == [] and sorted(results) == ["0.05 one rank", "1000000.0 one rank"]
    for case, result in results.items():
        assert result["buffered"] and result["bound"] and result["rows"] == 1 and result["kept_norm"], case
        assert result["equal"], (case, result["max_diff"])
        assert result["moved"] >= 4, "the trained weights moved"
        assert result["norms"] == pytest.approx(result["reference_norms"], rel=1e-5) and len(result["norms"]) == 2
    assert min(results["0.05 one rank"]["norms"]) > 0.05, "the small clip bites"
    assert "gradients averaged" not in stdout, "one rank has nothing to average, and says nothing of it"


def test_shared_rows_are_allocated_up_front_or_say_why_not(tmp_path, monkeypatch):
    """The file behind the ranks' shared memory is allocated whole when made (so a full /dev/shm is a reason to
    all-reduce instead, not a bus error later), and a machine without /dev/shm gets a reason."""
    from trainer import shared_rows

    monkeypatch.setattr(shared_rows, "SHM_DIR", str(tmp_path))
    path, why_not = shared_rows._create(3 << 20)
    assert why_not is None and Path(path).parent == tmp_path and os.stat(path).st_blocks * 512 >= 3 << 20
    monkeypatch.setattr(shared_rows, "SHM_DIR", str(tmp_path / "absent"))
    assert shared_rows._create(1024) == [None, f"no {tmp_path / 'absent'}"]


@pytest.mark.distributed
def test_gradient_accumulation_matches_a_bigger_micro_batch(tmp_path, small_data):
    common = [*TINY, f"data.path={small_data}", "data.eval_path=null", "train.max_steps=4"]
    big, accum = tmp_path / "big", tmp_path / "accum"
    run_stage(big, *common, "train.micro_batch_size=4")
    run_stage(accum, *common, "train.micro_batch_size=2", "train.grad_accum=2")
    lb, la = losses(big), losses(accum)
    for step in lb:
        assert lb[step] == pytest.approx(la[step], rel=1e-4, abs=1e-5)
    # One rank trains at stage 0 (deepspeed.stage=auto), where DeepSpeed keeps no gradient norm: ours is
    # taken at the accumulation boundary, over both micro-batches' gradients.
    nb, na = metric(big, "train/grad_norm"), metric(accum, "train/grad_norm")
    assert sorted(nb) == sorted(na) == [1, 2, 3, 4]
    for step in nb:
        assert nb[step] > 0 and nb[step] == pytest.approx(na[step], rel=1e-4), (step, nb[step], na[step])


def test_epochs_and_a_warmup_ratio_set_the_run_length_and_warmup_from_the_data_and_say_what_they_became(tmp_path):
    data = write_sft_jsonl(tmp_path / "sft.jsonl", 40)
    run = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("optim.warmup_steps=")]  # a ratio beside warmup_steps is an error
    proc = run_stage(run, *tiny, f"data.path={data}", "data.eval_path=null", "data.packing=false",
                     "train.micro_batch_size=4", "train.epochs=1.5", "optim.warmup_ratio=0.2")
    assert "train.max_steps: train.epochs=1.5 -> 15 (40 training sequences, global batch 4)" in proc.stdout
    assert "optim.warmup_steps: optim.warmup_ratio=0.2 -> 3 (of the schedule's 15 optimizer steps)" in proc.stdout
    assert "warning: optim.warmup_steps=" not in proc.stdout  # 3 warmup steps fit
    assert "warning: the longest training sequence" not in proc.stdout
    epochs = metric(run, "train/epoch")
    assert sorted(epochs) == list(range(1, 16)) and epochs[15] == pytest.approx(1.5)
    lr = metric(run, "train/lr")  # the rate of the next step: 1/3, 2/3, then all of optim.lr's 3e-3 at step 3
    assert lr[1] == pytest.approx(2e-3) and lr[2] == pytest.approx(3e-3) and max(lr.values()) == lr[2]


def test_examples_longer_than_the_models_positions_are_warned_of(tmp_path):
    data = write_sft_jsonl(tmp_path / "sft.jsonl", 40)
    proc = run_stage(tmp_path / "run", *TINY, f"data.path={data}", "data.eval_path=null", "train.max_steps=1",
                     "train.micro_batch_size=2", "model.tiny.max_position_embeddings=8")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("warning: the longest training sequence has "))
    longest = int(line.split(" has ")[1].split()[0])
    assert longest > 8 and line.endswith("more than the model's 8 (max_position_embeddings): a model with learned "
                                         "position embeddings fails on it, a rotary one runs past its trained context; "
                                         "set data.max_length=8 or shorten the examples")


@pytest.mark.distributed
def test_resume_reproduces_the_straight_run(tmp_path, small_data):
    # ZeRO-3 asked for explicitly on one rank (auto would train unpartitioned there; the reward
    # stage's resume test covers that): its partitioned checkpoint must resume exactly.
    common = [*TINY, f"data.path={small_data}", "data.eval_path=null", "train.micro_batch_size=4", "optim.decay_steps=10",
              "deepspeed=zero3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_stage(straight, *common, "train.max_steps=10")
    run_stage(resumed, *common, "train.max_steps=5")
    assert (resumed / "checkpoints" / "latest").read_text() == "step_00000005"
    proc = run_stage(resumed, *common, "train.max_steps=10", "resume=auto")
    assert "resumed from" in proc.stdout

    assert_same_losses(straight, resumed, 10)


@pytest.mark.distributed
def test_preemption_saves_and_resumes(tmp_path, small_data):
    run_dir = tmp_path / "pre"
    cmd = [sys.executable, "-m", "trainer.sft", *TINY, f"data.path={small_data}", "data.eval_path=null",
           "train.max_steps=100000", "train.micro_batch_size=4", "logger.report=true", f"hydra.run.dir={run_dir}"]
    metrics = run_dir / "metrics.jsonl"
    proc = signal_when(cmd, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, signal.SIGTERM)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 75, err[-3000:]
    tag = (run_dir / "checkpoints" / "latest").read_text()
    stopped_at = int(tag.split("_")[1])
    assert stopped_at >= 3 and (run_dir / "checkpoints" / tag / "COMPLETE").exists()
    assert "resume=auto" in out
    assert (run_dir / "report.html").exists() and f"report: {run_dir / 'report.html'}" in out  # the curves so far

    run_stage(run_dir, *TINY, f"data.path={small_data}", "data.eval_path=null",
              f"train.max_steps={stopped_at + 2}", "optim.decay_steps=100000", "train.micro_batch_size=4", "resume=auto")
    assert max(losses(run_dir)) == stopped_at + 2


@pytest.mark.distributed
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, small_data):
    run_dir = tmp_path / "nan"
    proc = run_stage(run_dir, *TINY, f"data.path={small_data}", "data.eval_path=null", "train.micro_batch_size=4",
                     "train.max_steps=50", "train.save_every=1", "train.keep_last=1", "optim.warmup_steps=0",
                     "optim.lr=1e12", "optim.max_grad_norm=0", "train.nonfinite=stop", check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: step ") and "non-finite" in last_line
    tag = (run_dir / "checkpoints" / "latest").read_text()
    assert (run_dir / "checkpoints" / tag / "COMPLETE").exists()


@pytest.mark.distributed
def test_non_finite_losses_are_skipped_and_counted_then_stop(tmp_path, small_data):
    """A diverged model keeps producing non-finite losses: each is skipped without an
    update until train.max_nonfinite_skips is exceeded."""
    run_dir = tmp_path / "skip"
    proc = run_stage(run_dir, *TINY, f"data.path={small_data}", "data.eval_path=null", "train.micro_batch_size=4",
                     "train.max_steps=50", "optim.warmup_steps=0", "optim.lr=1e12", "optim.max_grad_norm=0",
                     "train.nonfinite=skip", "train.max_nonfinite_skips=2", check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "3 non-finite losses skipped, more than train.max_nonfinite_skips=2" in proc.stderr


@pytest.mark.distributed
def test_gradient_checkpointing_gives_the_same_training(tmp_path, small_data):
    common = [*TINY, f"data.path={small_data}", "data.eval_path=null", "train.max_steps=3", "train.micro_batch_size=4"]
    plain, ckpt = tmp_path / "plain", tmp_path / "gc"
    run_stage(plain, *common)
    run_stage(ckpt, *common, "model.gradient_checkpointing=true")
    lp, lc = losses(plain), losses(ckpt)
    for step in lp:
        assert lp[step] == pytest.approx(lc[step], rel=1e-5, abs=1e-6)


@pytest.mark.distributed
def test_hf_export_reloads_with_the_trained_weights(tmp_path, small_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "export"
    # ZeRO-3 asked for on one rank: the export consolidates partitioned weights (the reward stage's export
    # test covers the unpartitioned path that deepspeed.stage=auto takes on one rank).
    run_stage(run_dir, *[o for o in TINY if o != "train.export=false"], f"data.path={small_data}",
              "data.eval_path=null", "train.max_steps=3", "train.micro_batch_size=4", "deepspeed=zero3")
    export = run_dir / "hf_model"
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    tok = AutoTokenizer.from_pretrained(export)

    # The engine's own fp32 master weights, consolidated from the ZeRO-3 checkpoint.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"), tag="step_00000003")
    reference = AutoModelForCausalLM.from_config(model.config).eval()
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)
    reference.tie_weights()

    ids = tok("What is 1 2 + 3 4 ?", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-6)
        out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]


def test_scrub_secrets_redacts_nested_secret_keys():
    from trainer.metrics import scrub_secrets

    cfg = {"logger": {"project": "p", "api_key": "x"}, "extra": [{"hf_token": "y", "lr": 1}], "seed": 1}
    assert scrub_secrets(cfg) == {
        "logger": {"project": "p", "api_key": "<redacted>"},
        "extra": [{"hf_token": "<redacted>", "lr": 1}],
        "seed": 1,
    }


@pytest.mark.distributed
def test_eval_reports_loss_and_exact_match_per_family(tmp_path, small_data):
    run_dir = tmp_path / "eval"
    overrides = [o for o in TINY if o != "train.eval_every=0"]
    run_stage(run_dir, *overrides, f"data.path={small_data}", "data.eval_path=synthetic:sft", "train.max_steps=2",
              "train.micro_batch_size=4", "train.eval_every=2", "train.eval_generate_samples=60",
              "train.eval_max_new_tokens=4", "logger.report=true")
    metrics = json.loads((run_dir / "eval_metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["eval/loss"] > 0
    assert 0.0 <= metrics["eval/exact_match"] <= 1.0
    assert any(k.startswith("eval/em/") for k in metrics)
    assert any(k.startswith("eval/em_split/") for k in metrics)
    # The run's report: every SFT plot, drawn from these metrics.
    assert_report(run_dir, [run_dir], {"loss", "lr", "grad_norm", "tokens_per_s", "exact_match_family",
                                       "exact_match_split"})
    assert "exact match per family" in (run_dir / "report.html").read_text().lower()
    # The evaluation's sample generations without W&B, as PPO writes them.
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(set(s) == {"step", "prompt", "answer", "generated", "match"} and s["step"] == 2
                           for s in samples)


def test_zero3_gathers_each_transformer_block_as_one_unit():
    """stage3_gather_per_block marks exactly the model's `_no_split_modules` as ZeRO-3 leaves."""
    from deepspeed.utils import z3_leaf_module
    from transformers import AutoModelForCausalLM

    from trainer.config import ModelConfig, TinyModelConfig
    from trainer.engine import gather_per_block
    from trainer.model import load_tokenizer, tiny_llama_config

    tokenizer = load_tokenizer(ModelConfig())
    model = AutoModelForCausalLM.from_config(tiny_llama_config(ModelConfig(tiny=TinyModelConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128)),
        tokenizer))
    gather_per_block(model)
    leaves = [name for name, m in model.named_modules() if z3_leaf_module(m)]
    assert leaves == ["model.layers.0", "model.layers.1"]


@pytest.mark.parametrize("tokens,checkpointing", [([], False), ([1, 2], False), ([], True)])
def test_the_loss_from_trained_positions_only_equals_the_full_logits_loss(tokens, checkpointing):
    """CausalLMTask computes the output head, and the last block's MLP, only where a trained token is predicted:
    the same summed cross-entropy and gradients as from every position's logits (`token_nll_sum`), also with peft's
    trained tokens wrapping the tied head. Under gradient checkpointing, which runs the block again in backward,
    the MLP runs whole."""
    from trainer.adapters import add_adapters
    from trainer.compose import compose
    from trainer.config import PeftConfig
    from trainer.model import build_causal_lm, load_tokenizer
    from trainer.objectives import IGNORE_INDEX, CausalLMTask, token_nll_sum

    cfg = compose("sft", [*TINY[:5], f"model.gradient_checkpointing={str(checkpointing).lower()}"])
    torch.manual_seed(0)
    model = build_causal_lm(cfg.model, load_tokenizer(cfg.model), torch.float32)
    if tokens:
        model = add_adapters(model, PeftConfig(method="lora"), token_ids=tokens)
    ids = torch.randint(3, 500, (2, 12))
    labels = ids.clone()
    labels[0, :5] = labels[1, :3] = labels[1, 9:] = IGNORE_INDEX  # prompts and a packed row's untrained tail
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(12).repeat(2, 1)}
    trained = [p for p in model.parameters() if p.requires_grad]
    rows_seen = []  # by the last block's MLP, inside it (the hooks on the MLP itself change what it gets)
    model.get_decoder().layers[-1].mlp.down_proj.register_forward_pre_hook(
        lambda _module, args: rows_seen.append(args[0].shape[:-1].numel()))

    loss = CausalLMTask().loss(model, batch)
    # 7 + 6 trained tokens (labels 5-11 and 3-8), each predicted from the position before it; 2 x 12 positions.
    assert rows_seen == ([24] if checkpointing else [13])
    grads = torch.autograd.grad(loss, trained)
    reference = token_nll_sum(model(input_ids=ids, position_ids=batch["position_ids"], use_cache=False).logits, labels)
    expected = torch.autograd.grad(reference, trained)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for g, e in zip(grads, expected):
        assert torch.allclose(g, e, atol=1e-6, rtol=1e-5)
