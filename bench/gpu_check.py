"""GPU checks on one CUDA device: the same CLI as on CPU, now on NCCL + bf16, at real model size.

    python -m bench.gpu_check --out DIR            # everything below, ~5 min on one H100/H200
    python -m bench.gpu_check --out DIR --smoke    # tiny sizes, a few steps (checks this script on CPU)
    python -m bench.gpu_check --out DIR --ppo      # only the PPO phase breakdown (4), ~7 min on one H100

1. environment: torch/CUDA/NCCL versions, the process group's backend, a measured bf16 matmul rate;
2. the tiny default SFT run on the GPU (bf16 + NCCL, ZeRO-3): loss falls, exact match reported;
3. a random-init Llama-3.2-1B-shaped model (1.24B parameters, vocab 128256) saved as a Hugging Face
   directory and trained from it (the `model=hf` path users take): SFT with ZeRO-3 and ZeRO-0, and the
   reward stage with ZeRO-3, packed rows, bf16, no activation checkpointing;
   tokens/s and MFU = 6 * parameters * real tokens/s / peak (989 TFLOP/s, the H100/H200 SXM dense bf16 figure);
4. (--ppo) `rlhf.ppo` with all four roles at that shape on the one GPU (cluster.colocate=all), 128 rollouts of
   128 new tokens per iteration: the phase breakdown with the policy unpartitioned (the default on one rank)
   and under ZeRO-3 generating through a replica or through the engine.

Every stage is its own `python -m trainer.<stage>` / `rlhf.ppo` process; throughput is the median of the logged
windows after the first (PPO: of the iterations after the first two). Results go to DIR/gpu_check.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "trainer" / "assets" / "tokenizer"
PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16 (datasheet)

LLAMA_1B = dict(  # meta-llama/Llama-3.2-1B's shape
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
    tie_word_embeddings=True,
)
SMOKE_MODEL = dict(LLAMA_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=4096)


def environment() -> dict:
    import torch
    import torch.distributed as dist

    from trainer.engine import init_distributed, resolve_precision

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    init_distributed()
    info["backend"] = dist.get_backend()
    info["precision_auto"] = resolve_precision("auto")
    t = torch.ones(4, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(t)
    info["all_reduce_ok"] = bool(t.sum().item() == 4)
    dist.destroy_process_group()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        torch.cuda.synchronize()
        info["matmul_bf16_tflops"] = 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12
    import deepspeed
    import transformers

    info["deepspeed"], info["transformers"] = deepspeed.__version__, transformers.__version__
    return info


def make_model_dir(path: Path, shape: dict, reward_head: bool = False) -> int:
    """A random-init Llama saved as a Hugging Face directory (a causal LM, or with `reward_head` a one-label
    sequence classifier, what `trainer.reward` exports); returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig

    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0, num_labels=1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    auto = AutoModelForSequenceClassification if reward_head else AutoModelForCausalLM
    with torch.device(dev):
        model = auto.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def launch(name: str, module: str, overrides: list[str], out: Path, timeout: int) -> tuple[dict, list[dict]]:
    """Run `python -m module overrides` into out/runs/name; (result with rc and wall_s, its metrics records)."""
    run_dir = out / "runs" / name
    cmd = [sys.executable, "-m", module, *overrides, f"hydra.run.dir={run_dir}"]
    print(f"\n=== {name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    log = out / f"{name}.log"  # written as it runs, so a run that times out still shows where it was
    try:
        with open(log, "w") as f:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    result = {"name": name, "rc": rc, "wall_s": time.time() - t0}
    if rc != 0:
        print(log.read_text()[-3000:], flush=True)
        return result, []
    return result, [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_stage(name: str, stage: str, overrides: list[str], out: Path, timeout: int) -> dict:
    result, records = launch(name, f"trainer.{stage}", overrides, out, timeout)
    if not records:
        return result
    run_dir = out / "runs" / name
    train = [r for r in records if "train/tokens_per_s" in r]
    steady = train[1:] or train
    result.update(
        first_loss=train[0]["train/loss"], last_loss=train[-1]["train/loss"],
        tokens_per_s=statistics.median(r["train/tokens_per_s"] for r in steady),
        samples_per_s=statistics.median(r["train/samples_per_s"] for r in steady),
        step_time_s=statistics.median(r["train/step_time_s"] for r in steady),
        memory_gb=max(r["system/memory_gb"] for r in train),
        eval={k: v for r in records for k, v in r.items() if k.startswith("eval/") and isinstance(v, float)},
        precision="bf16" if json.loads((run_dir / "deepspeed_config.json").read_text())["bf16"]["enabled"] else "fp32",
    )
    return result


def print_table(columns: list[str], runs: list[dict], done_key: str, cells) -> None:
    """A markdown table on stdout: each run's name and rc, then `cells(run)` where it finished (has done_key)."""
    print("\n| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in runs:
        rest = cells(r) if done_key in r else [""] * (len(columns) - 2)
        print("| " + " | ".join([r["name"], str(r["rc"]), *rest]) + " |")


PPO_WARMUP = 2  # iterations left out of the medians (CUDA warm-up, allocator growth)
PPO_TIMES = ("generate_s", "forward_s", "train_s", "iteration_s")


def run_ppo(name: str, overrides: list[str], out: Path, timeout: int) -> dict:
    """One `python -m rlhf.ppo` run: medians of its phase times after the warm-up iterations."""
    result, records = launch(name, "rlhf.ppo", overrides, out, timeout)
    iters = [r for r in records if "time/iteration_s" in r]
    if not iters:
        return result
    steady = iters[PPO_WARMUP:] or iters

    def median(key: str) -> float:
        return statistics.median(r[key] for r in steady)

    rollouts = round(median("throughput/rollouts_per_s") * median("time/iteration_s"))
    result.update({k: median(f"time/{k}") for k in PPO_TIMES})
    result.update(
        iterations=len(iters), rollouts=rollouts, rollouts_per_s=median("throughput/rollouts_per_s"),
        response_tokens=median("response/length_mean"),
        generated_tokens_per_s=median("response/length_mean") * rollouts / median("time/generate_s"),
        replica_refresh_s=median("policy/replica_refresh_s"),
        policy_memory_gb=max(r["policy/memory_gb"] for r in iters),
        critic_memory_gb=max(r["critic/memory_gb"] for r in iters),
        kl_first_last=(iters[0]["kl/seq_mean"], iters[-1]["kl/seq_mean"]),
        policy_precision=(re.findall(r"policy: (\w+),", (out / f"{name}.log").read_text()) or ["?"])[0],
    )
    return result


def ppo_checks(args, out: Path, report: dict, save) -> None:
    """PPO with all four roles at the 1B shape on one GPU (colocate=all: fractional shares of the device),
    the policy unpartitioned (the default, auto on one rank) and under ZeRO-3 with either generation mode."""
    shape = SMOKE_MODEL if args.smoke else LLAMA_1B
    policy_dir, reward_dir = Path("/tmp/gpu_check_ppo_policy"), Path("/tmp/gpu_check_ppo_reward")
    params = {"policy": make_model_dir(policy_dir, shape), "reward": make_model_dir(reward_dir, shape, reward_head=True)}
    report["ppo_models"] = params
    size = (["rollout.prompts_per_iteration=16", "rollout.max_new_tokens=8", "train.iterations=3",
             "train.eval_prompts=8", "algo.mini_batch_size=8"] if args.smoke else
            ["rollout.prompts_per_iteration=128", f"rollout.max_new_tokens={args.ppo_new_tokens}",
             f"train.iterations={args.ppo_iterations}", "train.eval_prompts=64", "algo.mini_batch_size=32"])
    common = [f"{role}.model.{key}={value}" for role, path in (("actor", policy_dir), ("reference", policy_dir),
                                                               ("critic", reward_dir), ("reward", reward_dir))
              for key, value in (("name_or_path", path), ("tokenizer", TOKENIZER))]
    common += ["actor.devices_per_node=1", "cluster.colocate=all", "train.eval_every=0", "train.save_every=-1",
               "train.samples_every=0", *size]
    checks = [
        ("ppo-1b", []),  # auto: stage 0 on the one rank, the engine's module generates
        ("ppo-1b-zero3-replica", ["actor.deepspeed.stage=3", "rollout.generation=replica"]),
        ("ppo-1b-zero3-generate", ["actor.deepspeed.stage=3", "rollout.generation=zero3"]),
    ]
    for name, extra in checks:
        if name in args.skip:
            continue
        report["ppo_runs"].append(run_ppo(name, common + extra, out, timeout=args.ppo_timeout))
        save()
    print_table(["PPO check", "rc", "policy", "rollouts/s", "generate / score / train / iteration s", "generated tok/s",
                 "replica refresh s", "policy / critic peak GB", "wall s"], report["ppo_runs"], "rollouts_per_s",
                lambda r: [r["policy_precision"], f"{r['rollouts_per_s']:.1f}",
                           " / ".join(f"{r[k]:.2f}" for k in PPO_TIMES), f"{r['generated_tokens_per_s']:,.0f}",
                           f"{r['replica_refresh_s']:.3f}",
                           f"{r['policy_memory_gb']:.1f} / {r['critic_memory_gb']:.1f}", f"{r['wall_s']:.0f}"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and few steps (to test this script)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", nargs="*", default=[], help="names of checks to skip")
    parser.add_argument("--ppo", action="store_true", help="only the PPO checks")
    parser.add_argument("--ppo-iterations", type=int, default=6)
    parser.add_argument("--ppo-new-tokens", type=int, default=128)
    parser.add_argument("--ppo-timeout", type=int, default=200)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"environment": environment(), "runs": [], "ppo_runs": []}
    print(json.dumps(report["environment"], indent=1), flush=True)

    def save():
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))

    save()
    if args.ppo:
        ppo_checks(args, out, report, save)
        return
    steps = 4 if args.smoke else args.steps
    tiny_steps = 20 if args.smoke else 200
    if "tiny-sft" not in args.skip:
        report["runs"].append(run_stage("tiny-sft", "sft", [
            f"train.max_steps={tiny_steps}", f"train.eval_every={tiny_steps}", f"train.save_every={tiny_steps}",
            "train.eval_generate_samples=100",
        ], out, timeout=240))
        save()

    model_dir = Path("/tmp/gpu_check_model")
    t0 = time.time()
    params = make_model_dir(model_dir, SMOKE_MODEL if args.smoke else LLAMA_1B)
    report["model"] = {"shape": "smoke" if args.smoke else "Llama-3.2-1B", "parameters": params,
                       "build_and_save_s": time.time() - t0}
    print(f"model: {params / 1e9:.3f}B parameters", flush=True)
    big = [
        "model=hf", f"model.name_or_path={model_dir}", f"model.tokenizer={TOKENIZER}",
        "model.gradient_checkpointing=false", "data.eval_path=null", f"train.max_steps={steps}",
        "train.save_every=0", "train.export=false", "logger.log_every=5" if not args.smoke else "logger.log_every=1",
        "optim.warmup_steps=5", "optim.lr=1e-4",
    ]
    sft_size = ["data.max_length=2048", "train.micro_batch_size=8"] if not args.smoke else ["data.max_length=256", "train.micro_batch_size=2"]
    reward_size = ["data.max_length=2048", "train.micro_batch_size=256"] if not args.smoke else ["data.max_length=256", "train.micro_batch_size=8"]
    checks = [
        ("1b-sft-zero3", "sft", big + sft_size + ["deepspeed=zero3"]),
        ("1b-sft-zero0", "sft", big + sft_size + ["deepspeed=zero0"]),
        ("1b-reward-zero3", "reward", big + reward_size + ["deepspeed=zero3"]),
    ]
    for name, stage, overrides in checks:
        if name in args.skip:
            continue
        result = run_stage(name, stage, overrides, out, timeout=300)
        if "tokens_per_s" in result:
            result["mfu"] = 6 * params * result["tokens_per_s"] / PEAK_BF16_FLOPS
        report["runs"].append(result)
        save()
        subprocess.run(["rm", "-rf", str(out / "runs" / name / "checkpoints")])

    print_table(["check", "rc", "precision", "loss first -> last", "tokens/s", "samples/s", "step s", "MFU",
                 "peak mem GB", "wall s"], report["runs"], "tokens_per_s",
                lambda r: [r["precision"], f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}", f"{r['tokens_per_s']:,.0f}",
                           f"{r['samples_per_s']:,.1f}", f"{r['step_time_s']:.3f}", f"{r.get('mfu', float('nan')):.1%}",
                           f"{r['memory_gb']:.1f}", f"{r['wall_s']:.0f}"])
    for r in report["runs"]:
        if r.get("eval"):
            print(r["name"], {k: round(v, 4) for k, v in r["eval"].items() if "exact_match" in k and k.count("/") <= 2})


if __name__ == "__main__":
    main()
