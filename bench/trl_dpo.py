"""Train with TRL's DPOTrainer set up as a tuneforge DPO run, for `bench/dpo_vs_trl.py`.

    python -m bench.trl_dpo SPEC.json

SPEC.json is written by `dpo_vs_trl.py` from tuneforge's resolved config, so the two runs share one source of
truth. TRL runs with its own defaults except where tuneforge's computation must be matched
(`bench.trl_harness.trl_config`, beta, loss and the reference in `main`). The reference log-probs of every pair are
computed once before training (`precompute_ref_log_probs=True`, no reference model kept), as tuneforge's
`dpo.reference=cached` does; that pass runs in `DPOTrainer.__init__`, before the measured steps. Writes
`metrics.jsonl` in the run's output directory (see `bench/trl_harness.py`), counting per step "pairs", "tokens"
(real) and "padded_tokens" (the batch's size, padding included), and `data.json`: the pairs TRL trains on after its
own tokenization and filtering, their tokens, their response tokens, and a digest of their token ids that the
benchmark compares with tuneforge's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from trl import DPOConfig, DPOTrainer

from bench.trl_harness import load_run, train_and_record, trl_config
from bench.trl_reward import count_pairs, pairs_digest
from trainer.model import build_causal_lm
from trainer.sampling import derive_seed


def main(spec_path: str) -> None:
    run = load_run(spec_path)
    spec = run.spec
    # tuneforge's DPO stage builds its policy under this seed (trainer.stages._dpo_stage), so both start from the
    # same random-init weights.
    torch.manual_seed(derive_seed(spec["seed"], "dpo_starting_model"))
    model = build_causal_lm(run.model_cfg, run.tokenizer, torch.float32)
    args = trl_config(
        DPOConfig, spec,
        beta=spec["beta"],
        loss_type=[spec["loss"]],
        # tuneforge's dpo.reference=cached: the reference's log-probs of every pair, once, before training, and no
        # reference model held during it. The pass uses TRL's default batch (the training micro-batch), as
        # tuneforge's uses its micro-batch.
        precompute_ref_log_probs=True,
    )
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=run.dataset,
                         processing_class=run.tokenizer)
    if trainer.ref_model is not None:
        raise SystemExit("error: TRL kept a reference model; tuneforge's cached reference holds none")
    data = trainer.train_dataset
    chosen = [p + c for p, c in zip(data["prompt_ids"], data["chosen_ids"])]
    rejected = [p + r for p, r in zip(data["prompt_ids"], data["rejected_ids"])]
    (Path(spec["output_dir"]) / "data.json").write_text(json.dumps({
        "pairs": len(data),
        "tokens": sum(len(c) + len(r) for c, r in zip(chosen, rejected)),
        "response_tokens": sum(len(c) + len(r) for c, r in zip(data["chosen_ids"], data["rejected_ids"])),
        "longest": max(max(len(c), len(r)) for c, r in zip(chosen, rejected)),
        "digest": pairs_digest(zip(chosen, rejected)),
    }))
    train_and_record(trainer, spec, count_pairs)


if __name__ == "__main__":
    main(sys.argv[1])
