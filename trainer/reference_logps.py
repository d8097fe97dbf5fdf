"""DPO's cached reference: the starting model's log-probs of every preference pair, computed once per run.

The policy starts from the reference's weights, so before the first step the model in the engine *is* the
reference. One pass over the training (and eval) pairs with it gives each side's summed response log-prob; the
pairs carry them from then on (`ref_chosen_logp`, `ref_rejected_logp`), and no reference model is held during
training. The values are written to `<run_dir>/reference_logps.safetensors`:

- tensors `<split>/chosen` and `<split>/rejected` (float32, one per pair, in the order of the split's pairs:
  training pairs after the seeded shuffle, eval pairs in source order);
- metadata `<split>/fingerprint` (a hash of the split's token ids and response masks) and `model` (where the
  starting weights came from).

A resumed run reads the file instead of recomputing: the pass runs before a checkpoint is loaded, so it could only
ever see the starting weights, but the file also keeps a resumed run on the reference it started with when, say,
`model: sft_output` now resolves to a newer SFT export. A split whose fingerprint no longer matches is an error
(the data changed under the run); a split the file lacks is computed, from the starting weights, provided they
come from where the file's did.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from trainer.config import ConfigError
from trainer.engine import DistInfo, device
from trainer.evaluate import eval_mode, rank_batch_count, rank_batches
from trainer.objectives import sequence_logps
from trainer.progress import progress

SIDES = ("chosen", "rejected")


def pairs_fingerprint(pairs: list[dict]) -> str:
    """A hash of what the log-probs depend on in the data: each pair's token ids and response masks, in order."""
    h = hashlib.sha256()
    for pair in pairs:
        for key in ("chosen_input_ids", "chosen_response_mask", "rejected_input_ids", "rejected_response_mask"):
            h.update(repr(list(pair[key])).encode())
    return h.hexdigest()


@torch.no_grad()
def compute_reference_logps(engine, pairs: list[dict], collate: Callable, batch_size: int, info: DistInfo,
                            desc: str) -> torch.Tensor:
    """(2, P) float32 summed response log-probs (chosen, rejected) of every pair under the engine's model, the pairs
    sharded over ranks; collective. A progress bar on rank 0."""
    out = torch.zeros(2, len(pairs), dtype=torch.float32, device=device())
    with eval_mode(engine.module):
        batches = rank_batches(pairs, info, batch_size)
        for idx, rows in progress(batches, total=rank_batch_count(len(pairs), info, batch_size), desc=desc,
                                  enabled=info.is_main, unit="batch"):
            batch = {k: v.to(device()) for k, v in collate(rows).items()}
            logps, _ = sequence_logps(engine, batch)
            if idx:  # empty: the padding batch of a rank whose share ran out
                out[:, idx] = logps.float().reshape(2, -1)
    if info.world_size > 1:
        dist.all_reduce(out)  # each pair is filled on exactly one rank, zeros elsewhere: exact
    return out.cpu()


def attach_reference_logps(path: Path, engine, splits: dict[str, list[dict]], collate: Callable, batch_size: int,
                           info: DistInfo, model_source: str) -> None:
    """Give every pair of every split its `ref_chosen_logp` and `ref_rejected_logp`, from `path` where it holds them,
    else from one pass with the engine's (starting) model, then saved to `path`. Collective; only rank 0 reads and
    writes the file (the decision is broadcast, so ranks need not share a filesystem)."""
    fingerprints = {name: pairs_fingerprint(pairs) for name, pairs in splits.items() if pairs}
    box = [None]
    if info.is_main:
        try:
            box[0] = _read_cache(path, fingerprints, model_source)
        except ConfigError as err:  # every rank must stop, not wait for a broadcast that never comes
            box[0] = err
    if info.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], ConfigError):
        raise box[0]
    cached, note = box[0]
    if note and info.is_main:
        print(note, flush=True)
    values = dict(cached)
    for name in fingerprints:
        if name not in values:
            values[name] = compute_reference_logps(engine, splits[name], collate, batch_size, info,
                                                   desc=f"reference log-probs ({name} pairs)")
    for name, logps in values.items():
        for pair, chosen, rejected in zip(splits[name], logps[0].tolist(), logps[1].tolist()):
            pair["ref_chosen_logp"], pair["ref_rejected_logp"] = chosen, rejected
    if info.is_main and len(cached) < len(values):
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{name}/{side}": logps[i].contiguous() for name, logps in values.items() for i, side in enumerate(SIDES)}
        metadata = {"model": model_source, **{f"{name}/fingerprint": fingerprints[name] for name in values}}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)  # a crash mid-write leaves no half file behind
        print(f"reference log-probs of {', '.join(f'{len(splits[n])} {n}' for n in values)} pairs saved to {path}",
              flush=True)
    if info.world_size > 1:
        dist.barrier()


def _read_cache(path: Path, fingerprints: dict[str, str], model_source: str) -> tuple[dict[str, torch.Tensor], str]:
    """({split: (2, P) log-probs} of the splits `path` holds for these pairs, a note to print or ""); a split whose
    pairs changed, or one that is missing while the starting model comes from elsewhere, is a ConfigError."""
    if not path.exists():
        return {}, ""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        stored = {name: torch.stack([f.get_tensor(f"{name}/{side}") for side in SIDES])
                  for name in fingerprints if f"{name}/fingerprint" in meta}
    for name in stored:
        if meta[f"{name}/fingerprint"] != fingerprints[name]:
            raise ConfigError(f"dpo.reference: {path} holds reference log-probs of other {name} pairs (the data or "
                              f"data.* settings changed since this run started); start a new run directory")
    cached_model = meta.get("model", "")
    if len(stored) < len(fingerprints) and cached_model != model_source:
        missing = ", ".join(sorted(set(fingerprints) - set(stored)))
        raise ConfigError(f"dpo.reference: {path} lacks the {missing} pairs, and this run starts from {model_source}, "
                          f"not {cached_model}, the reference the run began with; start a new run directory")
    note = ""
    if stored:
        note = f"reference log-probs of the {', '.join(stored)} pairs read from {path}"
        if cached_model != model_source:
            note += f" (computed from {cached_model}; this run's model is {model_source})"
    return stored, note
