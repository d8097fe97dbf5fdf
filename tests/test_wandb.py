"""W&B as a user meets it: `logger=wandb` with no WANDB_API_KEY (and no WANDB_MODE) runs offline with one
note and never a prompt, and the sample tables it logs are the rows of samples.jsonl, read back from the
offline run's records (tests/wandb_records.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from runs import REPO, TINY, run_env, write_sft_jsonl
from wandb_records import read_offline_run


@pytest.fixture(scope="module")
def keyless_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """An SFT run with `logger=wandb` as a user without a key starts it: no WANDB_API_KEY, no WANDB_MODE, stdin
    closed (a login prompt would fail or hang there, caught by the timeout), evaluating with generation."""
    root = tmp_path_factory.mktemp("wandb")
    data, run_dir = write_sft_jsonl(root / "sft.jsonl", 32), root / "run"
    env = run_env()
    for key in ("WANDB_API_KEY", "WANDB_MODE"):
        env.pop(key, None)
    overrides = [o for o in TINY if o != "train.eval_every=0"]
    cmd = [sys.executable, "-m", "trainer.sft", *overrides, f"data.path={data}", "data.eval_path=synthetic:sft",
           "train.max_steps=2", "train.micro_batch_size=4", "train.eval_every=2", "train.eval_generate_samples=6",
           "train.eval_max_new_tokens=4", "logger=wandb", "logger.num_sample_generations=4", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


@pytest.mark.distributed
def test_without_a_key_wandb_runs_offline_with_one_note_and_no_prompt(keyless_run):
    run_dir, proc = keyless_run
    notes = [line for line in proc.stderr.splitlines() if "W&B" in line or "wandb" in line.lower()]
    assert notes == [f"note: W&B logs offline (no WANDB_API_KEY in the environment) to {run_dir / 'wandb'}; "
                     f"upload it later with `wandb sync {run_dir / 'wandb'}/offline-run-*`"], notes
    assert "api key" not in (proc.stdout + proc.stderr).lower()  # no login prompt or its text
    run_file, = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    run = read_offline_run(run_file)
    assert run.run_id == (run_dir / "wandb_run_id").read_text() and run.job_type == "sft"
    assert any("train/loss" in h for h in run.history)


@pytest.mark.distributed
def test_wandb_sample_table_holds_the_rows_of_samples_jsonl(keyless_run):
    run_dir, _ = keyless_run
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {s["step"] for s in samples} == {2}
    run_file, = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    # The history holds a reference to the table's file, its fields as nested keys ("eval/samples/path", ...).
    tables = [(h["_step"], {k.removeprefix("eval/samples/"): v for k, v in h.items() if k.startswith("eval/samples/")})
              for h in read_offline_run(run_file).history]
    tables = [t for t in tables if t[1]]
    assert len(tables) == 1, tables
    step, ref = tables[0]
    assert step == 2 and ref["_type"] == "table-file" and (ref["nrows"], ref["ncols"]) == (4, 4), ref
    table = json.loads((run_file.parent / "files" / ref["path"]).read_text())
    columns = ["prompt", "answer", "generated", "match"]
    assert table["columns"] == columns
    assert table["data"] == [[s[c] for c in columns] for s in samples]
