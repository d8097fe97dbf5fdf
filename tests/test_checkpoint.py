"""Checkpoints under faults, with real training processes: a full disk mid-save on one of two ranks, a torn
`latest`, a garbled pointer, failed saves' leftovers, and resume inputs that cannot work (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from runs import metric, run_stage, tiny_sft, write_sft_jsonl
from trainer.checkpoint import COMPLETE, LATEST, MANIFEST, latest_tag, prune, torn


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_sft_jsonl(tmp_path_factory.mktemp("data") / "sft.jsonl", 200)


@pytest.mark.distributed
def test_a_full_disk_mid_save_fails_every_rank_with_one_message_and_keeps_latest(tmp_path, data):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    # A two-rank checkpoint of this model is about 1.45 MB: the first fits, the second runs out of space.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2200k", "tmpfs", str(ckpts)], check=True)
    try:
        start = time.monotonic()
        proc = run_stage(run_dir, *tiny_sft(data), "train.max_steps=6", "train.save_every=2", "train.keep_last=3",
                         "train.micro_batch_size=2", "deepspeed=zero3", nproc=2, check=False, timeout=300)
        elapsed = time.monotonic() - start
        assert proc.returncode == 1, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, proc.stderr[-3000:]
        assert "step_00000004 was not saved (rank " in errors[0] and " MiB free there" in errors[0]
        assert errors[0].endswith(f"{ckpts / LATEST} still names step_00000002"), errors[0]
        assert (ckpts / LATEST).read_text() == "step_00000002"
        assert torn(ckpts / "step_00000002") is None  # the committed one is whole
        assert not (ckpts / "step_00000004").exists()  # the failed save's part is gone
        assert elapsed < 120, f"the ranks took {elapsed:.0f} s to stop"
    finally:
        subprocess.run(["umount", str(ckpts)], check=True)


@pytest.mark.distributed
def test_a_torn_latest_falls_back_to_the_previous_checkpoint_and_resumes_exactly(tmp_path, data):
    run_dir = tmp_path / "run"
    common = [*tiny_sft(data), "train.save_every=2", "train.keep_last=2", "train.micro_batch_size=4"]
    run_stage(run_dir, *common, "train.max_steps=4")
    first = metric(run_dir, "train/loss")
    ckpts = run_dir / "checkpoints"
    assert (ckpts / LATEST).read_text() == "step_00000004"
    biggest = max((p for p in (ckpts / "step_00000004").iterdir() if p.suffix == ".pt"), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])  # a crash mid-write, or a bad disk

    proc = run_stage(run_dir, *common, "train.max_steps=6", "resume=auto")
    assert f"warning: checkpoint {ckpts / 'step_00000004'} is not whole ({biggest} has " in proc.stderr
    assert f"using the newest whole one, {ckpts / 'step_00000002'}" in proc.stderr
    assert "resumed from" in proc.stdout and "step_00000002 at step 2" in proc.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    again = {r["step"]: r["train/loss"] for r in records[len(first):] if "train/loss" in r}
    assert sorted(again) == [3, 4, 5, 6]
    for step in (3, 4):  # the retrained steps repeat the first run's exactly
        assert again[step] == pytest.approx(first[step], rel=1e-5, abs=1e-6), (step, again[step], first[step])
    assert (ckpts / LATEST).read_text() == "step_00000006"
    assert torn(ckpts / "step_00000004") is None  # the torn one was saved again, whole


def _fake_checkpoint(root: Path, step: int, *, complete: bool = True, world_size: int = 1) -> Path:
    tag_dir = root / f"step_{step:08d}"
    tag_dir.mkdir(parents=True)
    (tag_dir / "model_states.pt").write_bytes(b"x" * 100)
    if complete:
        manifest = {"world_size": world_size, "files": {"model_states.pt": 100}}
        (tag_dir / MANIFEST).write_text(json.dumps(manifest))
        (tag_dir / COMPLETE).write_text(tag_dir.name)
    return tag_dir


def test_latest_is_verified_against_the_manifest_and_falls_back_with_a_warning(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 2)
    newest = _fake_checkpoint(root, 4)
    (root / LATEST).write_text("step_00000004")
    assert latest_tag(root) == "step_00000004" and capsys.readouterr().err == ""

    (newest / "model_states.pt").write_bytes(b"x" * 50)
    assert latest_tag(root) == "step_00000002"
    err = capsys.readouterr().err
    assert "model_states.pt has 50 bytes, the manifest says 100" in err and "step_00000002" in err

    (root / LATEST).write_text("\x00\x00garbage")  # a pointer cut by a crash of an older writer
    assert latest_tag(root) == "step_00000002"
    assert "holds '\\x00\\x00garbage'" in capsys.readouterr().err

    (root / "step_00000002" / "model_states.pt").unlink()
    assert latest_tag(root) is None
    assert "no other one is" in capsys.readouterr().err


def test_pruning_keeps_the_newest_and_removes_failed_saves(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _fake_checkpoint(root, step)
    _fake_checkpoint(root, 3, complete=False)  # a save that failed before its commit
    prune(root, keep_last=2, keep="step_00000006")
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004", "step_00000006"]


def test_resume_inputs_that_cannot_work_exit_2_naming_them(tmp_path, data):
    missing = tmp_path / "no_such_run"
    proc = run_stage(tmp_path / "a", *tiny_sft(data), "train.max_steps=2", f"resume={missing}", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: resume={missing}: no such directory"

    other = tmp_path / "two_ranks" / "checkpoints"
    _fake_checkpoint(other, 4, world_size=2)
    (other / LATEST).write_text("step_00000004")
    proc = run_stage(tmp_path / "b", *tiny_sft(data), "train.max_steps=2", f"resume={other.parent}", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: resume: checkpoint {other / 'step_00000004'} was written by 2 ranks, this run has 1")
    assert "rerun with 2 ranks (torchrun --nproc_per_node=2 -m trainer.sft" in last


def test_a_checkpoint_resumes_only_at_the_zero_stage_it_was_written_with(tmp_path, data):
    """ZeRO lays a checkpoint's files out by stage; the manifest records it, and a run that would train under
    another stage (here ZeRO-3 asked for on a checkpoint `auto` wrote unpartitioned) exits 2 naming the stage."""
    run_dir = tmp_path / "run"
    run_stage(run_dir, *tiny_sft(data), "train.max_steps=2", "train.save_every=2")
    tag = run_dir / "checkpoints" / "step_00000002"
    assert json.loads((tag / MANIFEST).read_text())["zero_stage"] == 0
    proc = run_stage(tmp_path / "again", *tiny_sft(data), "train.max_steps=4", "deepspeed=zero3", f"resume={run_dir}",
                     check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: resume: checkpoint {tag} was written under ZeRO stage 0, this run trains under stage 3; a checkpoint "
        f"resumes at its own stage: rerun with deepspeed.stage=0")
