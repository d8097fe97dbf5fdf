"""Crash-safe DeepSpeed checkpoints with everything exact resume needs.

Layout under `<run_dir>/checkpoints/`:
    step_00000400/        DeepSpeed's files (model, optimizer, scheduler, client_state); without frozen
                          weights (peft adapters): only what trains and its optimizer state
        rng_rank{r}.pt    this rank's torch/python/numpy RNG states
        FROZEN_FROM       with peft adapters: the model source of the frozen weights left out
        COMPLETE          written last, once every rank has finished
    latest                name of the newest COMPLETE checkpoint (atomic rename)

A crash mid-save leaves a directory without COMPLETE that `latest` never points
to, so the previous checkpoint stays the one that resumes; pruning to the last K
happens only after `latest` has moved.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from trainer.config import ConfigError

LATEST = "latest"
COMPLETE = "COMPLETE"
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


def save_checkpoint(engine, ckpt_root: Path, step: int, client_state: dict, keep_last: int) -> Path:
    """Collective: every rank must call it."""
    rank = dist.get_rank()
    tag = tag_for(step)
    tag_dir = ckpt_root / tag
    if (tag_dir / COMPLETE).exists():
        # Same step already saved (a resumed run that had nothing left to do):
        # never write over a good checkpoint.
        return tag_dir
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=False,
                           exclude_frozen_parameters=has_frozen_parameters(engine))
    torch.save(_rng_state(), tag_dir / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        if client_state.get("frozen_from"):
            (tag_dir / FROZEN_FROM).write_text(client_state["frozen_from"])
        (tag_dir / COMPLETE).write_text(str(step))
        atomic_write(ckpt_root / LATEST, tag)
        _prune(ckpt_root, keep_last, keep=tag)
    dist.barrier()
    return tag_dir


def has_frozen_parameters(engine) -> bool:
    """Whether part of the model is frozen (peft adapters on a frozen base). Its checkpoints leave the frozen
    weights out: they never change, and a resumed run rebuilds them from the same model source (trainer.run
    checks that it is the same)."""
    return any(not p.requires_grad for p in engine.module.parameters())


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(ckpt_root: Path, keep_last: int, keep: str) -> None:
    complete = sorted(p for p in ckpt_root.glob("step_*") if (p / COMPLETE).exists())
    for old in complete[:-keep_last]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def find_resume_dir(resume: str | None, output_dir: Path) -> tuple[Path, str] | None:
    """Map the `resume` setting to (checkpoints root, tag), or None to start fresh.

    auto: the latest complete checkpoint under this run's output_dir, if any.
    A path: a run directory, its `checkpoints/` directory, or one `step_*` directory.
    """
    if resume is None:
        return None
    if resume == "auto":
        root = output_dir / "checkpoints"
        tag = latest_tag(root)
        return (root, tag) if tag else None
    path = Path(resume)
    if (path / COMPLETE).exists():
        return path.parent, path.name
    for root in (path / "checkpoints", path):
        tag = latest_tag(root)
        if tag:
            return root, tag
    raise FileNotFoundError(f"resume={resume}: no complete checkpoint found there (looked for {LATEST} and {COMPLETE})")


def latest_tag(ckpt_root: Path) -> str | None:
    pointer = ckpt_root / LATEST
    if not pointer.exists():
        return None
    tag = pointer.read_text().strip()
    return tag if (ckpt_root / tag / COMPLETE).exists() else None


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


def load_checkpoint(engine, ckpt_root: Path, tag: str) -> dict:
    """Restore engine state and this rank's RNG; return the client_state."""
    rank = dist.get_rank()
    # A checkpoint without the frozen weights (adapters) misses their keys by design.
    load_path, client_state = engine.load_checkpoint(str(ckpt_root), tag=tag,
                                                     load_module_strict=not has_frozen_parameters(engine))
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_root / tag}")
    rng_file = ckpt_root / tag / f"rng_rank{rank}.pt"
    if rng_file.exists():
        _restore_rng(torch.load(rng_file, weights_only=True))
    return client_state or {}
