"""What every tuneforge-vs-TRL benchmark shares: runs, timing, medians, tables and the result file.

A supervised benchmark (`sft_vs_trl.py`, `reward_vs_trl.py`) writes its data file, composes tuneforge's config
from the shared overrides, replays tuneforge's sampler for exact per-step counts, and hands `compare` a function
that runs one system once (`ppo_vs_trl.py` prepares its own models and prompts, and uses the rest). `compare`
runs every system `--repeats` times in alternation, each as its own process, measures throughput from wall-clock
step ends, and writes medians, the paired tuneforge/TRL ratios of every repeat, the machine, the commit (and
whether the tree was clean), the benchmarked model's parameter count, how busy the machine was before each run
and every run to one JSON file. What a benchmark counts per step and how its tables show it is its
`Comparison`; `bench.tables` renders the docs' tables from these files.
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import Callable, Iterable, Iterator, Optional

ROOT = Path(__file__).resolve().parent.parent

# Architectures for --model-size, as `model.tiny.*` overrides (tiny = tuneforge's default, conf/model/tiny.yaml).
MODEL_SIZES = {
    "tiny": {},
    "small": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
              "intermediate_size": 1376},
    # The compute-bound size (issue 23): small's blocks with a realistic vocabulary's embedding and 32k softmax (the
    # data still uses the shipped tokenizer's 512 tokens), so a step is mostly matmuls, not framework overhead.
    "medium": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
               "intermediate_size": 1376, "vocab_size": 32000},
}
# The frame that holds a system's training loop: profiles are summarised below it.
LOOP_FRAMES = {"tuneforge": "fit (trainer/loop.py", "trl": "Trainer._inner_training_loop (transformers/trainer.py"}
# --help of the sizes every supervised benchmark has.
SUPERVISED_SIZE_HELP = {
    "steps": "optimizer steps per run",
    "warmup_steps": "lr warmup steps; 0 (default) makes both schedules identical: Transformers warms up from lr 0 "
                    "at the first step, tuneforge from lr/warmup, so any warmup puts TRL one step behind",
}


@dataclasses.dataclass(frozen=True)
class Comparison:
    """What one benchmark trains, runs, counts per step and shows."""

    name: str  # the module under bench/ and the result file's stem
    stage: str  # tuneforge's entry point (`trainer.<stage>`, `rlhf.ppo`) and its config `conf/<stage>.yaml`
    data: str  # the synthetic suite's variant whose train split both sides train on
    data_columns: tuple[str, ...]  # the columns written for them (all either side reads)
    tuneforge_overrides: tuple[str, ...]  # on top of `tuneforge_overrides`: what equality with TRL needs
    systems: tuple[str, ...]  # run order within a repeat: tuneforge and TRL alternate, so load drift hits all alike
    trl_systems: tuple[str, ...]
    # Per-step counts in every record -> their unit in tables; each is reported per second (compared as a
    # tuneforge/TRL ratio) and per step.
    counts: dict[str, str]
    sizes: dict[str, int]  # one integer flag each, --steps among them: {"steps": 30, "max_length": 128, ...}
    size_help: dict[str, str]  # the --help of each size
    # The per-step value whose mean over the last --loss-window steps every run reports ("final_<final>").
    final: str = "loss"
    # Per-step values averaged over the measured steps -> their column title (phase times, say).
    means: dict[str, str] = dataclasses.field(default_factory=dict)
    # The interpreter that runs the TRL side (None: this one); the result file records its library versions.
    trl_python: Optional[Path] = None
    profiled: bool = True  # offers --profile (py-spy on each run's one training process)
    optional_systems: tuple[str, ...] = ()  # run only when --systems names them (after the default ones)
    # tuneforge systems that the others are paired against too, as against TRL: one with a feature switched off
    reference_systems: tuple[str, ...] = ()
    model_size: str = "tiny"  # --model-size's default
    scalar_head: bool = False  # the benchmarked model is a reward model (one-label head), not a causal LM


# ---------------------------------------------------------------------------------------------------- arguments


def parse_args(c: Comparison, doc: str, argv: Optional[list[str]],
               add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None) -> argparse.Namespace:
    """The flags every benchmark takes, plus what `add_arguments` adds."""
    p = argparse.ArgumentParser(prog=f"python -m bench.{c.name}", description=doc.splitlines()[0])
    for name, default in c.sizes.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help=c.size_help[name])
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds of every system")
    p.add_argument("--model-size", choices=sorted(MODEL_SIZES), default=c.model_size)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP/MKL/torch threads for every run")
    p.add_argument("--skip-steps", type=int, default=5, help="first steps left out of the throughput (warm-up)")
    p.add_argument("--loss-window", type=int, default=10, help=f"final {c.final} = mean over this many last steps")
    p.add_argument("--systems", nargs="+", choices=c.systems + c.optional_systems, default=list(c.systems),
                   help="what to run" + (f" (not by default: {', '.join(c.optional_systems)})" if c.optional_systems else ""))
    if add_arguments is not None:
        add_arguments(p)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", type=Path, default=None,
                   help=f"result JSON (default: bench/results/{c.name}.json"
                        + (f"; {c.name}_profile.json with --profile)" if c.profiled else ")"))
    p.add_argument("--keep-runs", type=Path, default=None, help="keep run directories here (default: a temp dir)")
    if c.profiled:
        p.add_argument("--profile", action="store_true",
                       help="sample every run with py-spy and store the hottest functions of its training loop "
                            "(timings of profiled runs include the sampler's cost)")
    else:
        p.set_defaults(profile=False)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = ROOT / "bench" / "results" / (f"{c.name}_profile.json" if args.profile else f"{c.name}.json")
    if args.skip_steps < 1:
        p.error("--skip-steps must be >= 1 (the first step has no previous step end to time it from)")
    if args.steps <= args.skip_steps:
        p.error(f"--steps must exceed --skip-steps ({args.skip_steps})")
    return args


# ---------------------------------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
    work: Path  # the data file and run directories
    data_path: Path  # the JSONL both sides train on
    rows: int  # its row count
    overrides: list[str]  # every tuneforge run's (the ZeRO preset and run dir are added per run)
    job: object  # trainer.config.TrainingJobConfig they compose to
    parameters: Optional[int] = None  # the benchmarked model's (RL: the policy's), recorded in the result file


@contextlib.contextmanager
def prepared(args: argparse.Namespace, c: Comparison) -> Iterator[Setup]:
    """Write the data file and compose tuneforge's config, in --keep-runs or a temp dir removed at the end."""
    with tempfile.TemporaryDirectory(prefix=f"{c.name}_") as tmp:
        work = args.keep_runs or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ["HF_DATASETS_CACHE"] = str(work / "datasets_cache")  # before `datasets` is imported
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from trainer.compose import compose
        from trainer.synthetic import make_rows

        data_path = work / f"{c.data}_train.jsonl"
        rows = make_rows(c.data, "train")
        with data_path.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps({k: row[k] for k in c.data_columns}) + "\n")
        overrides = [*c.tuneforge_overrides, *tuneforge_overrides(args, data_path)]
        job = compose(c.stage, overrides)
        yield Setup(work, data_path, len(rows), overrides, job, model_parameters(job.model, c.scalar_head))


def model_parameters(model, scalar_head: bool = False) -> int:
    """The parameter count of the model a `trainer.config.ModelConfig` builds (tied weights counted once)."""
    from trainer.model import count_parameters, load_tokenizer

    return count_parameters(model, load_tokenizer(model), scalar_head)


def tuneforge_overrides(args: argparse.Namespace, data_path: Path) -> list[str]:
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


def replay_steps(rows: list[dict], job) -> list[list[dict]]:
    """The rows of every step of a one-process tuneforge run, in order.

    The sample order depends only on (seed, step), so walking tuneforge's own sampler over the same rows gives
    each step's batch exactly; a benchmark counts what it needs from them (checked against the run's log)."""
    from trainer.loop import GlobalBatchSampler

    t = job.train
    sampler = GlobalBatchSampler(len(rows), t.micro_batch_size, t.grad_accum, 1, job.seed)
    return [[rows[i] for m in range(t.grad_accum) for i in sampler.micro_batch(step, m, 0)]
            for step in range(t.max_steps)]


def trl_spec(job, data_path: Path, threads: int) -> dict:
    """What a TRL runner (bench/trl_*.py) needs, taken from tuneforge's resolved config (`optim.lr: auto` made the
    rate the run prints, as `trainer.run` does)."""
    from trainer.model import resolve_lr_for_model

    lr = resolve_lr_for_model(job.optim, job.peft.method, job.model, job.stage == "reward")[0].lr
    return {
        "data_path": str(data_path),
        "seed": job.seed,
        "steps": job.train.max_steps,
        "micro_batch_size": job.train.micro_batch_size,
        "grad_accum": job.train.grad_accum,
        "max_length": job.data.max_length,
        "lr": lr,
        "betas": list(job.optim.betas),
        "eps": job.optim.eps,
        "weight_decay": job.optim.weight_decay,
        "warmup_steps": job.optim.warmup_steps,
        "min_lr_ratio": job.optim.min_lr_ratio,
        "max_grad_norm": job.optim.max_grad_norm,
        "model": dataclasses.asdict(job.model),
        "threads": threads,
    }


# ---------------------------------------------------------------------------------------------------- runs


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


def run_tuneforge(stage: str, zero: str, run_dir: Path, overrides: list[str], steps: list[dict], threads: int,
                  profile: bool) -> tuple[list[dict], float]:
    """Run `python -m trainer.<stage>` once under deepspeed=<zero>; its per-step records carry the replayed counts
    `steps[step - 1]`.

    Every step's replayed "tokens" must equal what the run logged, or the replay no longer matches trainer.loop."""
    cmd = [sys.executable, "-m", f"trainer.{stage}", *overrides, f"deepspeed={zero}", f"hydra.run.dir={run_dir}"]
    wall = run_child(cmd, run_dir, threads, profile)
    records, seen = [], 0
    for r in read_jsonl(run_dir / "metrics.jsonl"):
        if "train/loss" not in r:
            continue
        counts = steps[r["step"] - 1]
        if r["train/tokens_seen"] - seen != counts["tokens"]:
            raise SystemExit(f"error: {run_dir}: step {r['step']} logged {r['train/tokens_seen'] - seen} tokens, "
                             f"the replayed sampler says {counts['tokens']}; the replay no longer matches trainer.loop")
        seen = r["train/tokens_seen"]
        records.append({"step": r["step"], "time": r["time"], "loss": r["train/loss"], "lr": r["train/lr"], **counts})
    return records, wall


def run_runner(runner: str, run_dir: Path, spec: dict, threads: int, profile: bool,
               python: Optional[Path] = None) -> tuple[list[dict], float]:
    """Run `python -m bench.<runner> spec.json` once (a TRL runner, see bench/trl_harness.py for what it writes,
    or bench.sft_floor), under `python` (default: this interpreter)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path = run_dir / "spec.json"
    spec_path.write_text(json.dumps({**spec, "output_dir": str(run_dir)}, indent=2))
    wall = run_child([str(python or sys.executable), "-m", f"bench.{runner}", str(spec_path)], run_dir, threads,
                     profile)
    records = read_jsonl(run_dir / "metrics.jsonl")
    for r in records:
        counted = r.get("trl_num_tokens")  # the supervised runners' cross-check; PPO's has none
        if counted is not None and counted != sum(x["tokens"] for x in records[: r["step"]]):
            raise SystemExit(f"error: {run_dir}: step {r['step']}: our token count disagrees with TRL's num_tokens")
    return records, wall


# ---------------------------------------------------------------------------------------------------- measuring


def steady_state(records: list[dict], skip: int, loss_window: int, counts: Iterable[str], final: str = "loss",
                 means: Iterable[str] = ()) -> dict:
    """Throughput of every count over steps skip+1..N from wall-clock step ends, and the mean of each of `means`
    over those steps; the mean of `final` over the last steps, and its curve."""
    records = sorted(records, key=lambda r: r["step"])
    if len(records) <= skip:
        raise SystemExit(f"error: --skip-steps {skip} leaves no measured steps out of {len(records)}")
    measured = records[skip:]  # step s takes from the end of step s-1 to its own end
    seconds = measured[-1]["time"] - records[skip - 1]["time"]
    totals = {c: sum(r[c] for r in measured) for c in counts}
    tail = records[-loss_window:]
    return {
        "measured_steps": len(measured),
        **{f"{c}_per_s": n / seconds for c, n in totals.items()},
        "step_time_s": seconds / len(measured),
        **{m: sum(r[m] for r in measured) / len(measured) for m in means},
        **{f"{c}_per_step": n / len(measured) for c, n in totals.items()},
        f"final_{final}": sum(r[final] for r in tail) / len(tail),
        f"{final}_curve": [round(r[final], 4) for r in records],
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


def marked_pids(mark: str) -> list[int]:
    """The live processes whose environment holds `mark` ("NAME=value"): a variable set on a command is inherited
    by everything it starts (torchrun's ranks, Ray's servers and actors), whoever else runs on the machine."""
    key, pids = mark.encode(), []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if key in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                pids.append(int(pid))
        except OSError:  # gone, or not ours to read
            continue
    return pids


# More CPU than this used by other processes while the bench waits before a run marks the run as loaded.
BUSY_CORES_LIMIT = 0.25


def busy_cores(stat_before: str, stat_after: str) -> float:
    """Cores kept busy between two readings of /proc/stat: busy jiffies over all jiffies of its "cpu" line, times the
    number of cores (its "cpuN" lines), so the kernel's tick rate and the exact interval drop out.

    The bench itself sleeps between the readings, so this is what everything else on the machine used. The load
    average cannot tell that: right after a run, its 1-minute figure is mostly that run."""
    def jiffies(text: str) -> tuple[int, int, int]:
        lines = text.splitlines()
        # user nice system idle iowait irq softirq steal; guest time is already inside user and nice.
        fields = [int(x) for x in next(line for line in lines if line.split()[0] == "cpu").split()[1:9]]
        cores = sum(1 for line in lines if line.startswith("cpu") and line.split()[0] != "cpu")
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields), cores

    busy0, total0, cores = jiffies(stat_before)
    busy1, total1, _ = jiffies(stat_after)
    return cores * (busy1 - busy0) / max(total1 - total0, 1)


def measure_busy_cores(seconds: float = 2.0, stat: Path = Path("/proc/stat")) -> Optional[float]:
    """`busy_cores` over `seconds` of this process sleeping; None where there is no /proc/stat (not Linux)."""
    if not stat.exists():
        return None
    before = stat.read_text()
    time.sleep(seconds)
    return busy_cores(before, stat.read_text())


def machine_info(threads: int, trl_python: Optional[Path] = None) -> dict:
    """The machine and library versions; with `trl_python`, "trl" and "trl_env" are that interpreter's."""
    import deepspeed
    import torch
    import transformers
    import trl

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    info = {
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
    if trl_python is not None:
        script = ("import json, platform, accelerate, torch, transformers, trl; print(json.dumps({'python': "
                  "platform.python_version(), 'torch': torch.__version__, 'trl': trl.__version__, 'transformers': "
                  "transformers.__version__, 'accelerate': accelerate.__version__}))")
        out = subprocess.run([str(trl_python), "-c", script], capture_output=True, text=True, check=True)
        info["trl_env"] = {"python_path": str(trl_python), **json.loads(out.stdout)}
        info["trl"] = info["trl_env"]["trl"]
    return info


def code_version() -> dict:
    """The tuneforge commit benchmarked, every file that differed from it (untracked ones too: a bench file or a
    doc changes what a number means as much as the code does), and `clean`: whether none did but result files
    (`changes_no_measurement`). None where git did not answer."""
    def git(*cmd):
        out = subprocess.run(["git", "-C", str(ROOT), *cmd], capture_output=True, text=True)
        # rstrip only: a porcelain status line starts with a space when the index is unchanged.
        return out.stdout.rstrip() if out.returncode == 0 else None

    status = git("status", "--porcelain")
    changed = None if status is None else [line[3:] for line in status.splitlines()]
    clean = None if changed is None else changes_no_measurement(changed)
    return {"commit": git("rev-parse", "HEAD"), "clean": clean, "changed_files": changed}


def changes_no_measurement(changed: list[str]) -> bool:
    """Whether a tree that differs from its commit in `changed` still measures the commit: result files (a chain of
    benches writes one before the next starts) and Markdown (the docs the tables go into) change no measurement;
    code, configs and the benches themselves may."""
    return all(path.startswith("bench/results/") or path.endswith(".md") for path in changed)


def warn_if_dirty(code: dict) -> None:
    """Say so when the tree differs from its commit. A warning, not a refusal: people iterate on a dirty tree,
    and `bench.tables` marks the figures of such a file."""
    if code["clean"] is False:
        shown = ", ".join(code["changed_files"][:5]) + (", ..." if len(code["changed_files"]) > 5 else "")
        print(f"warning: the tree differs from commit {(code['commit'] or '?')[:7]} ({shown}); the result file "
              f"will say so (code.clean=false). Benchmark a clean tree for figures you publish.", flush=True)


# ---------------------------------------------------------------------------------------------------- reporting


def median_keys(c: Comparison) -> list[str]:
    return [*(f"{k}_per_s" for k in c.counts), "step_time_s", *c.means, *(f"{k}_per_step" for k in c.counts),
            f"final_{c.final}", "wall_s"]


def summarize(runs: list[dict], c: Comparison) -> dict:
    """Medians per system over repeats, and every tuneforge/TRL ratio of medians."""
    medians = {}
    for name in dict.fromkeys(r["system"] for r in runs):
        mine = [r for r in runs if r["system"] == name]
        medians[name] = {key: statistics.median(r[key] for r in mine) for key in median_keys(c)}
        medians[name]["repeats"] = len(mine)
    ratios = {}
    for tf in (n for n in medians if n not in c.trl_systems):
        for base in (n for n in medians if n in (*c.trl_systems, *c.reference_systems) and n != tf):
            a, b, final = medians[tf], medians[base], f"final_{c.final}"
            ratios.setdefault(tf, {})[base] = {
                **{f"{k}_per_s": a[f"{k}_per_s"] / b[f"{k}_per_s"] for k in c.counts},
                f"{final}_rel_diff": (a[final] - b[final]) / b[final],
            }
    return {"medians": medians, "vs_trl": ratios,
            "paired": paired_ratios(runs, c.counts, c.trl_systems, c.reference_systems),
            "loaded_runs": sum(1 for r in runs if r.get("loaded"))}


def paired_ratios(runs: list[dict], counts: Iterable[str], trl_systems: Iterable[str],
                  reference_systems: Iterable[str] = ()) -> dict:
    """Every tuneforge/TRL ratio (and tuneforge/reference system ratio) of each count per second, per repeat from
    the two runs of that repeat (neighbours in time, so load drift hits both alike), with their median, min and
    max."""
    out = {}
    systems = list(dict.fromkeys(r["system"] for r in runs))
    trl_systems, baselines = tuple(trl_systems), (*trl_systems, *reference_systems)
    for tf in (s for s in systems if s not in trl_systems):
        for base in (s for s in systems if s in baselines and s != tf):
            per_count = {}
            for key in counts:
                ratios = []
                for repeat in sorted({r["repeat"] for r in runs}):
                    a = [r for r in runs if r["system"] == tf and r["repeat"] == repeat]
                    b = [r for r in runs if r["system"] == base and r["repeat"] == repeat]
                    if a and b:
                        ratios.append(a[0][f"{key}_per_s"] / b[0][f"{key}_per_s"])
                if ratios:
                    per_count[f"{key}_per_s"] = {"per_repeat": ratios, "median": statistics.median(ratios),
                                                 "min": min(ratios), "max": max(ratios)}
            out.setdefault(tf, {})[base] = per_count
    return out


def shares_of_floor(runs: list[dict], floors: list[float], key: str) -> dict:
    """Every system's `key` per second as a share of the floor timed in the same repeat (`floors[repeat]`, in the
    same unit), per repeat, with their median, min and max: the fraction paired as the TRL ratios are."""
    out = {}
    for system in dict.fromkeys(r["system"] for r in runs):
        shares = [r[f"{key}_per_s"] / floors[r["repeat"]] for r in sorted(runs, key=lambda r: r["repeat"])
                  if r["system"] == system]
        out[system] = {"per_repeat": shares, "median": statistics.median(shares), "min": min(shares),
                       "max": max(shares)}
    return out


def floor_share_table(result: dict, trl_systems: Iterable[str]) -> str:
    """Per system: its share of the floor timed in each repeat, paired (median, min-max, every repeat), beside
    the floors themselves and the floor's multiple of each TRL system."""
    floors = result["floor"]["per_repeat"]
    rows = [[system, f"{share['median']:.2f} ({share['min']:.2f}-{share['max']:.2f})",
             ", ".join(f"{x:.2f}" for x in share["per_repeat"])]
            for system, share in result["floor"]["shares"].items()]
    loaded = result["floor"].get("loaded")  # not in files written before the floor was flagged
    # The floor as a multiple of each TRL system, per repeat: how far above TRL any loop doing this arithmetic gets.
    multiples = []
    for trl in (t for t in trl_systems if t in result["floor"]["shares"]):
        per_repeat = [1 / share for share in result["floor"]["shares"][trl]["per_repeat"]]
        multiples.append(f"{trl} {statistics.median(per_repeat):.2f}x ({min(per_repeat):.2f}-{max(per_repeat):.2f})")
    return (markdown_table(["system", "share of the floor, paired median (min-max)", "per repeat"], rows) + "\n\n"
            + f"floor timed in each repeat ({result['floor']['unit']}): " + ", ".join(f"{x:.2f}" for x in floors)
            + f"; floors timed on a busy machine: {UNRECORDED if loaded is None else f'{loaded} of {len(floors)}'}"
            + (f"; the floor against {', '.join(multiples)}, paired median (min-max)" if multiples else ""))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


UNRECORDED = "unrecorded"  # what a table shows for a figure its result file does not hold (older files)


def medians_table(summary: dict, c: Comparison) -> str:
    """Each system's medians over its repeats."""
    headers = [*(f"{unit}/s" for unit in c.counts.values()), "s/step", *c.means.values(),
               *(f"{unit}/step" for unit in c.counts.values()), f"final {c.final}", "wall s"]
    formats = [*(".1f" for _ in c.counts), ".3f", *(".3f" for _ in c.means), *(".0f" for _ in c.counts), ".4f", ".0f"]
    return markdown_table(
        ["system", *headers],
        [[name, *(format(s[key], fmt) if key in s else UNRECORDED for key, fmt in zip(median_keys(c), formats))]
         for name, s in summary["medians"].items()])


def paired_cell(r: dict) -> str:
    """A paired ratio as "median (min-max)": the headline, with the spread of the repeats beside it."""
    return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"


def paired_table(summary: dict, c: Comparison) -> str:
    """Per tuneforge system and each system it is paired against (TRL's, and `reference_systems`): the paired
    ratio of each count per second, the headline count's medians on each side, and the final value's difference
    (of the medians)."""
    (first, unit), final = next(iter(c.counts.items())), f"final_{c.final}"
    rows = []
    for tf, by_trl in summary["paired"].items():
        for trl, per_count in by_trl.items():
            diff = summary["vs_trl"].get(tf, {}).get(trl, {}).get(f"{final}_rel_diff")
            rows.append([tf, trl, *(paired_cell(per_count[f"{k}_per_s"]) for k in c.counts),
                         *(f"{summary['medians'][s][f'{first}_per_s']:.1f}" for s in (tf, trl)),
                         UNRECORDED if diff is None else f"{diff:+.2%}"])
    return markdown_table(
        ["tuneforge", "vs", *(f"{u}/s, paired median (min-max)" for u in c.counts.values()),
         f"tuneforge {unit}/s", f"vs {unit}/s", f"final {c.final}, difference"], rows)


def format_tables(summary: dict, c: Comparison) -> str:
    return medians_table(summary, c) + "\n\n" + paired_table(summary, c)


def compare(args: argparse.Namespace, c: Comparison, setup: Setup,
            run_system: Callable[[str, Path], tuple[list[dict], float]], *, recorded: dict,
            argv: Optional[list[str]], floor: Optional[Callable[[Path], float]] = None) -> None:
    """Run every selected system `--repeats` times in alternation, print and write the results.

    run_system(system, run_dir) -> (per-step records with "step", "time", `c.final`, every count and every one of
    `c.means`, wall seconds).
    `recorded` goes into the result file as it is (what the TRL runs were given).
    `floor(run_dir)`, when given, times the floor after each repeat's runs (in the first count per second), so that
    each system's share of it pairs with runs minutes away, not a separate measurement's."""
    machine = machine_info(args.threads, c.trl_python)
    code = code_version()
    warn_if_dirty(code)
    print(f"{machine['cpu']}, {machine['logical_cores']} cores, {args.threads} threads; torch {machine['torch']}, "
          f"trl {machine['trl']}; {setup.rows} rows; {args.steps} steps x {args.repeats} repeats; "
          f"{setup.parameters} parameters", flush=True)

    runs, floors, floor_busy = [], [], []
    first_count, first_unit = next(iter(c.counts.items()))
    for repeat in range(args.repeats):
        for system in (s for s in c.systems + c.optional_systems if s in args.systems):
            run_dir = setup.work / "runs" / f"{system}-r{repeat}"
            busy = measure_busy_cores()  # was anything else running? (the load average is mostly our last run)
            loaded = busy is not None and busy > BUSY_CORES_LIMIT
            if loaded:
                print(f"warning: {busy:.2f} cores busy with other processes before {system}-r{repeat} (limit "
                      f"{BUSY_CORES_LIMIT}); the run is flagged as loaded", flush=True)
            load = os.getloadavg()  # 1/5/15-minute load average just before the run
            records, wall = run_system(system, run_dir)
            result = {"system": system, "repeat": repeat, "wall_s": wall, "load_average_before": load,
                      "busy_cores_before": busy, "loaded": loaded,
                      **steady_state(records, args.skip_steps, args.loss_window, c.counts, c.final, c.means)}
            if args.profile:
                result["profile"] = profile_summary(run_dir / "profile.txt", LOOP_FRAMES[system.split("-")[0]])
            runs.append(result)
            rates = " ".join(f"{result[f'{k}_per_s']:8.1f} {unit}/s" for k, unit in c.counts.items())
            print(f"[{repeat + 1}/{args.repeats}] {system:<16} {rates}  {result['step_time_s']:.3f} s/step  "
                  f"{c.final} {result[f'final_{c.final}']:.4f}  wall {wall:.0f} s", flush=True)
        if floor is not None:
            busy = measure_busy_cores()  # the floor is flagged as the runs are
            floor_busy.append(busy)
            if busy is not None and busy > BUSY_CORES_LIMIT:
                print(f"warning: {busy:.2f} cores busy with other processes before floor-r{repeat} (limit "
                      f"{BUSY_CORES_LIMIT}); the floor is flagged as loaded", flush=True)
            floors.append(floor(setup.work / "runs" / f"floor-r{repeat}"))
            print(f"[{repeat + 1}/{args.repeats}] floor            {floors[-1]:8.1f} {first_unit}/s", flush=True)

    summary = summarize(runs, c)
    if floor is not None:
        summary["floor"] = {"unit": f"{first_unit}/s", "per_repeat": floors, "busy_cores_before": floor_busy,
                            "loaded": sum(1 for b in floor_busy if b is not None and b > BUSY_CORES_LIMIT),
                            "shares": shares_of_floor(runs, floors, first_count)}
    machine["load_average_at_end"] = os.getloadavg()
    result = {
        "command": " ".join([f"python -m bench.{c.name}", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tuneforge_overrides": [o for o in setup.overrides if not o.startswith("data.path=")],
        "parameters": setup.parameters,
        **recorded,
        "machine": machine,
        "code": code,
        **summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_tables(summary, c))
    if floor is not None:
        print("\n" + floor_share_table(summary, c.trl_systems))
    for tf, by_trl in summary["paired"].items():
        for trl, per_count in by_trl.items():
            for key, r in per_count.items():
                print(f"paired {tf}/{trl} {key}: per repeat {', '.join(f'{x:.2f}' for x in r['per_repeat'])}")
    for r in runs:
        busy = "?" if r["busy_cores_before"] is None else f"{r['busy_cores_before']:.2f}"
        print(f"before {r['system']}-r{r['repeat']}: other processes {busy} cores, load average "
              f"{' '.join(f'{x:.2f}' for x in r['load_average_before'])}" + ("  LOADED" if r["loaded"] else ""))
    print(f"{summary['loaded_runs']} of {len(runs)} runs flagged as loaded" + ("; the tree was not clean"
                                                           if code["clean"] is False else ""))
    print(f"wrote {args.out}")
