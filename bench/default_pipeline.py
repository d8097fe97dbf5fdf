"""The embedded default, stage after stage, as a user runs it: each `python -m <module>` with no override, in
its own process, in a scratch directory (so the stages chain through that directory's outputs/ only), with its
wall time and what it reports. Writes one JSON file: the command, machine, versions, commit, the load average
before each stage, and per stage the wall time, the processes it ran (by kind) and the peak of their summed
resident memory, the per-rank peaks the run logged, the final evaluation and (RL) the before/after table.

    python -m bench.default_pipeline --out bench/results/default_pipeline.json
    python -m bench.default_pipeline --stages sft reward ppo "ppo algo=grpo" --out ...
    python -m bench.default_pipeline --table bench/results/default_pipeline.json   # the docs' tables

A stage is a module name under STAGES, optionally followed by overrides ("ppo algo=grpo").
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

from bench.harness import ROOT, code_version, machine_info, marked_pids, warn_if_dirty

STAGES = {"sft": "trainer.sft", "instruct": "trainer.instruct", "reward": "trainer.reward", "dpo": "trainer.dpo",
          "ppo": "rlhf.ppo"}
DEFAULT = ["sft", "reward", "ppo", "ppo algo=grpo", "ppo algo=rloo", "dpo"]


def run_stage(stage: str, work: Path) -> dict:
    name, *overrides = shlex.split(stage)
    if name not in STAGES:
        raise SystemExit(f"unknown stage {name!r}; choose from {', '.join(STAGES)}")
    out_dir = work / "outputs" / name
    before = set(out_dir.iterdir()) if out_dir.exists() else set()
    cmd = [sys.executable, "-m", STAGES[name], *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    mark = uuid.uuid4().hex
    env["BENCH_STAGE_MARK"] = mark  # inherited by every process the stage starts (ranks, Ray's servers and actors)
    load = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=err, text=True)
        seen = watch(proc, f"BENCH_STAGE_MARK={mark}")
        seconds = time.perf_counter() - t0
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{stage} failed ({proc.returncode}):\n{err.read()[-3000:]}")
    (run_dir,) = set(out_dir.iterdir()) - before
    result = {"stage": stage, "command": shlex.join(["python", "-m", STAGES[name], *overrides]),
              "load_average_before": load, "wall_s": round(seconds, 1), "run_dir": str(run_dir.relative_to(work)),
              **seen, "logged_peak_memory_gb": logged_peak_memory(run_dir)}
    for file, key in (("eval_metrics.json", "final_eval"), ("before_after.json", "before_after")):
        if (run_dir / file).exists():
            result[key] = json.loads((run_dir / file).read_text())
    fit = value_fit(run_dir)
    if fit:
        result["value_fit"] = fit
    print(f"{stage}: {seconds:.0f} s", flush=True)
    return result


def watch(proc: subprocess.Popen, mark: str, every_s: float = 0.5) -> dict:
    """Until `proc` exits, every `every_s`: the processes whose environment holds `mark`. Returns how many there were
    by kind (`process_kind`) and the peak of their summed resident memory (a sampled peak: a spike shorter than
    `every_s` can be missed; the runs' own per-rank peaks are in `logged_peak_memory`)."""
    kinds: dict[int, str] = {}
    peak_kib = 0
    while proc.poll() is None:
        total = 0
        for pid in marked_pids(mark):
            try:
                rss = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS:"))
                # The last title seen: a Ray worker starts as setup_worker.py and takes its actor's name later.
                kinds[pid] = process_kind(Path(f"/proc/{pid}/cmdline").read_bytes())
                total += int(rss.split()[1])
            except (OSError, StopIteration):  # gone since, or a kernel thread without VmRSS
                continue
        peak_kib = max(peak_kib, total)
        time.sleep(every_s)
    counts: dict[str, int] = {}
    for kind in kinds.values():
        counts[kind] = counts.get(kind, 0) + 1
    return {"processes": len(kinds), "process_kinds": dict(sorted(counts.items())),
            "peak_resident_gb": round(peak_kib / 2**20, 3)}


def process_kind(cmdline: bytes) -> str:
    """"ray::PolicyWorker" for a Ray actor (its title, less the method it runs), "python -m trainer.sft" for a
    module, else the program's name (and a Python script's)."""
    argv = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0].split(".")[0]
    program = Path(argv[0]).name
    if not program.startswith("python"):
        return program
    if "-m" in argv[1:-1]:
        return f"python -m {argv[argv.index('-m') + 1]}"
    if "-c" in argv[1:]:
        return "python -c"
    script = next((a for a in argv[1:] if not a.startswith("-")), None)
    return f"python {Path(script).name}" if script else "python"


VALUE_FIT_KEYS = ("value/explained_variance", "critic/loss")


def logged_metrics(run_dir: Path) -> list[dict]:
    """The rows of the run's metrics.jsonl (`trainer.report.read_metrics`, which names a cut or foreign line);
    none where the run has no such file."""
    from trainer.report import read_metrics

    return read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []


def value_fit(run_dir: Path, window: int = 5) -> dict[str, dict[str, float]]:
    """How well a critic follows the returns: the mean of each of VALUE_FIT_KEYS over the first and the last
    `window` iterations that logged it (none without a critic)."""
    rows = logged_metrics(run_dir)
    fit = {}
    for key in VALUE_FIT_KEYS:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if values:
            fit[key] = {"first": sum(values[:window]) / len(values[:window]),
                        "last": sum(values[-window:]) / len(values[-window:]), "window": min(window, len(values))}
    return fit


def logged_peak_memory(run_dir: Path) -> dict[str, float]:
    """The largest value of each `*memory_gb` metric the run logged (a rank's peak resident memory on the CPU)."""
    peaks: dict[str, float] = {}
    for row in logged_metrics(run_dir):
        for key, value in row.items():
            if key.endswith("memory_gb") and isinstance(value, (int, float)):
                peaks[key] = max(peaks.get(key, 0.0), value)
    return peaks


HEADLINE = ("eval/exact_match", "eval/em_split/trained_families_seen_phrasing",
            "eval/em_split/trained_families_heldout_phrasing", "eval/accuracy", "eval/reward_score",
            "eval/reward_score_sampled", "eval/exact_match_sampled", "eval/pass@4", "eval/response_length")


def minutes(seconds: float) -> str:
    return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def stage_result(stage: dict) -> str:
    """One line on what a stage reached, from its final evaluation or (RL) its before/after table: exact match on
    the trained families' seen and held-out phrasings and on all held-out prompts, or the pairwise accuracy."""
    em = ("eval/em_split/trained_families_seen_phrasing", "eval/em_split/trained_families_heldout_phrasing",
          "eval/exact_match")
    words = ("on seen phrasings of the trained families", "on their held-out phrasings", "on all held-out prompts")
    if "before_after" in stage:
        ba = stage["before_after"]
        (end,) = [k for k in next(iter(ba.values())) if k != "start"]
        moved = [f"{_pct(ba[k]['start'])} -> {_pct(ba[k][end])} {w}" for k, w in zip(em, words) if k in ba]
        sampled = ba.get("eval/exact_match_sampled")
        return ("greedy exact match " + ", ".join(moved)
                + (f"; sampled exact match {_pct(sampled['start'])} -> {_pct(sampled[end])}" if sampled else ""))
    e = stage.get("final_eval", {})
    if "eval/accuracy" in e:
        return (f"pairwise accuracy {_pct(e['eval/accuracy/trained_families_seen_phrasing'])} on new pairs of the "
                f"trained families, {_pct(e['eval/accuracy'])} on all held-out pairs")
    return "exact match " + ", ".join(f"{_pct(e[k])} {w}" for k, w in zip(em, words) if k in e)


def summary_table(report: dict) -> str:
    """Markdown: each stage's command, wall time and `stage_result` (the README's table)."""
    lines = ["| command | wall time | result |", "| --- | ---: | --- |"]
    lines += [f"| `{s['command']}` | {minutes(s['wall_s'])} | {stage_result(s)} |" for s in report["stages"]]
    return "\n".join(lines)


def tables(report: dict) -> str:
    """Markdown: each stage's wall time and load, then each RL stage's before/after table (from the file)."""
    lines = ["| command | wall time | load average before | processes | peak resident memory, all processes |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| `{s['command']}` | {minutes(s['wall_s'])} | "
              f"{s['load_average_before'][0]:.2f} | {s.get('processes', '')} | "
              + (f"{s['peak_resident_gb']:.2f} GiB |" if "peak_resident_gb" in s else " |") for s in report["stages"]]
    if any("process_kinds" in s for s in report["stages"]):
        lines += ["", "| command | processes by kind | peak per rank, as logged |", "| --- | --- | --- |"]
        lines += [f"| `{s['command']}` | " + ", ".join(f"{k} x{n}" for k, n in s["process_kinds"].items()) + " | "
                  + ", ".join(f"{k} {v:.2f} GiB" for k, v in s["logged_peak_memory_gb"].items()) + " |"
                  for s in report["stages"] if "process_kinds" in s]
    fits = [s for s in report["stages"] if "value_fit" in s]
    if fits:
        keys = [k for k in VALUE_FIT_KEYS if any(k in s["value_fit"] for s in fits)]
        lines += ["", "| command | " + " | ".join(f"{k}, first -> last iterations" for k in keys) + " |",
                  "| --- |" + " ---: |" * len(keys)]
        lines += [f"| `{s['command']}` | " + " | ".join(
            f"{f['first']:.3f} -> {f['last']:.3f} ({f['window']} each)" if (f := s["value_fit"].get(k)) else ""
            for k in keys) + " |" for s in fits]
    for s in report["stages"]:
        if "before_after" in s:
            (end,) = [k for k in next(iter(s["before_after"].values())) if k != "start"]
            lines += ["", f"`{s['command']}`:", "", f"| held-out eval | start (SFT) | {end} |", "| --- | ---: | ---: |"]
            lines += [f"| {k} | {v['start']:.4f} | {v[end]:.4f} |" for k, v in s["before_after"].items()]
        elif "final_eval" in s:
            lines += ["", f"`{s['command']}` (final evaluation):", ""]
            lines += [f"- {k}: {v:.4f}" for k, v in s["final_eval"].items()
                      if k in HEADLINE or k.startswith(("eval/accuracy", "eval/sampled/"))]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.default_pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", nargs="+", default=DEFAULT, help=f"default: {' / '.join(DEFAULT)}")
    p.add_argument("--out", type=Path)
    p.add_argument("--keep", type=Path, help="run in this directory and keep it (default: a temporary one)")
    p.add_argument("--table", type=Path, help="print the markdown tables of this result file and stop")
    a = p.parse_args(argv)
    if a.table:
        print(tables(json.loads(a.table.read_text())))
        return 0
    if a.out is None:
        p.error("--out is required to run")
    code = code_version()
    warn_if_dirty(code)
    with tempfile.TemporaryDirectory(prefix="default_pipeline_") as tmp:
        work = a.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = {"command": shlex.join(["python", "-m", "bench.default_pipeline", *(argv or sys.argv[1:])]),
                  "machine": machine_info(threads=os.cpu_count() or 1), "code": code,
                  "stages": [run_stage(s, work) for s in a.stages]}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
