"""Crash-safe DeepSpeed checkpoints with everything exact resume needs.

Layout under `<run_dir>/checkpoints/`:
    step_00000400/        DeepSpeed's files (model, optimizer, scheduler, client_state); without frozen
                          weights (peft adapters): only what trains and its optimizer state
        rng_rank{r}.pt    this rank's torch/python/numpy RNG states
        MANIFEST.json     every file and its size, and the world size (written at commit)
        FROZEN_FROM       with peft adapters: the model source of the frozen weights left out
        COMPLETE          written last, once every rank has voted its part whole
    latest                name of the newest COMPLETE checkpoint (atomic rename)

A save commits in three steps: every rank writes its part and fsyncs what it can see; the ranks vote (one
rank's failure, say a full disk, fails the save on every rank with one message and `latest` unchanged); rank
0 writes the manifest and COMPLETE, fsyncs the directory and only then moves `latest`. Loading verifies the
manifest: a torn `latest` (a file missing or cut short) falls back to the newest checkpoint that is whole,
with a warning naming both. Step directories of failed saves are removed, old ones pruned to the last K only
after `latest` has moved.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from trainer.config import ConfigError

LATEST = "latest"
COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
# In a checkpoint without frozen weights (peft adapters): where they come from, read before the checkpoint loads.
FROZEN_FROM = "FROZEN_FROM"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_tensors(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _numpy_state_to_tensors(state):
    # weights_only loading accepts tensors and primitives, not numpy arrays.
    name, keys, pos, has_gauss, cached = state
    return (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)


def _restore_rng(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class CheckpointError(RuntimeError):
    """A save that some rank could not complete; `latest` still names the previous checkpoint."""


def save_checkpoint(engine, ckpt_root: Path, step: int, client_state: dict, keep_last: Optional[int]) -> Path:
    """Collective: every rank must call it. Raises CheckpointError on every rank when any rank failed.
    `keep_last=None` prunes nothing (the RL driver prunes once its own state has committed)."""
    rank = dist.get_rank()
    tag = tag_for(step)
    tag_dir = ckpt_root / tag
    if torn(tag_dir) is None:
        # Same step already saved (a resumed run that had nothing left to do):
        # never write over a good checkpoint.
        return tag_dir
    if rank == 0 and tag_dir.exists():
        # Leftovers of a failed save of this step, or a torn one that resume passed over. The other ranks
        # wait in DeepSpeed's first barrier below, so nothing of theirs is written yet.
        shutil.rmtree(tag_dir)
    error = None
    deepspeed_done = False
    try:
        engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=False,
                               exclude_frozen_parameters=has_frozen_parameters(engine))
        deepspeed_done = True
        rng_file = tag_dir / f"rng_rank{rank}.pt"
        torch.save(_rng_state(), rng_file)
        # DeepSpeed's closing barrier has passed: every rank's shards are in place, so each rank flushes
        # whatever its node wrote (on a shared filesystem only the writer's node can).
        _fsync_files(tag_dir)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError about positions
        error = _describe(e, ckpt_root)
        if not deepspeed_done:
            dist.barrier()  # the closing barrier of DeepSpeed's save, which the other ranks are waiting in
    failures = _vote(error)
    if not failures and rank == 0:
        try:
            _commit(ckpt_root, tag, dist.get_world_size(), engine.zero_optimization_stage(), keep_last,
                    client_state.get("frozen_from", ""))
        except OSError as e:
            error = "commit: " + _describe(e, ckpt_root)
    failures = failures or _vote(error)
    if failures:
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        previous = latest_tag(ckpt_root)
        raise CheckpointError(f"checkpoint {tag_dir} was not saved ({'; '.join(failures)}); "
                              f"{ckpt_root / LATEST} still names {previous or 'no checkpoint'}")
    return tag_dir


def _describe(err: BaseException, ckpt_root: Path) -> str:
    """One line for a failed write, with the free space left where it was written (torch.save reports a
    full disk only as an unexpected file position)."""
    lines = str(err).strip().splitlines() or [""]
    try:
        free = f"; {shutil.disk_usage(ckpt_root).free / 2**20:.1f} MiB free there"
    except OSError:
        free = ""
    return f"{type(err).__name__}: {lines[0]}{free}"


def _vote(error: Optional[str]) -> list[str]:
    """Collective: every rank's error, `rank r: ...`, empty when every rank succeeded."""
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return [f"rank {r}: {e}" for r, e in enumerate(errors) if e]


def _fsync_files(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(ckpt_root: Path, tag: str, world_size: int, zero_stage: int, keep_last: Optional[int],
            frozen_from: str) -> None:
    """Rank 0, once every rank's part is whole and flushed: FROZEN_FROM (adapters), manifest, COMPLETE, then
    `latest`."""
    tag_dir = ckpt_root / tag
    if frozen_from:
        atomic_write(tag_dir / FROZEN_FROM, frozen_from)
    files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
    atomic_write(tag_dir / MANIFEST, json.dumps({"world_size": world_size, "zero_stage": zero_stage, "files": files},
                                                indent=1))
    atomic_write(tag_dir / COMPLETE, tag)
    _fsync_dir(tag_dir)
    atomic_write(ckpt_root / LATEST, tag)
    if keep_last is not None:
        prune(ckpt_root, keep_last, keep=tag)


def has_frozen_parameters(engine) -> bool:
    """Whether part of the model is frozen (peft adapters on a frozen base). Its checkpoints leave the frozen
    weights out: they never change, and a resumed run rebuilds them from the same model source (trainer.run
    checks that it is the same)."""
    return any(not p.requires_grad for p in engine.module.parameters())


def atomic_write(path: Path, text: str) -> None:
    """Write, flush to disk, rename over `path`, and flush the rename: a crash leaves the old or the new text."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def prune(ckpt_root: Path, keep_last: int, keep: str) -> None:
    """Keep the newest `keep_last` complete checkpoints (and `keep`); remove older ones and the step
    directories of failed saves. Called only after `latest` names `keep`."""
    steps = sorted(ckpt_root.glob("step_*"))
    complete = [p for p in steps if (p / COMPLETE).exists()]
    for old in complete[:-keep_last] + [p for p in steps if p not in complete]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def find_resume_dir(resume: str | None, output_dir: Path) -> tuple[Path, str] | None:
    """Map the `resume` setting to (checkpoints root, tag), or None to start fresh.

    auto: the latest whole checkpoint under this run's output_dir, if any.
    A path: a run directory, its `checkpoints/` directory, or one `step_*` directory.
    """
    if resume is None:
        return None
    if resume == "auto":
        root = output_dir / "checkpoints"
        tag = latest_tag(root)
        return (root, tag) if tag else None
    path = Path(resume)
    if not path.exists():
        raise FileNotFoundError(f"resume={resume}: no such directory")
    if (path / COMPLETE).exists():
        problem = torn(path)
        if problem:
            raise FileNotFoundError(f"resume={resume}: this checkpoint is not whole ({problem})")
        return path.parent, path.name
    for root in (path / "checkpoints", path):
        tag = latest_tag(root)
        if tag:
            return root, tag
    raise FileNotFoundError(f"resume={resume}: no complete checkpoint found there (looked for {LATEST} and {COMPLETE})")


def torn(tag_dir: Path) -> Optional[str]:
    """What is wrong with a checkpoint directory (None when it is whole): no COMPLETE, or a file of its
    manifest missing or of another size. Checkpoints written before manifests existed count as whole."""
    if not (tag_dir / COMPLETE).exists():
        return f"{tag_dir.name} has no {COMPLETE} marker"
    manifest = tag_dir / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as e:
        return f"{manifest} is unreadable ({e})"
    for name, size in files.items():
        path = tag_dir / name
        try:
            actual = path.stat().st_size
        except OSError:
            return f"{path} is missing"
        if actual != size:
            return f"{path} has {actual} bytes, the manifest says {size}"
    return None


def latest_tag(ckpt_root: Path) -> str | None:
    """The checkpoint to resume from: the one `latest` names when it is whole, else (with a warning naming
    both) the newest whole one; None when there is none."""
    pointer = ckpt_root / LATEST
    if not pointer.exists():
        return None
    named = pointer.read_text().strip()
    problem = torn(ckpt_root / named) if named.startswith("step_") else f"{pointer} holds {named[:40]!r}"
    if problem is None:
        return named
    for tag_dir in sorted(ckpt_root.glob("step_*"), reverse=True):
        if tag_dir.name != named and torn(tag_dir) is None:
            _warn(f"checkpoint {ckpt_root / named} is not whole ({problem}); "
                  f"using the newest whole one, {tag_dir}")
            return tag_dir.name
    _warn(f"checkpoint {ckpt_root / named} is not whole ({problem}) and no other one is")
    return None


def _warn(message: str) -> None:
    if int(os.environ.get("RANK", 0)) == 0:  # every rank reads the same files: say it once
        print(f"warning: {message}", file=sys.stderr, flush=True)


def checkpoint_world_size(ckpt_root: Path, tag: str) -> int:
    """The number of ranks that wrote a checkpoint (its manifest, or its per-rank RNG files)."""
    manifest = ckpt_root / tag / MANIFEST
    if manifest.exists():
        return json.loads(manifest.read_text())["world_size"]
    return len(list((ckpt_root / tag).glob("rng_rank*.pt")))


def check_frozen_from(ckpt_root: Path, tag: str, source: str) -> None:
    """Before loading: the frozen weights a checkpoint leaves out must come from `source` in this run ("" on both
    sides when the checkpoint holds the whole model); else a ConfigError saying what each trains."""
    path = ckpt_root / tag / FROZEN_FROM
    saved = path.read_text() if path.exists() else ""
    if saved != source:
        def trains(s: str) -> str:
            return f"adapters on {s}" if s else "a whole model (peft=none)"

        raise ConfigError(f"resume: checkpoint {ckpt_root / tag} trains {trains(saved)}, this run {trains(source)}; "
                          f"resume with the checkpoint's model.name_or_path and peft")


def check_zero_stage(tag_dir: Path, stage: int, stage_key: str) -> None:
    """A ConfigError naming the stage to rerun with (`stage_key`) when the checkpoint in `tag_dir` was written under
    another ZeRO stage than `stage` (its files are laid out by stage). A checkpoint from before the manifest recorded
    the stage is known by its files when it is ZeRO-3's (each rank's model states, `zero_pp_rank_*_model_states.pt`:
    what `deepspeed.stage=auto` wrote on several ranks until it chose by model size); other old ones pass."""
    manifest = tag_dir / MANIFEST
    saved = json.loads(manifest.read_text()).get("zero_stage") if manifest.exists() else None
    if saved is None and any(tag_dir.glob("zero_pp_rank_*_model_states.pt")):
        saved = 3
    if saved is not None and saved != stage:
        raise ConfigError(f"resume: checkpoint {tag_dir} was written under ZeRO stage {saved}, this run trains under "
                          f"stage {stage}; a checkpoint resumes at its own stage: rerun with {stage_key}={saved}")


def load_checkpoint(engine, ckpt_root: Path, tag: str, stage_key: str = "deepspeed.stage") -> dict:
    """Restore engine state and this rank's RNG; return the client_state. A checkpoint written under another ZeRO
    stage (its files are laid out by stage) is a ConfigError naming the stage to resume with (`stage_key`)."""
    rank = dist.get_rank()
    check_zero_stage(ckpt_root / tag, engine.zero_optimization_stage(), stage_key)
    # A checkpoint without the frozen weights (adapters) misses their keys by design.
    load_path, client_state = engine.load_checkpoint(str(ckpt_root), tag=tag,
                                                     load_module_strict=not has_frozen_parameters(engine))
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_root / tag}")
    rng_file = ckpt_root / tag / f"rng_rank{rank}.pt"
    if rng_file.exists():
        _restore_rng(torch.load(rng_file, weights_only=True))
    return client_state or {}
