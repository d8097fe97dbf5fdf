"""tuneforge SFT vs TRL's SFTTrainer on the same computation, on CPU: trained tokens/s at matching loss.

    python -m bench.sft_vs_trl [--steps 30] [--repeats 3] [--micro-batch-size 16] [--max-length 128]
                               [--model-size tiny|small] [--threads N] [--out bench/results/sft_vs_trl.json]

Both sides train the same random-init Llama (tuneforge's `model.tiny`, same seed) with the shipped tokenizer on
the same prompt/completion file (the synthetic suite's train split), packed to the same max length, with the same
micro-batch, AdamW hyper-parameters, cosine-to-min_lr schedule, clipping, fp32, one process, completion-only loss.
tuneforge runs as its real CLI (`python -m trainer.sft`) under ZeRO-3 and ZeRO-0; TRL runs in `bench/trl_sft.py`
with its defaults except what equality needs. The two systems pack differently, so throughput is compared in
tokens: trained tokens (tokens with a loss) per second and all real (non-pad) tokens per second, measured from
wall-clock step ends after the first `--skip-steps` steps, plus the mean loss of the last `--loss-window` steps.

Systems (`--systems`): tuneforge-zero3, tuneforge-zero0, trl-packed (TRL with packing=True, the headline
reference) and trl-unpacked (TRL without packing, padded batches of as many examples as a tuneforge step holds on
average: the same work per step without TRL's padding-free packed attention, which costs O((batch x length)^2) on
CPU). Runs alternate in that order `--repeats` times; the tables show medians and tuneforge/TRL ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # also runnable as `python bench/sft_vs_trl.py`
    sys.path.insert(0, str(ROOT))

# Architectures for --model-size, as `model.tiny.*` overrides (tiny = tuneforge's default, conf/model/tiny.yaml).
MODEL_SIZES = {
    "tiny": {},
    "small": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
              "intermediate_size": 1376},
}
# Run order within a repeat: tuneforge and TRL alternate, so drift in machine load hits every system alike.
SYSTEMS = ("tuneforge-zero3", "trl-packed", "tuneforge-zero0", "trl-unpacked")
TRL_SYSTEMS = ("trl-packed", "trl-unpacked")
# The frame that holds a system's training loop: profiles are summarised below it.
LOOP_FRAMES = {"tuneforge": "fit (trainer/loop.py", "trl": "Trainer._inner_training_loop (transformers/trainer.py"}


def write_sft_data(path: Path) -> int:
    """The synthetic suite's SFT train split as prompt/completion JSONL (the only columns either side reads)."""
    from trainer.synthetic import make_rows

    rows = make_rows("sft", "train")
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"prompt": row["prompt"], "completion": row["completion"]}) + "\n")
    return len(rows)


def tuneforge_overrides(args, data_path: Path) -> list[str]:
    """Hydra overrides shared by every tuneforge run (the ZeRO preset and run dir are added per run)."""
    overrides = [
        f"data.path={data_path}",
        "data.eval_path=null",  # no eval data built: TRL gets none either
        f"data.max_length={args.max_length}",
        f"train.max_steps={args.steps}",
        f"train.micro_batch_size={args.micro_batch_size}",
        "train.grad_accum=1",
        "train.eval_every=0",
        "train.export=false",
        "logger.log_every=1",
        f"optim.warmup_steps={args.warmup_steps}",
        f"seed={args.seed}",
    ]
    overrides += [f"model.tiny.{k}={v}" for k, v in MODEL_SIZES[args.model_size].items()]
    return overrides


def tuneforge_step_tokens(job) -> list[tuple[int, int, int]]:
    """(real tokens, trained tokens, examples) of every step of a tuneforge run, replayed from its data and sampler.

    tuneforge's metrics.jsonl logs real tokens but not trained ones; the sample order depends only on
    (seed, step), so rebuilding the rows and walking the sampler gives both exactly (checked against the log).
    """
    from trainer.data import build_supervised_data
    from trainer.loop import GlobalBatchSampler
    from trainer.model import load_tokenizer
    from trainer.objectives import IGNORE_INDEX

    rows = build_supervised_data(job.data, load_tokenizer(job.model), seed=job.seed).train
    t = job.train
    sampler = GlobalBatchSampler(len(rows), t.micro_batch_size, t.grad_accum, 1, job.seed)
    out = []
    for step in range(t.max_steps):
        picked = [rows[i] for m in range(t.grad_accum) for i in sampler.micro_batch(step, m, 0)]
        tokens = sum(len(r["input_ids"]) for r in picked)
        trained = sum(label != IGNORE_INDEX for r in picked for label in r["labels"][1:])
        examples = sum(r["position_ids"].count(0) for r in picked)  # positions restart at every packed example
        out.append((tokens, trained, examples))
    return out


def trl_spec(job, data_path: Path, threads: int) -> dict:
    """What bench/trl_sft.py needs, taken from tuneforge's resolved config."""
    return {
        "data_path": str(data_path),
        "seed": job.seed,
        "steps": job.train.max_steps,
        "micro_batch_size": job.train.micro_batch_size,
        "grad_accum": job.train.grad_accum,
        "max_length": job.data.max_length,
        "packing": job.data.packing,
        "lr": job.optim.lr,
        "betas": list(job.optim.betas),
        "eps": job.optim.eps,
        "weight_decay": job.optim.weight_decay,
        "warmup_steps": job.optim.warmup_steps,
        "min_lr_ratio": job.optim.min_lr_ratio,
        "max_grad_norm": job.optim.max_grad_norm,
        "model": dataclasses.asdict(job.model),
        "threads": threads,
    }


def child_env(threads: int, run_dir: Path) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        # A fresh datasets cache per run: every run tokenizes from scratch, so wall times compare.
        HF_DATASETS_CACHE=str(run_dir / "datasets_cache"),
        PYTHONWARNINGS="ignore",
    )
    return env


def run_child(cmd: list[str], run_dir: Path, threads: int, profile: bool) -> float:
    """Run one training process to completion; its output goes to run_dir/output.log. Returns wall seconds.

    With `profile`, py-spy samples it into run_dir/profile.txt (collapsed stacks, one "stack count" per line)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if profile:
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        out = str(run_dir / "profile.txt")
        cmd = [py_spy, "record", "--rate", "50", "--format", "raw", "--output", out, "--", *cmd]
    start = time.perf_counter()
    with (run_dir / "output.log").open("w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(threads, run_dir), stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (run_dir / "output.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"error: {' '.join(cmd)} exited with {proc.returncode}; end of its output:\n{tail}")
    return wall


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_tuneforge(zero: str, run_dir: Path, overrides: list[str], step_tokens: list[tuple[int, int, int]],
                  threads: int, profile: bool) -> tuple[list[dict], float]:
    cmd = [sys.executable, "-m", "trainer.sft", *overrides, f"deepspeed={zero}", f"hydra.run.dir={run_dir}"]
    wall = run_child(cmd, run_dir, threads, profile)
    records, seen = [], 0
    for r in read_jsonl(run_dir / "metrics.jsonl"):
        if "train/loss" not in r:
            continue
        tokens, trained, _ = step_tokens[r["step"] - 1]
        if r["train/tokens_seen"] - seen != tokens:
            raise SystemExit(f"error: {run_dir}: step {r['step']} logged {r['train/tokens_seen'] - seen} tokens, "
                             f"the replayed sampler says {tokens}; the replay no longer matches trainer.loop")
        seen = r["train/tokens_seen"]
        records.append({"step": r["step"], "time": r["time"], "loss": r["train/loss"], "lr": r["train/lr"],
                        "tokens": tokens, "trained_tokens": trained})
    return records, wall


def run_trl(run_dir: Path, spec: dict, threads: int, profile: bool) -> tuple[list[dict], float]:
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps({**spec, "output_dir": str(run_dir)}, indent=2))
    wall = run_child([sys.executable, "-m", "bench.trl_sft", str(spec_path)], run_dir, threads, profile)
    records = read_jsonl(run_dir / "metrics.jsonl")
    for r in records:
        if r["trl_num_tokens"] is not None and r["trl_num_tokens"] != sum(x["tokens"] for x in records[: r["step"]]):
            raise SystemExit(f"error: {run_dir}: step {r['step']}: our token count disagrees with TRL's num_tokens")
    return records, wall


def steady_state(records: list[dict], skip: int, loss_window: int) -> dict:
    """Throughput over steps skip+1..N from wall-clock step ends; mean loss of the last loss_window steps."""
    records = sorted(records, key=lambda r: r["step"])
    if len(records) <= skip:
        raise SystemExit(f"error: --skip-steps {skip} leaves no measured steps out of {len(records)}")
    measured = records[skip:]  # step s takes from the end of step s-1 to its own end
    seconds = measured[-1]["time"] - records[skip - 1]["time"]
    tokens = sum(r["tokens"] for r in measured)
    trained = sum(r["trained_tokens"] for r in measured)
    tail = records[-loss_window:]
    return {
        "measured_steps": len(measured),
        "trained_tokens_per_s": trained / seconds,
        "tokens_per_s": tokens / seconds,
        "step_time_s": seconds / len(measured),
        "tokens_per_step": tokens / len(measured),
        "trained_tokens_per_step": trained / len(measured),
        "final_loss": sum(r["loss"] for r in tail) / len(tail),
        "loss_curve": [round(r["loss"], 4) for r in records],
    }


def profile_summary(collapsed: Path, loop_frame: str, top: int = 30) -> dict:
    """Share of training-loop samples per function: inclusive (on the stack) and self (innermost frame)."""
    inclusive, own, total = Counter(), Counter(), 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not any(f.startswith(loop_frame) for f in frames):
            continue
        n = int(count)
        total += n
        for f in set(frames):
            inclusive[f] += n
        own[frames[-1]] += n

    def share(c):
        return [[round(100 * n / max(total, 1), 1), f] for f, n in c.most_common(top)]
    return {"samples": total, "inclusive_pct": share(inclusive), "self_pct": share(own)}


def machine_info(threads: int) -> dict:
    import deepspeed
    import torch
    import transformers
    import trl

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "threads": threads,
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "deepspeed": deepspeed.__version__,
    }


def code_version() -> dict:
    """The tuneforge commit benchmarked, and the files that differed from it (benchmark files aside)."""
    def git(*cmd):
        out = subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"),
            "changed_files": None if status is None else
            [line[3:] for line in status.splitlines() if not line[3:].startswith(("bench/", "docs/benchmarks.md"))]}


def summarize(runs: list[dict]) -> dict:
    """Medians per system over repeats, and every tuneforge/TRL ratio of medians."""
    medians = {}
    for name in dict.fromkeys(r["system"] for r in runs):
        mine = [r for r in runs if r["system"] == name]
        keys = ("trained_tokens_per_s", "tokens_per_s", "step_time_s", "tokens_per_step", "trained_tokens_per_step",
                "final_loss", "wall_s")
        medians[name] = {k: statistics.median(r[k] for r in mine) for k in keys}
        medians[name]["repeats"] = len(mine)
    ratios = {}
    for tf in (n for n in medians if n not in TRL_SYSTEMS):
        for trl in (n for n in medians if n in TRL_SYSTEMS):
            a, b = medians[tf], medians[trl]
            ratios.setdefault(tf, {})[trl] = {
                "trained_tokens_per_s": a["trained_tokens_per_s"] / b["trained_tokens_per_s"],
                "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
                "final_loss_rel_diff": (a["final_loss"] - b["final_loss"]) / b["final_loss"],
            }
    return {"medians": medians, "vs_trl": ratios}


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def format_tables(summary: dict) -> str:
    medians = markdown_table(
        ["system", "trained tok/s", "tok/s", "s/step", "tok/step", "trained tok/step", "final loss", "wall s"],
        [[name, f"{s['trained_tokens_per_s']:.1f}", f"{s['tokens_per_s']:.1f}", f"{s['step_time_s']:.3f}",
          f"{s['tokens_per_step']:.0f}", f"{s['trained_tokens_per_step']:.0f}", f"{s['final_loss']:.4f}",
          f"{s['wall_s']:.0f}"] for name, s in summary["medians"].items()])
    ratios = markdown_table(
        ["tuneforge", "vs", "trained tok/s", "tok/s", "final loss"],
        [[tf, trl, f"{r['trained_tokens_per_s']:.2f}x", f"{r['tokens_per_s']:.2f}x", f"{r['final_loss_rel_diff']:+.1%}"]
         for tf, by_trl in summary["vs_trl"].items() for trl, r in by_trl.items()])
    return medians + "\n\n" + ratios


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sft_vs_trl", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--micro-batch-size", type=int, default=16, help="packed sequences per step (= global batch)")
    p.add_argument("--max-length", type=int, default=128, help="packed sequence length")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds of every system")
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="tiny")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP/MKL/torch threads for every run")
    p.add_argument("--warmup-steps", type=int, default=0,
                   help="lr warmup steps; 0 (default) makes both schedules identical: Transformers warms up "
                        "from lr 0 at the first step, tuneforge from lr/warmup, so any warmup puts TRL one step behind")
    p.add_argument("--skip-steps", type=int, default=5, help="first steps left out of the throughput (warm-up)")
    p.add_argument("--loss-window", type=int, default=10, help="final loss = mean over this many last steps")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="what to run")
    p.add_argument("--trl-unpacked-batch", type=int, default=None,
                   help="trl-unpacked examples per step (default: the mean of a tuneforge step's packed examples)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", type=Path, default=None,
                   help="result JSON (default: bench/results/sft_vs_trl.json; sft_vs_trl_profile.json with --profile)")
    p.add_argument("--keep-runs", type=Path, default=None, help="keep run directories here (default: a temp dir)")
    p.add_argument("--profile", action="store_true",
                   help="sample every run with py-spy and store the hottest functions of its training loop "
                        "(timings of profiled runs include the sampler's cost)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = ROOT / "bench" / "results" / ("sft_vs_trl_profile.json" if args.profile else "sft_vs_trl.json")
    if args.skip_steps < 1:
        p.error("--skip-steps must be >= 1 (the first step has no previous step end to time it from)")
    if args.steps <= args.skip_steps:
        p.error(f"--steps must exceed --skip-steps ({args.skip_steps})")
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sft_vs_trl_") as tmp:
        work = args.keep_runs or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ["HF_DATASETS_CACHE"] = str(work / "datasets_cache")  # before `datasets` is imported
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from trainer.data import compose_job_config

        data_path = work / "sft_train.jsonl"
        num_rows = write_sft_data(data_path)
        overrides = tuneforge_overrides(args, data_path)
        job = compose_job_config("sft", overrides)
        step_tokens = tuneforge_step_tokens(job)
        packed = trl_spec(job, data_path, args.threads)
        unpacked_batch = args.trl_unpacked_batch or round(statistics.mean(e for _, _, e in step_tokens))
        specs = {"trl-packed": packed, "trl-unpacked": {**packed, "packing": False, "micro_batch_size": unpacked_batch}}
        machine = machine_info(args.threads)
        code = code_version()
        print(f"{machine['cpu']}, {machine['logical_cores']} cores, {args.threads} threads; torch {machine['torch']}, "
              f"trl {machine['trl']}; {num_rows} rows; {args.steps} steps x {args.repeats} repeats", flush=True)

        runs = []
        for repeat in range(args.repeats):
            for system in (s for s in SYSTEMS if s in args.systems):
                run_dir = work / "runs" / f"{system}-r{repeat}"
                if system in TRL_SYSTEMS:
                    records, wall = run_trl(run_dir, specs[system], args.threads, args.profile)
                else:
                    zero = system.removeprefix("tuneforge-")
                    records, wall = run_tuneforge(zero, run_dir, overrides, step_tokens, args.threads, args.profile)
                result = {"system": system, "repeat": repeat, "wall_s": wall,
                          **steady_state(records, args.skip_steps, args.loss_window)}
                if args.profile:
                    result["profile"] = profile_summary(run_dir / "profile.txt", LOOP_FRAMES[system.split("-")[0]])
                runs.append(result)
                print(f"[{repeat + 1}/{args.repeats}] {system:<16} {result['trained_tokens_per_s']:8.1f} trained tok/s "
                      f"{result['tokens_per_s']:8.1f} tok/s  {result['step_time_s']:.3f} s/step  "
                      f"loss {result['final_loss']:.4f}  wall {wall:.0f} s", flush=True)

    summary = summarize(runs)
    machine["load_average_at_end"] = os.getloadavg()
    result = {
        "command": " ".join(["python -m bench.sft_vs_trl", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tuneforge_overrides": [o for o in overrides if not o.startswith("data.path=")],
        "trl_specs": {name: {k: v for k, v in spec.items() if k != "data_path"} for name, spec in specs.items()},
        "machine": machine,
        "code": code,
        **summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_tables(summary))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
