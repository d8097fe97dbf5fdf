"""`python -m trainer.report <run dir | sweep dir> [more dirs] [--out DIR]`: a local report without W&B.

Writes `report.html` (one self-contained file: the plots embedded as base64 PNG, no JavaScript, nothing
fetched) and the same plots as PNG files in `plots/` beside it. Every stage writes one into its run
directory when it ends or is preempted (`write_report_quietly`).

A plot is data first: `run_data(run_dir)` turns a run's `metrics.jsonl` into the curves each plot draws
(a test compares them with the metrics), `report_plots` merges several runs (one colour per run), and only
`draw` touches matplotlib (Agg, imported there, so this module stays light).
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from trainer.contracts import USER_ERROR_EXIT_CODE

REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
SAMPLES_FILE = "samples.jsonl"
BEFORE_AFTER_FILE = "before_after.txt"
MAX_SAMPLES = 8  # sample generations shown per run: those of the last step that wrote some


class ReportError(ValueError):
    """A directory the report cannot read; the message is one line that names it."""


@dataclass(frozen=True)
class PlotSpec:
    name: str  # the PNG's file stem
    title: str
    metrics: tuple[str, ...]  # regular expressions, each matched against the whole metric key
    stacked: bool = False  # the curves are parts of one total (RL phase times)


_LOSS = PlotSpec("loss", "Loss", ("train/loss", "eval/loss"))
_LR = PlotSpec("lr", "Learning rate", ("train/lr",))
_GRAD_NORM = PlotSpec("grad_norm", "Gradient norm (before clipping)", ("train/grad_norm",))
_TOKENS = PlotSpec("tokens_per_s", "Throughput (tokens/s)", ("train/tokens_per_s",))
_SUPERVISED = (_LOSS, _LR, _GRAD_NORM, _TOKENS)

# What each stage logs (trainer.loop, trainer.evaluate, rlhf.scoring, rlhf.driver), plot by plot.
STAGE_PLOTS: dict[str, tuple[PlotSpec, ...]] = {
    "sft": (*_SUPERVISED,
            PlotSpec("exact_match_family", "Exact match per family", ("eval/exact_match", r"eval/em/[^/]+")),
            PlotSpec("exact_match_split", "Exact match per split", ("eval/exact_match", r"eval/em_split/.+"))),
    "reward": (*_SUPERVISED,
               PlotSpec("pairwise_accuracy", "Pairwise accuracy per split and kind",
                        ("eval/accuracy", r"eval/accuracy/[^/]+")),
               PlotSpec("margin", "Reward margin (chosen - rejected)", ("eval/margin",)),
               PlotSpec("reward_stats", "Reward mean and std", ("eval/reward_mean", "eval/reward_std"))),
    "dpo": (*_SUPERVISED,
            PlotSpec("dpo_rewards", "Implicit rewards, chosen and rejected",
                     (r"(train|eval)/rewards/chosen", r"(train|eval)/rewards/rejected")),
            PlotSpec("dpo_margin", "Reward margin (chosen - rejected)", ("train/rewards/margin", "eval/margin")),
            PlotSpec("dpo_accuracy", "Accuracy (chosen reward > rejected)",
                     ("train/rewards/accuracy", "eval/accuracy", r"eval/accuracy/[^/]+")),
            PlotSpec("exact_match", "Exact match (greedy and sampled)",
                     ("eval/exact_match", "eval/sampled/exact_match"))),
    "ppo": (PlotSpec("rl_reward", "Reward score (raw, after normalisation, total with KL)",
                     ("reward/score_raw_mean", "reward/score_mean", "reward/total_mean", "eval/reward_score",
                      "eval/reward_score_sampled")),
            PlotSpec("rl_kl", "KL per sequence", ("kl/seq_mean",)),
            PlotSpec("rl_kl_coef", "KL coefficient", ("kl/coef",)),
            PlotSpec("rl_entropy", "Policy entropy", ("policy/entropy",)),
            PlotSpec("rl_clip_frac", "Clip fraction", ("policy/clip_frac",)),
            PlotSpec("rl_response_length", "Response length (tokens)", ("response/length_mean", "eval/response_length")),
            PlotSpec("rl_exact_match", "Exact match", ("eval/exact_match", "eval/exact_match_sampled", r"eval/pass@\d+")),
            PlotSpec("rl_phase_times", "Where an iteration's time goes (s)",
                     ("time/generate_s", "time/forward_s", "time/train_s"), stacked=True)),
}
STAGE_PLOTS["instruct"] = STAGE_PLOTS["sft"]
# The phases of an RL iteration, as its stacked plot names them.
PHASE_NAMES = {"time/generate_s": "generate", "time/forward_s": "score", "time/train_s": "train"}


@dataclass(frozen=True)
class Curve:
    run: str  # the run's name in the legend
    metric: str  # its key in metrics.jsonl
    steps: list[int]  # optimizer steps (supervised) or iterations (RL)
    values: list[float]


@dataclass(frozen=True)
class Plot:
    name: str
    title: str
    xlabel: str
    curves: list[Curve]
    stacked: bool = False


@dataclass(frozen=True)
class Bars:
    """A sweep's objective per member; `best` indexes the best member (None when no member has a value)."""

    name: str
    title: str
    labels: list[str]
    values: list[Optional[float]]  # None: the member failed or reported nothing
    best: Optional[int]


@dataclass
class RunData:
    """What the report shows of one run directory."""

    dir: Path
    name: str
    stage: str
    facts: dict[str, str]
    plots: dict[str, list[Curve]]  # plot name -> curves, only plots with data
    final: dict[str, float]  # the last logged value of each metric
    before_after: Optional[str] = None
    samples: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- reading


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl`; ReportError (one line) when it is missing, empty or cut short."""
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such directory")
    if not path.is_file():
        raise ReportError(f"{path}: not found (not a run directory, or the run stopped before its first log line)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ReportError(f"{path}: line {n} is cut short or not JSON (a run killed mid-write leaves one; "
                              f"delete that line to report the rest)") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ReportError(f"{path}: line {n} is not a metrics record (no integer 'step')")
        records.append(record)
    if not records:
        raise ReportError(f"{path}: empty (the run has logged nothing yet)")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, in logged order; the last value wins where a resumed run relogged a step."""
    by_step: dict[int, float] = {}
    for r in records:
        if isinstance(r.get(key), (int, float)):
            by_step[r["step"]] = float(r[key])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def stage_plots(stage: str, records: list[dict], run: str) -> dict[str, list[Curve]]:
    """Plot name -> the curves of `stage`'s plots that have data, one per metric key its patterns match."""
    keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k not in ("step", "time")})
    plots = {}
    for spec in STAGE_PLOTS.get(stage, ()):
        matched = [k for pattern in spec.metrics for k in keys if re.fullmatch(pattern, k)]
        curves = [Curve(run, k, *series(records, k)) for k in dict.fromkeys(matched)]
        if curves:
            plots[spec.name] = curves
    return plots


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}
    except yaml.YAMLError:
        return {}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def run_facts(run_dir: Path, config: dict, records: list[dict]) -> dict[str, str]:
    """Stage, model, data, world size, ZeRO stage and wall time, from the files every run writes."""
    stage = str(config.get("stage", "?"))
    data = config.get("data") or {}
    facts = {"stage": stage, "directory": str(run_dir)}
    if stage == "ppo":
        algo = (config.get("algo") or {}).get("name", "ppo")
        facts["algorithm"] = str(algo)
        roles = {r: config[r] for r in ("actor", "critic", "reference", "reward") if isinstance(config.get(r), dict)}
        facts["model"] = str(((roles.get("actor") or {}).get("model") or {}).get("name_or_path") or "tiny random init")
        facts["world size"] = ", ".join(f"{r} {c.get('num_nodes', 1) * c.get('devices_per_node', 1)}"
                                        for r, c in roles.items())
        facts["ZeRO stage"] = ", ".join(f"{r} {(c.get('deepspeed') or {}).get('stage', '?')}" for r, c in roles.items())
    else:
        facts["model"] = str((config.get("model") or {}).get("name_or_path") or "tiny random init (model.tiny)")
        ds = _read_json(run_dir / "deepspeed_config.json")
        if ds:
            per_rank = ds.get("train_micro_batch_size_per_gpu", 1) * ds.get("gradient_accumulation_steps", 1)
            facts["world size"] = str(ds.get("train_batch_size", per_rank) // max(per_rank, 1))
            facts["ZeRO stage"] = str((ds.get("zero_optimization") or {}).get("stage", "?"))
    facts["data"] = str(data.get("path") or data.get("mixture") or "?") + (
        f" (eval: {data['eval_path']})" if data.get("eval_path") else "")
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
    if times:
        # The first record comes after model loading and the first step: the run itself took a little longer.
        start = min([times[0]] + [p.stat().st_mtime for p in [run_dir / "config.yaml"] if p.is_file()])
        facts["wall time"] = _duration(max(times) - start)
    facts["last step"] = str(max(r["step"] for r in records))
    return facts


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def last_samples(run_dir: Path, n: int = MAX_SAMPLES) -> list[dict]:
    """Up to `n` rows of samples.jsonl from the last step that wrote some (a cut line is skipped)."""
    path = run_dir / SAMPLES_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    if not rows:
        return []
    last = rows[-1].get("step")
    return [r for r in rows if r.get("step") == last][:n]


def run_data(run_dir: Path, name: Optional[str] = None) -> RunData:
    """Everything the report shows of one run: facts, the curves of its stage's plots, final values,
    before/after table and sample generations."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    config = _read_yaml(run_dir / "config.yaml")
    stage = str(config.get("stage") or _guess_stage(records))
    name = name or run_dir.name
    final: dict[str, float] = {}
    for r in records:
        final.update({k: v for k, v in r.items() if k not in ("step", "time") and isinstance(v, (int, float))})
    before_after = (run_dir / BEFORE_AFTER_FILE).read_text() if (run_dir / BEFORE_AFTER_FILE).is_file() else None
    return RunData(run_dir, name, stage, run_facts(run_dir, {**config, "stage": stage}, records),
                   stage_plots(stage, records, name), final, before_after, last_samples(run_dir))


def _guess_stage(records: list[dict]) -> str:
    """A run directory without config.yaml: its stage from the keys it logged."""
    keys = {k for r in records for k in r}
    if "time/iteration_s" in keys:
        return "ppo"
    if "train/rewards/margin" in keys:
        return "dpo"
    if "eval/reward_mean" in keys:
        return "reward"
    return "sft"


# ---------------------------------------------------------------------------------------------- sweeps


def is_sweep_dir(path: Path) -> bool:
    from trainer.sweep import SUMMARY_JSON, SWEPT_KEYS_FILE

    return (path / SWEPT_KEYS_FILE).is_file() or (path / SUMMARY_JSON).is_file()


def sweep_members(sweep_dir: Path) -> list[dict]:
    """The sweep's members as `trainer.sweep.summarise` reads them (member, swept, status, objective, dir)."""
    from trainer.sweep import summarise

    return summarise(sweep_dir)


def member_name(member: dict) -> str:
    return f"{member['member']}: {' '.join(member['swept']) or '(no swept values)'}"


def objective_direction(sweep_dir: Path, members: list[dict]) -> str:
    """minimize | maximize: the sweeper's own direction where Hydra recorded one (Optuna), else from the
    objective's name (a loss is minimised, a score or accuracy maximised)."""
    direction = ((_read_yaml(sweep_dir / "multirun.yaml").get("hydra") or {}).get("sweeper") or {}).get("direction")
    if isinstance(direction, str) and direction in ("minimize", "maximize"):
        return direction
    objective = next((str(_read_yaml(Path(m["dir"]) / "config.yaml").get("objective") or "") for m in members), "")
    return "minimize" if "loss" in objective else "maximize"


def sweep_bars(sweep_dir: Path, members: list[dict], name: str = "sweep_objective") -> Bars:
    values = [m["objective"] if isinstance(m.get("objective"), (int, float)) else None for m in members]
    scored = [i for i, v in enumerate(values) if v is not None]
    pick = min if objective_direction(sweep_dir, members) == "minimize" else max
    best = pick(scored, key=lambda i: values[i]) if scored else None
    return Bars(name, f"Objective per member of {sweep_dir.name} ({objective_direction(sweep_dir, members)})",
                [member_name(m) for m in members], values, best)


# ---------------------------------------------------------------------------------------------- merging


def report_plots(runs: list[RunData]) -> list[Plot]:
    """One plot per name across runs, the runs' curves overlaid; the stacked phase times are drawn once per
    run (stacks do not overlay)."""
    plots: list[Plot] = []
    names = list(dict.fromkeys(n for r in runs for n in r.plots))
    specs = {s.name: s for specs in STAGE_PLOTS.values() for s in specs}
    for name in names:
        spec = specs[name]
        xlabel = "iteration" if name.startswith("rl_") else "step"
        with_data = [r for r in runs if name in r.plots]
        if spec.stacked:
            for i, r in enumerate(with_data):
                suffix = f"_{i}" if len(with_data) > 1 else ""
                title = spec.title + (f": {r.name}" if len(with_data) > 1 else "")
                plots.append(Plot(name + suffix, title, xlabel, r.plots[name], stacked=True))
        else:
            plots.append(Plot(name, spec.title, xlabel, [c for r in with_data for c in r.plots[name]]))
    return plots


def run_names(dirs: list[Path]) -> list[str]:
    """Legend names: the directory's name, or its path below the directories' common parent where names repeat."""
    names = [d.name for d in dirs]
    if len(set(names)) == len(names):
        return names
    import os

    common = Path(os.path.commonpath([str(d.resolve()) for d in dirs]))
    return [str(d.resolve().relative_to(common)) or d.name for d in dirs]


# ---------------------------------------------------------------------------------------------- drawing


def draw(plot: Plot | Bars, path: Path) -> None:
    """One PNG. Several runs: one colour per run, one line style per metric; one run: one colour per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.0), dpi=100)
    try:
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        if isinstance(plot, Bars):
            shown = [v if v is not None else 0.0 for v in plot.values]
            bars = ax.bar(range(len(shown)), shown, color=[colours[2] if i == plot.best else "#9aa5b1"
                                                            for i in range(len(shown))])
            for i, v in enumerate(plot.values):
                ax.annotate("failed" if v is None else f"{v:.4g}" + (" (best)" if i == plot.best else ""),
                            (bars[i].get_x() + bars[i].get_width() / 2, shown[i]), ha="center", va="bottom",
                            fontsize=8)
            ax.set_xticks(range(len(shown)), plot.labels, rotation=20, ha="right", fontsize=8)
            ax.set_ylabel("objective")
        elif plot.stacked:
            c = plot.curves
            ax.stackplot(c[0].steps, *[cv.values for cv in c], labels=[PHASE_NAMES.get(cv.metric, cv.metric) for cv in c],
                         colors=colours[: len(c)], alpha=0.85)
            ax.set_xlabel(plot.xlabel)
            ax.legend(fontsize=8, loc="upper left")
        else:
            runs = list(dict.fromkeys(c.run for c in plot.curves))
            metrics = list(dict.fromkeys(c.metric for c in plot.curves))
            styles = ["-", "--", ":", "-."]
            for c in plot.curves:
                if len(runs) > 1:
                    colour = colours[runs.index(c.run) % len(colours)]
                    style = styles[metrics.index(c.metric) % len(styles)]
                    label = f"{c.run} · {c.metric}" if len(metrics) > 1 else c.run
                else:
                    colour, style, label = colours[metrics.index(c.metric) % len(colours)], "-", c.metric
                ax.plot(c.steps, c.values, style, color=colour, label=label,
                        marker="o" if len(c.steps) < 30 else None, markersize=3)
            ax.set_xlabel(plot.xlabel)
            if len(plot.curves) > 1 or len(runs) > 1:
                ax.legend(fontsize=7, loc="best")
        ax.set_title(plot.title, fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------- the page


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows) + "</table>"


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _run_section(run: RunData) -> str:
    parts = [f"<h2>{html.escape(run.name)}</h2>", _table(list(run.facts.items()))]
    # The top-level evaluation metrics and what the plots draw, less the per-group breakdowns.
    plotted = [c.metric for curves in run.plots.values() for c in curves]
    shown = sorted(k for k in run.final if k.count("/") == 1 and (k.startswith("eval/") or k in plotted))
    parts.append("<h3>Final metrics</h3>" + _table([(k, _fmt(run.final[k])) for k in shown]))
    parts.append("<details><summary>every metric's last value</summary>"
                 + _table([(k, _fmt(v)) for k, v in sorted(run.final.items())]) + "</details>")
    if run.before_after:
        parts.append(f"<h3>Before and after</h3><pre>{html.escape(run.before_after)}</pre>")
    if run.samples:
        cols = [k for k in run.samples[0] if k != "step"]
        head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td><pre>{html.escape(_fmt(s.get(c, '')))}</pre></td>" for c in cols)
                       + "</tr>" for s in run.samples)
        parts.append(f"<h3>Sample generations (step {html.escape(str(run.samples[0].get('step')))})</h3>"
                     f"<table><tr>{head}</tr>{body}</table>")
    return "\n".join(parts)


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;padding:2px 8px;text-align:left;"
        "vertical-align:top;font-size:90%}pre{margin:0;white-space:pre-wrap}img{max-width:100%;display:block;"
        "margin:1em 0}")


def render_html(title: str, runs: list[RunData], images: list[tuple[str, bytes]]) -> str:
    """The page: `images` are (plot title, PNG bytes), embedded; then each run's facts, final metrics, before/after
    table and samples."""
    figs = "\n".join(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                     for alt, png in images)
    sections = "\n".join(_run_section(r) for r in runs)
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n{figs}\n{sections}\n</body></html>\n")


# ---------------------------------------------------------------------------------------------- writing


def collect(dirs: list[Path]) -> tuple[list[RunData], list[Bars]]:
    """The runs of `dirs` (a sweep directory stands for its members) and one objective bar chart per sweep."""
    runs: list[RunData] = []
    bars: list[Bars] = []
    sweeps = [d for d in dirs if is_sweep_dir(d)]
    plain = [d for d in dirs if d not in sweeps]
    for d in plain:
        if not d.is_dir():
            raise ReportError(f"{d}: no such directory")
    for d, name in zip(plain, run_names(plain)):
        runs.append(run_data(d, name))
    for i, d in enumerate(sweeps):
        members = sweep_members(d)
        if not members:
            raise ReportError(f"{d}: a sweep directory without members yet")
        bars.append(sweep_bars(d, members, "sweep_objective" + (f"_{i}" if len(sweeps) > 1 else "")))
        prefix = f"{d.name} " if len(sweeps) > 1 else ""
        for m in members:
            if (Path(m["dir"]) / "metrics.jsonl").is_file():  # a failed member may have logged nothing
                runs.append(run_data(Path(m["dir"]), prefix + member_name(m)))
    return runs, bars


def write_report(dirs: list[Path], out_dir: Path) -> Path:
    """report.html and plots/*.png in `out_dir` for the runs and sweeps in `dirs`; returns the HTML's path."""
    runs, bars = collect([Path(d) for d in dirs])
    plots_dir = out_dir / PLOTS_DIR
    plots_dir.mkdir(parents=True, exist_ok=True)
    for old in plots_dir.glob("*.png"):  # a plot this report no longer has must not linger
        old.unlink()
    images = []
    for plot in [*bars, *report_plots(runs)]:
        path = plots_dir / f"{plot.name}.png"
        draw(plot, path)
        images.append((plot.title, path.read_bytes()))
    title = "tuneforge report: " + ", ".join(Path(d).name for d in dirs)
    report = out_dir / REPORT_FILE
    report.write_text(render_html(title, runs, images))
    return report


def write_report_quietly(run_dir: Path) -> None:
    """The report a run writes when it ends: a failure here is one warning line, never the run's failure.
    A run that logged no step yet (preempted or failed while loading) has no curves: no report, and no warning
    after the line that says how the run ended."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file() or not metrics.read_text().strip():
        return
    try:
        path = write_report([run_dir], run_dir)
        print(f"report: {path}", flush=True)
    except Exception as err:  # noqa: BLE001 (whatever went wrong, the run's own outcome stands)
        print(f"warning: no report for {run_dir} ({type(err).__name__}: {err}); "
              f"try python -m trainer.report {run_dir}", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run directories and/or sweep directories")
    parser.add_argument("--out", type=Path, default=None,
                        help="where report.html and plots/ go (default: the one directory given, else ./report)")
    args = parser.parse_args(argv)
    out = args.out or (args.dirs[0] if len(args.dirs) == 1 else Path("report"))
    try:
        path = write_report(args.dirs, out)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    print(f"report: {path} ({len(list((out / PLOTS_DIR).glob('*.png')))} plots in {out / PLOTS_DIR})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
