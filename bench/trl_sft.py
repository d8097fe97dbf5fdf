"""Train with TRL's SFTTrainer set up as a tuneforge SFT run, for `bench/sft_vs_trl.py`.

    python -m bench.trl_sft SPEC.json

SPEC.json is written by `sft_vs_trl.py` from tuneforge's resolved config (model, seed, optimizer, schedule,
batch, max length, data file), so the two runs share one source of truth. TRL runs with its own defaults
except where tuneforge's computation must be matched (see `sft_config`). Writes `metrics.jsonl` in the run's
output directory, one line per optimizer step:
{"step", "time" (wall clock at the end of the step), "loss", "lr", "grad_norm", "tokens", "trained_tokens"}.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import datasets
import torch
from transformers import TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from trainer.config import ModelConfig, TinyModelConfig
from trainer.model import build_causal_lm, load_tokenizer
from trainer.objectives import IGNORE_INDEX


def sft_config(spec: dict) -> SFTConfig:
    """TRL's defaults, except what makes the computation tuneforge's (and the bookkeeping a benchmark needs)."""
    return SFTConfig(
        output_dir=spec["output_dir"],
        seed=spec["seed"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=spec["grad_accum"],
        # Same AdamW hyper-parameters and warmup + cosine-to-min_lr schedule as tuneforge.
        learning_rate=spec["lr"],
        adam_beta1=spec["betas"][0],
        adam_beta2=spec["betas"][1],
        adam_epsilon=spec["eps"],
        weight_decay=spec["weight_decay"],
        max_grad_norm=spec["max_grad_norm"],
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": spec["min_lr_ratio"]},
        warmup_steps=spec["warmup_steps"],
        # tuneforge trains the tiny model in fp32 without activation checkpointing; TRL defaults to bf16 and
        # gradient checkpointing.
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        # Packed sequences of max_length tokens (TRL's default "bfd" strategy: padding-free, position_ids).
        max_length=spec["max_length"],
        packing=spec["packing"],
        # Per-step loss for the loss match; nothing written or reported during the run.
        logging_steps=1,
        report_to="none",
        save_strategy="no",
    )


class StepRecorder(TrainerCallback):
    """Wall-clock time at the end of every optimizer step, and what the Trainer logs for it."""

    def __init__(self):
        self.end_time: dict[int, float] = {}
        self.logs: dict[int, dict] = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.end_time[state.global_step] = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.setdefault(state.global_step, {}).update(logs or {})


class CountingCollator:
    """Wraps the trainer's collator to count real and trained tokens of every batch, in the order consumed."""

    def __init__(self, collate):
        self.collate = collate
        self.counts: list[tuple[int, int]] = []  # (tokens, trained tokens) per micro-batch

    def __call__(self, examples):
        batch = self.collate(examples)
        # Padding-free batches (packing="bfd") carry no padding; padded ones carry an attention_mask.
        mask = batch.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        # The loss scores label t+1 from position t, so a label at position 0 is never trained.
        trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.counts.append((tokens, trained))
        return batch


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    model_cfg = ModelConfig(**{**spec["model"], "tiny": TinyModelConfig(**spec["model"]["tiny"])})
    tokenizer = load_tokenizer(model_cfg)
    set_seed(spec["seed"])  # the same initial weights as tuneforge's (non-ZeRO-3) build
    model = build_causal_lm(model_cfg, tokenizer, torch.float32)  # use_cache off: packed-sequence masking applies
    dataset = datasets.load_dataset("json", data_files=spec["data_path"], split="train")

    recorder = StepRecorder()
    trainer = SFTTrainer(
        model=model, args=sft_config(spec), train_dataset=dataset, processing_class=tokenizer, callbacks=[recorder]
    )
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.train()

    accum = spec["grad_accum"]
    out = Path(spec["output_dir"]) / "metrics.jsonl"
    with out.open("w") as f:
        for step in sorted(recorder.end_time):
            batches = counter.counts[(step - 1) * accum: step * accum]
            logs = recorder.logs.get(step, {})
            f.write(json.dumps({
                "step": step,
                "time": recorder.end_time[step],
                "loss": logs.get("loss"),
                "lr": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
                "tokens": sum(t for t, _ in batches),
                "trained_tokens": sum(n for _, n in batches),
                "trl_num_tokens": logs.get("num_tokens"),  # TRL's own running count, to cross-check ours
            }) + "\n")
    print(f"done: {len(recorder.end_time)} steps, metrics in {out}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
