"""bench.default_pipeline's accounting of a stage's processes and memory, on a real child process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from bench.default_pipeline import logged_peak_memory, process_kind, tables, value_fit, watch


def test_process_kinds_name_actors_modules_and_programs():
    def argv(*words: str) -> bytes:
        return b"\0".join(w.encode() for w in words) + b"\0"

    assert process_kind(argv("ray::PolicyWorker.generate" + " " * 40)) == "ray::PolicyWorker"
    assert process_kind(argv("ray::IDLE")) == "ray::IDLE"
    assert process_kind(argv("/venv/bin/python", "-m", "rlhf.ppo", "algo=grpo")) == "python -m rlhf.ppo"
    assert process_kind(argv("/venv/bin/python3.11", "-u", "/venv/lib/ray/dashboard/agent.py", "--x=1")) == \
        "python agent.py"
    assert process_kind(argv("/venv/lib/ray/core/src/ray/raylet/raylet", "--node=1")) == "raylet"
    assert process_kind(b"") == "?"


def test_the_logged_peaks_are_each_memory_metrics_largest_value(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "policy/memory_gb": 0.5, "critic/memory_gb": 0.25, "train/loss": 3.0},
        {"step": 2, "policy/memory_gb": 0.75, "critic/memory_gb": 0.125}]))
    assert logged_peak_memory(tmp_path) == {"policy/memory_gb": 0.75, "critic/memory_gb": 0.25}
    assert logged_peak_memory(tmp_path / "missing") == {}


def test_the_critics_fit_is_the_mean_of_its_first_and_last_iterations_and_gets_a_table(tmp_path):
    rows = [{"step": 0, "eval/exact_match": 0.1}]  # the evaluation before training: no critic metrics
    rows += [{"step": i, "value/explained_variance": i / 10, "critic/loss": 1 / i} for i in range(1, 8)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fit = value_fit(tmp_path, window=2)
    assert fit["value/explained_variance"] == {"first": pytest.approx(0.15), "last": pytest.approx(0.65), "window": 2}
    assert fit["critic/loss"]["first"] == 0.75 and abs(fit["critic/loss"]["last"] - (1 / 6 + 1 / 7) / 2) < 1e-12
    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo" / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/score_mean": 0.5}) + "\n")
    assert value_fit(tmp_path / "grpo") == {}  # no critic
    stage = {"command": "python -m rlhf.ppo", "wall_s": 60.0, "load_average_before": [0.1, 0, 0], "value_fit": fit}
    assert "| `python -m rlhf.ppo` | 0.150 -> 0.650 (2 each) | 0.750 -> 0.155 (2 each) |" in tables({"stages": [stage]})


def test_watch_counts_the_marked_processes_and_their_peak_memory():
    """A marked parent holding 64 MiB starts a marked child holding 192 MiB; an unmarked process beside them
    (this one) is not counted."""
    child = "x = bytearray(192 * 2**20); import time; time.sleep(2)"
    parent = (f"import subprocess, sys; x = bytearray(64 * 2**20); "
              f"subprocess.run([sys.executable, '-c', {child!r}], check=True)")
    env = {**os.environ, "BENCH_STAGE_MARK": "test-mark"}
    proc = subprocess.Popen([sys.executable, "-c", parent], env=env)
    seen = watch(proc, "BENCH_STAGE_MARK=test-mark", every_s=0.1)
    assert proc.returncode == 0
    assert seen["processes"] == 2 and seen["process_kinds"] == {"python -c": 2}
    assert 0.25 <= seen["peak_resident_gb"] < 0.5  # both buffers (and two interpreters) at once


# ---------------------------------------------------------------------------------------------------- bench.harness

STAT = """cpu  {user} 0 {system} {idle} 0 0 0 0 0 0
cpu0 0 0 0 0 0 0 0 0 0 0
cpu1 0 0 0 0 0 0 0 0 0 0
intr 12345
"""


def test_busy_cores_counts_the_busy_share_of_every_core():
    from bench.harness import busy_cores

    before = STAT.format(user=1000, system=500, idle=3000)
    # 200 jiffies pass on 2 cores: 50 busy (user 30 + system 20), 150 idle -> a quarter of 2 cores.
    after = STAT.format(user=1030, system=520, idle=3150)
    assert busy_cores(before, after) == 0.5
    assert busy_cores(before, before) == 0.0  # no tick between the readings: nothing measured, nothing busy


def test_model_parameters_count_the_built_model_with_tied_weights_once():
    from bench.harness import model_parameters
    from trainer.compose import compose

    model = compose("sft", []).model
    assert model_parameters(model) == 857_216  # the embedded default's 0.86M (README)
    # The LM head is tied to the embedding (counted once); the score head adds hidden (128) x 1 label.
    assert model_parameters(model, scalar_head=True) == 857_216 + 128


@pytest.mark.parametrize("stage,lr", [("sft", 3e-3), ("reward", 1e-3), ("dpo", 5e-5)])
def test_the_trl_side_gets_the_rate_tuneforge_trains_at(tmp_path, stage, lr):
    """`optim.lr: auto` (DPO's default) reaches TRL as the number it becomes, not the string."""
    from bench.harness import trl_spec
    from trainer.compose import compose
    from trainer.config import resolve_lr

    job = compose(stage, [])
    assert resolve_lr(job.optim, job.peft.method).lr == lr
    assert trl_spec(job, tmp_path / "data.jsonl", 2)["lr"] == lr


def test_compare_records_parameters_cleanliness_quietness_and_paired_ratios(tmp_path, monkeypatch, capsys):
    """compare end to end with a fake run per system: no training, no sleeping."""
    import argparse

    from bench import harness

    c = harness.Comparison(name="fake", stage="sft", data="sft", data_columns=(), tuneforge_overrides=(),
                           systems=("tf", "trl"), trl_systems=("trl",), counts={"tokens": "tok"},
                           sizes={"steps": 4}, size_help={"steps": ""})
    busy = iter([0.1, 0.9, 0.0, 0.0])  # the second run (trl, repeat 0) finds another process busy
    monkeypatch.setattr(harness, "measure_busy_cores", lambda: next(busy))
    monkeypatch.setattr(harness, "machine_info", lambda threads, trl_python=None: {
        "cpu": "fake", "logical_cores": 2, "torch": "x", "trl": "y"})
    monkeypatch.setattr(harness, "code_version", lambda: {"commit": "abcdef0123", "clean": False,
                                                          "changed_files": ["bench/harness.py"]})
    speed = {("tf", 0): 20.0, ("trl", 0): 10.0, ("tf", 1): 30.0, ("trl", 1): 10.0}
    repeat = {"tf": -1, "trl": -1}

    def run_system(system, run_dir):
        repeat[system] += 1
        per_s = speed[system, repeat[system]]
        return [{"step": s, "time": s * 100 / per_s, "tokens": 100, "loss": 1.0} for s in range(1, 5)], 1.0

    args = argparse.Namespace(repeats=2, systems=["tf", "trl"], threads=2, steps=4, skip_steps=1, loss_window=2,
                              profile=False, out=tmp_path / "fake.json")
    setup = harness.Setup(tmp_path, tmp_path / "data.jsonl", 10, [], None, parameters=1234)
    harness.compare(args, c, setup, run_system, recorded={}, argv=[])
    result = json.loads(args.out.read_text())
    out = capsys.readouterr().out
    assert result["parameters"] == 1234 and result["code"]["clean"] is False
    assert "warning: the tree differs" in out and "warning: 0.90 cores busy" in out
    assert [r["loaded"] for r in result["runs"]] == [False, True, False, False] and result["loaded_runs"] == 1
    assert [r["busy_cores_before"] for r in result["runs"]] == [0.1, 0.9, 0.0, 0.0]
    paired = result["paired"]["tf"]["trl"]["tokens_per_s"]
    assert paired["per_repeat"] == [2.0, 3.0] and paired["median"] == 2.5
    assert "2.50x (2.00-3.00)" in out  # the printed headline is the paired median with its spread


def test_a_floor_timed_in_each_repeat_pairs_every_systems_share_with_its_own_repeat(tmp_path, monkeypatch):
    """With a floor, compare times it after each repeat's runs and divides each run by its own repeat's floor:
    a machine that drifts between repeats moves the runs and their floor together."""
    import argparse

    from bench import harness
    from bench.tables import render

    c = harness.Comparison(name="fake", stage="sft", data="sft", data_columns=(), tuneforge_overrides=(),
                           systems=("tf", "trl"), trl_systems=("trl",), counts={"tokens": "tok"},
                           sizes={"steps": 4}, size_help={"steps": ""})
    busy = iter([0.0, 0.0, 0.0, 0.0, 0.0, 0.9])  # tf, trl, floor per repeat: the second floor finds the machine busy
    monkeypatch.setattr(harness, "measure_busy_cores", lambda: next(busy))
    monkeypatch.setattr(harness, "machine_info", lambda threads, trl_python=None: {
        "cpu": "fake", "logical_cores": 2, "torch": "x", "trl": "y"})
    monkeypatch.setattr(harness, "code_version", lambda: {"commit": "abcdef0123", "clean": True, "changed_files": []})
    slow = {0: 1.0, 1: 0.5}  # the machine runs at half speed in the second repeat
    order = []

    def run_system(system, run_dir):
        order.append(run_dir.name)
        per_s = {"tf": 18.0, "trl": 12.0}[system] * slow[int(run_dir.name[-1])]
        return [{"step": s, "time": s * 100 / per_s, "tokens": 100, "loss": 1.0} for s in range(1, 5)], 1.0

    def floor(run_dir):
        order.append(run_dir.name)
        return 20.0 * slow[int(run_dir.name[-1])]

    args = argparse.Namespace(repeats=2, systems=["tf", "trl"], threads=2, steps=4, skip_steps=1, loss_window=2,
                              profile=False, out=tmp_path / "results" / "fake.json")
    setup = harness.Setup(tmp_path, tmp_path / "data.jsonl", 10, [], None, parameters=1234)
    harness.compare(args, c, setup, run_system, recorded={}, argv=[], floor=floor)
    assert order == ["tf-r0", "trl-r0", "floor-r0", "tf-r1", "trl-r1", "floor-r1"]
    result = json.loads(args.out.read_text())
    assert result["floor"]["per_repeat"] == [20.0, 10.0]
    assert result["floor"]["busy_cores_before"] == [0.0, 0.9] and result["floor"]["loaded"] == 1
    assert result["floor"]["shares"]["tf"]["per_repeat"] == pytest.approx([0.9, 0.9])
    assert result["floor"]["shares"]["trl"]["median"] == pytest.approx(0.6)
    result["command"] = "python -m bench.fake"
    monkeypatch.setitem(sys.modules, "bench.fake", SimpleNamespace(FAKE=c))  # where bench.tables finds `c`
    (tmp_path / "results" / "fake.json").write_text(json.dumps(result))
    table = render("fake.json floor_shares", tmp_path / "results")
    assert re.search(r"\|\s+tf \|\s+0\.90 \(0\.90-0\.90\) \|\s+0\.90, 0\.90 \|", table), table
    assert "20.00, 10.00; floors timed on a busy machine: 1 of 2" in table
    assert "the floor against trl 1.67x (1.67-1.67), paired median (min-max)" in table  # 20 / 12 and 10 / 6


def test_the_sft_floor_replays_a_tuneforge_runs_steps_with_its_arithmetic(tmp_path):
    """bench.sft_floor, a plain PyTorch loop, trains the steps of the tuneforge SFT run its overrides describe:
    every step's tokens and loss are the run's (the same model, batches, loss, AdamW and clipping), so the floor
    times the same arithmetic without tuneforge's loop around it. The rate tuneforge trains at is `optim.lr: auto`'s
    here, which the floor resolves as the run does."""
    from tests.runs import TINY, metric, run_env, run_stage, write_sft_jsonl

    overrides = [*TINY, f"data.path={write_sft_jsonl(tmp_path / 'train.jsonl', 96)}", "data.eval_path=null",
                 "train.max_steps=5", "train.micro_batch_size=4", "train.grad_accum=1", "optim.warmup_steps=0"]
    run_stage(tmp_path / "run", *overrides)
    floor_dir = tmp_path / "floor"
    floor_dir.mkdir()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"overrides": overrides, "output_dir": str(floor_dir)}))
    proc = subprocess.run([sys.executable, "-m", "bench.sft_floor", str(spec)], env=run_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    floor = [json.loads(line) for line in (floor_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in floor] == [1, 2, 3, 4, 5]
    seen = metric(tmp_path / "run", "train/tokens_seen")
    assert [r["tokens"] for r in floor] == [seen[s] - seen.get(s - 1, 0) for s in range(1, 6)]
    losses = metric(tmp_path / "run", "train/loss")
    assert [r["loss"] for r in floor] == pytest.approx([losses[s] for s in range(1, 6)], rel=1e-5)
    assert losses[5] < losses[1] - 0.05  # the weights moved between steps: later losses test the update too


# ---------------------------------------------------------------------------------------------------- bench.tables


def fake_result(**extra) -> dict:
    """A small reward_vs_trl file: two repeats of tuneforge-auto and trl."""
    runs = [{"system": s, "repeat": r, "pairs_per_s": v, "tokens_per_s": 10 * v, "padded_tokens_per_s": 20 * v}
            for (s, r), v in {("tuneforge-auto", 0): 200.0, ("trl", 0): 100.0,
                              ("tuneforge-auto", 1): 330.0, ("trl", 1): 110.0}.items()]
    return {"command": "python -m bench.reward_vs_trl --steps 40", "code": {"commit": "0123456789abc",
            "changed_files": []}, "machine": {"cpu": "Fake CPU", "logical_cores": 2, "threads": 2}, "runs": runs,
            "medians": {"tuneforge-auto": {"pairs_per_s": 265.0}, "trl": {"pairs_per_s": 105.0}},
            "vs_trl": {"tuneforge-auto": {"trl": {"final_loss_rel_diff": 0.0123}}}, **extra}


def test_the_ratios_view_shows_paired_ratios_and_unrecorded_for_what_an_old_file_lacks():
    from bench.tables import ratios_view

    old = ratios_view("reward_vs_trl.json", fake_result())
    # Paired from the runs (2.0x and 3.0x), not the ratio of medians (2.52x); nothing guessed for missing fields.
    row = re.search(r"\| +tuneforge-auto \| +trl \| +2\.50x \(2\.00-3\.00\) \|.*", old)
    assert row and "265.0" in row[0] and "105.0" in row[0] and "+1.23%" in row[0]
    assert "commit 0123456 (tree state unrecorded)" in old
    assert "parameters: unrecorded" in old and "runs started on a busy machine: unrecorded" in old
    new = ratios_view("reward_vs_trl.json", fake_result(
        parameters=857344, loaded_runs=1, code={"commit": "0123456789abc", "clean": False, "changed_files": ["x"]}))
    assert "commit 0123456 (dirty tree)" in new and "parameters: 857,344" in new
    assert "runs started on a busy machine: 1 of 4" in new
    # Another bench's result file, written before this one started, changes no measurement.
    chained = ratios_view("reward_vs_trl.json", fake_result(code={
        "commit": "0123456789abc", "clean": False, "changed_files": ["bench/results/sft_vs_trl.json"]}))
    assert "commit 0123456 (clean tree)" in chained


def test_a_reference_system_is_paired_against_as_trl_is_and_never_against_itself():
    from bench.harness import paired_ratios

    runs = [{"system": system, "repeat": repeat, "tok_per_s": rate}
            for repeat, rates in enumerate([(30.0, 20.0, 10.0), (36.0, 18.0, 12.0)])
            for system, rate in zip(("tuneforge-auto", "tuneforge-auto-masked", "trl"), rates)]
    paired = paired_ratios(runs, ["tok"], ["trl"], ["tuneforge-auto-masked"])
    assert paired["tuneforge-auto"]["tuneforge-auto-masked"]["tok_per_s"]["per_repeat"] == [1.5, 2.0]
    assert paired["tuneforge-auto"]["trl"]["tok_per_s"]["per_repeat"] == [3.0, 3.0]
    assert list(paired["tuneforge-auto-masked"]) == ["trl"]
    assert "trl" not in paired


def test_a_tree_changed_only_in_results_and_docs_measures_its_commit():
    from bench.harness import changes_no_measurement

    assert changes_no_measurement([]) and changes_no_measurement(["bench/results/a.json", "docs/benchmarks.md"])
    assert not changes_no_measurement(["bench/results/a.json", "bench/harness.py"])
    assert not changes_no_measurement(["conf/sft.yaml"])


def test_a_stale_table_is_named_and_regenerating_fixes_it(tmp_path):
    from bench.tables import regenerate, stale

    (tmp_path / "reward_vs_trl.json").write_text(json.dumps(fake_result()))
    doc = "# Doc\n\ntext\n<!-- table: reward_vs_trl.json -->\n| hand | copied |\n<!-- /table -->\nmore\n"
    assert stale(doc, tmp_path) == ["line 4: reward_vs_trl.json"]
    fresh = regenerate(doc, tmp_path)
    assert stale(fresh, tmp_path) == [] and "2.50x (2.00-3.00)" in fresh and fresh.endswith("<!-- /table -->\nmore\n")


def test_the_docs_tables_are_what_the_result_files_give():
    """`python -m bench.tables --check` on the real docs: a hand-edited table, a result file rewritten without
    regenerating the docs, or a vs-TRL result file no table shows fails here."""
    from bench.tables import main

    assert main(["--check"]) == 0


def test_a_pipeline_stage_is_summed_up_from_its_evaluation_or_its_before_after_table():
    from bench.default_pipeline import stage_result

    sft = {"final_eval": {"eval/exact_match": 0.382, "eval/em_split/trained_families_seen_phrasing": 0.995,
                          "eval/em_split/trained_families_heldout_phrasing": 0.15}}
    assert stage_result(sft) == ("exact match 99.5% on seen phrasings of the trained families, 15.0% on their "
                                 "held-out phrasings, 38.2% on all held-out prompts")
    reward = {"final_eval": {"eval/accuracy": 0.818, "eval/accuracy/trained_families_seen_phrasing": 0.97}}
    assert stage_result(reward) == "pairwise accuracy 97.0% on new pairs of the trained families, 81.8% on all held-out pairs"
    grpo = {"before_after": {"eval/exact_match": {"start": 0.382, "grpo": 0.388},
                             "eval/exact_match_sampled": {"start": 0.296, "grpo": 0.351}}}
    assert stage_result(grpo) == ("greedy exact match 38.2% -> 38.8% on all held-out prompts; sampled exact match "
                                  "29.6% -> 35.1%")


def test_a_table_naming_a_missing_result_file_is_one_error_line(tmp_path, monkeypatch, capsys):
    import bench.tables as tables

    (tmp_path / "README.md").write_text("<!-- table: nowhere.json -->\n<!-- /table -->\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "benchmarks.md").write_text("")
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    assert tables.main([]) == 2
    assert capsys.readouterr().err.strip().startswith("error: README.md: no result file ")


# A fresh process frees 20 x 8 MiB it wrote, then allocates and writes them again: the page faults of the second
# round (the kernel handing out zeroed pages again) are what the floor's allocator setting saves.
SECOND_ROUND_FAULTS = """
import ctypes, resource, sys
if sys.argv[1] == "kept":
    from bench.ppo_floor import keep_freed_memory
    print(keep_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def one_round(n=20, size=8 << 20):
    blocks = [libc.malloc(size) for _ in range(n)]
    for b in blocks:
        libc.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
libc.free(libc.malloc(8 << 20))  # glibc's dynamic threshold adapts to the size first
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt")
def test_the_floor_keeps_freed_memory_where_glibc_defaults_give_it_back():
    """bench.ppo_floor's pieces run with glibc keeping what a step frees: the second round of the same allocations
    faults almost nothing in again, where glibc's defaults fault it all in."""
    from runs import REPO

    def second_round(mode: str) -> list[str]:
        return subprocess.run([sys.executable, "-c", SECOND_ROUND_FAULTS, mode], cwd=REPO, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout.split("\n")

    pages = 20 * (8 << 20) // os.sysconf("SC_PAGE_SIZE")
    said, faults, _ = second_round("kept")
    assert said.startswith("allocator: glibc keeps freed memory") and int(faults) < pages // 10, (said, faults)
    faults, _ = second_round("defaults")
    assert int(faults) > pages // 2, "glibc's defaults give the memory back (else the test proves nothing)"
