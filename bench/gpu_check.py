"""GPU checks on one CUDA device: the same CLI as on CPU, now on NCCL + bf16, at real model size.

    python -m bench.gpu_check --out DIR            # everything below, ~5 min on one H100/H200
    python -m bench.gpu_check --out DIR --smoke    # tiny sizes, a few steps (checks this script on CPU)

1. environment: torch/CUDA/NCCL versions, the process group's backend, a measured bf16 matmul rate;
2. the tiny default SFT run on the GPU (bf16 + NCCL, ZeRO-3): loss falls, exact match reported;
3. a random-init Llama-3.2-1B-shaped model (1.24B parameters, vocab 128256) saved as a Hugging Face
   directory and trained from it (the `model=hf` path users take): SFT with ZeRO-3 and ZeRO-0, and the
   reward stage with ZeRO-3, packed rows, bf16, no activation checkpointing;
   tokens/s and MFU = 6 * parameters * real tokens/s / peak (989 TFLOP/s, the H100/H200 SXM dense bf16 figure).

Every stage is its own `python -m trainer.<stage>` process; throughput is the median of the logged windows
after the first (warm-up). Results go to DIR/gpu_check.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
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


def make_model_dir(path: Path, shape: dict) -> int:
    """A random-init Llama saved as a Hugging Face directory; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def run_stage(name: str, stage: str, overrides: list[str], out: Path, timeout: int) -> dict:
    run_dir = out / "runs" / name
    cmd = [sys.executable, "-m", f"trainer.{stage}", *overrides, f"hydra.run.dir={run_dir}"]
    print(f"\n=== {name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    result = {"name": name, "rc": proc.returncode, "wall_s": time.time() - t0}
    (out / f"{name}.log").write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + proc.stderr[-20000:])
    if proc.returncode != 0:
        print(proc.stderr[-3000:], flush=True)
        return result
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and few steps (to test this script)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", nargs="*", default=[], help="names of checks to skip")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"environment": environment(), "runs": []}
    print(json.dumps(report["environment"], indent=1), flush=True)

    def save():
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1))

    save()
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
        try:
            result = run_stage(name, stage, overrides, out, timeout=300)
        except subprocess.TimeoutExpired:
            result = {"name": name, "rc": "timeout"}
        if "tokens_per_s" in result:
            result["mfu"] = 6 * params * result["tokens_per_s"] / PEAK_BF16_FLOPS
        report["runs"].append(result)
        save()
        subprocess.run(["rm", "-rf", str(out / "runs" / name / "checkpoints")])

    print("\n| check | rc | precision | loss first -> last | tokens/s | samples/s | step s | MFU | peak mem GB | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in report["runs"]:
        if "tokens_per_s" not in r:
            print(f"| {r['name']} | {r['rc']} | | | | | | | | |")
            continue
        print(f"| {r['name']} | {r['rc']} | {r['precision']} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} | "
              f"{r['tokens_per_s']:,.0f} | {r['samples_per_s']:,.1f} | {r['step_time_s']:.3f} | "
              f"{r.get('mfu', float('nan')):.1%} | {r['memory_gb']:.1f} | {r['wall_s']:.0f} |")
    for r in report["runs"]:
        if r.get("eval"):
            print(r["name"], {k: round(v, 4) for k, v in r["eval"].items() if "exact_match" in k and k.count("/") <= 2})


if __name__ == "__main__":
    main()
