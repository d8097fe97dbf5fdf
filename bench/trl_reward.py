"""Train with TRL's RewardTrainer set up as a tuneforge reward run, for `bench/reward_vs_trl.py`.

    python -m bench.trl_reward SPEC.json

SPEC.json is written by `reward_vs_trl.py` from tuneforge's resolved config, so the two runs share one source of
truth. TRL runs with its own defaults except where tuneforge's computation must be matched
(`bench.trl_harness.trl_config`, padding and centering in `main`). Writes `metrics.jsonl` in the run's output
directory (see `bench/trl_harness.py`), counting per step "pairs", "tokens" (real) and "padded_tokens" (the
batch's size, padding included), and `data.json`: the pairs TRL trains on after its filtering, their tokens, and
a digest of their token ids that the benchmark compares with tuneforge's.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Iterable

import torch
from trl import RewardConfig, RewardTrainer

from bench.trl_harness import load_run, train_and_record, trl_config
from trainer.model import build_reward_model


def pairs_digest(pairs: Iterable[tuple[list[int], list[int]]]) -> str:
    """Order-free fingerprint of (chosen ids, rejected ids) pairs: equal digests, the same training pairs."""
    canonical = sorted(json.dumps([list(c), list(r)]) for c, r in pairs)
    return hashlib.sha256("\n".join(canonical).encode()).hexdigest()


def count_pairs(examples: list[dict], batch: dict) -> dict[str, int]:
    """Pairs, real tokens and padded tokens of one batch (rows 0..B-1 chosen, B..2B-1 rejected)."""
    return {"pairs": len(examples), "tokens": int(batch["attention_mask"].sum()),
            "padded_tokens": batch["input_ids"].numel()}


def main(spec_path: str) -> None:
    run = load_run(spec_path)
    model = build_reward_model(run.model_cfg, run.tokenizer, torch.float32)
    args = trl_config(
        RewardConfig, run.spec,
        # tuneforge pads a batch to a multiple of 8 (trainer.preference.collate_pairs); TRL pads to none on CPU.
        pad_to_multiple_of=run.spec["pad_to_multiple_of"],
        # TRL's None is tuneforge's center_coef=0.0: no centering term at all.
        center_rewards_coefficient=run.spec["center_coef"] or None,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=run.dataset, processing_class=run.tokenizer)
    data = trainer.train_dataset
    (Path(run.spec["output_dir"]) / "data.json").write_text(json.dumps({
        "pairs": len(data),
        "tokens": sum(len(c) + len(r) for c, r in zip(data["chosen_ids"], data["rejected_ids"])),
        "digest": pairs_digest(zip(data["chosen_ids"], data["rejected_ids"])),
    }))
    train_and_record(trainer, run.spec, count_pairs)


if __name__ == "__main__":
    main(sys.argv[1])
