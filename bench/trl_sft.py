"""Train with TRL's SFTTrainer set up as a tuneforge SFT run, for `bench/sft_vs_trl.py`.

    python -m bench.trl_sft SPEC.json

SPEC.json is written by `sft_vs_trl.py` from tuneforge's resolved config, so the two runs share one source of
truth. TRL runs with its own defaults except where tuneforge's computation must be matched
(`bench.trl_harness.trl_config`; packing as tuneforge's `data.packing`). Writes `metrics.jsonl` in the run's output
directory (see `bench/trl_harness.py`), counting per step "tokens" (real, non-pad) and "trained_tokens".
"""

from __future__ import annotations

import sys

import torch
from trl import SFTConfig, SFTTrainer

from bench.trl_harness import load_run, train_and_record, trl_config
from trainer.model import build_causal_lm
from trainer.objectives import IGNORE_INDEX


def count_tokens(examples: list[dict], batch: dict) -> dict[str, int]:
    """Real and trained tokens of one batch."""
    # Padding-free batches (packing="bfd") carry no padding; padded ones carry an attention_mask.
    mask = batch.get("attention_mask")
    tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    # The loss scores label t+1 from position t, so a label at position 0 is never trained.
    trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return {"tokens": tokens, "trained_tokens": trained}


def main(spec_path: str) -> None:
    run = load_run(spec_path)
    # use_cache off: the packed-sequence masking applies.
    model = build_causal_lm(run.model_cfg, run.tokenizer, torch.float32)
    # Packed sequences of max_length tokens (TRL's default "bfd" strategy: padding-free, position_ids).
    # Unpacked, a careful CPU user groups examples of similar length into a batch, so that little of it is padding
    # (Transformers' LengthGroupedSampler); packed rows are all max_length long.
    grouping = {"train_sampling_strategy": "group_by_length"} if run.spec.get("group_by_length") else {}
    args = trl_config(SFTConfig, run.spec, packing=run.spec["packing"], **grouping)
    trainer = SFTTrainer(model=model, args=args, train_dataset=run.dataset, processing_class=run.tokenizer)
    train_and_record(trainer, run.spec, count_tokens)


if __name__ == "__main__":
    main(sys.argv[1])
