"""trainer.report on written metrics: several runs overlaid, a sweep's members, and the one-line errors of a
directory it cannot read. The reports of real runs are checked where those runs are made (test_training,
test_dpo, test_grpo, test_sweeps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from reports import assert_report
from runs import REPO, run_env


def fake_run(run_dir: Path, stage: str, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"stage: {stage}\nmodel:\n  name_or_path: null\ndata:\n  path: x.jsonl\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"time": 1.0e9 + r["step"], **r}) + "\n"
                                                   for r in records))
    return run_dir


def sft_records(scale: float) -> list[dict]:
    train = [{"step": s, "train/loss": scale / s, "train/lr": 1e-3, "train/grad_norm": 1.0 + s,
              "train/tokens_per_s": 100.0 * s} for s in range(1, 6)]
    return train + [{"step": 5, "eval/loss": scale, "eval/exact_match": 0.5, "eval/em/addition": 0.25,
                     "eval/em/addition/seen_phrasing": 0.5, "eval/em_split/trained_families_seen_phrasing": 0.75}]


def test_several_runs_overlay_their_curves_one_colour_each(tmp_path):
    from trainer.report import main, report_plots, run_data

    # Same directory name twice: the legend names them by their paths below the common parent.
    a = fake_run(tmp_path / "x" / "run", "sft", sft_records(1.0))
    b = fake_run(tmp_path / "y" / "run", "instruct", sft_records(2.0))
    assert main([str(a), str(b), "--out", str(tmp_path / "out")]) == 0
    plots = assert_report(tmp_path / "out", [a, b], {"loss", "lr", "grad_norm", "tokens_per_s", "exact_match_family",
                                                     "exact_match_split"})
    loss = next(p for p in plots if p.name == "loss")
    assert [(c.run, c.metric) for c in loss.curves] == [("x/run", "train/loss"), ("x/run", "eval/loss"),
                                                       ("y/run", "train/loss"), ("y/run", "eval/loss")]
    family = next(p for p in plots if p.name == "exact_match_family")
    assert {c.metric for c in family.curves} == {"eval/exact_match", "eval/em/addition"}  # families, not phrasings
    page = (tmp_path / "out" / "report.html").read_text()
    assert "x/run" in page and "y/run" in page and "x.jsonl" in page
    assert report_plots([run_data(a)])[0].curves[0].values == [1.0, 0.5, 1 / 3, 0.25, 0.2]


def test_rl_phase_times_stack_once_per_run(tmp_path):
    from trainer.report import report_plots, run_data

    recs = [{"step": s, "reward/score_raw_mean": 0.1 * s, "time/generate_s": 1.0, "time/forward_s": 0.5,
             "time/train_s": 2.0, "time/iteration_s": 3.5} for s in (1, 2, 3)]
    runs = [run_data(fake_run(tmp_path / n, "ppo", recs)) for n in ("a", "b")]
    stacked = [p for p in report_plots(runs) if p.stacked]
    assert [p.name for p in stacked] == ["rl_phase_times_0", "rl_phase_times_1"]
    assert [c.metric for c in stacked[0].curves] == ["time/generate_s", "time/forward_s", "time/train_s"]


@pytest.mark.parametrize("case", ["no directory", "no metrics", "cut short", "empty"])
def test_a_directory_it_cannot_read_exits_2_with_one_line(tmp_path, case):
    run = tmp_path / "run"
    if case != "no directory":
        run.mkdir()
    if case == "cut short":
        (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')
    if case == "empty":
        (run / "metrics.jsonl").write_text("")
    proc = subprocess.run([sys.executable, "-m", "trainer.report", str(run)], cwd=REPO, env=run_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line, = proc.stderr.strip().splitlines()
    expected = {"no directory": "no such directory", "no metrics": "metrics.jsonl: not found",
                "cut short": "line 2 is cut short", "empty": "empty"}[case]
    assert line.startswith(f"error: {run}") and expected in line, line
    assert not (run / "report.html").exists()


def test_the_report_a_run_writes_when_it_ends_is_silent_only_when_nothing_was_logged(tmp_path, capsys):
    from trainer.report import write_report_quietly

    nothing = tmp_path / "nothing"
    nothing.mkdir()
    write_report_quietly(nothing)  # stopped while loading: its own line says so, the last line stays the command
    (nothing / "metrics.jsonl").write_text("\n")
    write_report_quietly(nothing)
    assert capsys.readouterr().out == "" and not (nothing / "report.html").exists()

    broken = fake_run(tmp_path / "broken", "sft", sft_records(1.0))
    with open(broken / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')
    write_report_quietly(broken)
    assert capsys.readouterr().out.startswith(f"warning: no report for {broken} (ReportError: ")

    fine = fake_run(tmp_path / "fine", "sft", sft_records(1.0))
    write_report_quietly(fine)
    assert capsys.readouterr().out == f"report: {fine / 'report.html'}\n" and (fine / "report.html").is_file()
