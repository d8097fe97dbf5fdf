"""Consolidated Hugging Face export: `from_pretrained` loads it and generates with it.

A model with adapters (peft=lora) is exported twice: merged into plain weights in `hf_model/` (what the next stage
and `from_pretrained` load), and as the adapter alone in `hf_adapter/` beside it (trainer.adapters)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch.distributed as dist

from trainer.adapters import is_adapted, save_adapter_and_merge
from trainer.contracts import ADAPTER_DIR


def export_hf(engine, tokenizer, out_dir: Path, zero3: bool, extra_files: dict | None = None) -> None:
    """Collective under ZeRO-3 (every rank gathers its partitions); rank 0 writes
    safetensors weights, the model config and the tokenizer (and, with adapters, the adapter directory).
    Rank 0 says when it starts and how long the gather and the save took (a large model's take minutes)."""
    main = dist.get_rank() == 0
    start = time.perf_counter()
    if main:
        print(f"exporting to {out_dir}: gathering the weights{' from every rank' if zero3 else ''} ...", flush=True)
    if zero3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # full weights on rank 0, None elsewhere
    else:
        state_dict = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    gathered = time.perf_counter()
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        model = engine.module
        if is_adapted(model):
            model = save_adapter_and_merge(model, state_dict, out_dir.parent / ADAPTER_DIR, tokenizer)
            state_dict = None  # the merged model's own
        model.config.use_cache = True  # inference default for whoever loads it
        model.save_pretrained(str(out_dir), state_dict=state_dict, safe_serialization=True)
        model.config.use_cache = False
        tokenizer.save_pretrained(str(out_dir))
        for name, payload in (extra_files or {}).items():
            (out_dir / name).write_text(json.dumps(payload, indent=2))
        done = time.perf_counter()
        print(f"exported to {out_dir} in {done - start:.1f} s (gather {gathered - start:.1f} s, "
              f"save {done - gathered:.1f} s)", flush=True)
    dist.barrier()
