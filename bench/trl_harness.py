"""What the TRL runners (`bench/trl_sft.py`, `bench/trl_reward.py`) share: the spec, the settings that make TRL's
Trainer compute what tuneforge computes, and the per-step record every benchmark reads. `bench/trl_ppo.py` runs in
its own environment without tuneforge's dependencies and uses only `StepRecorder`, so tuneforge is imported where
it is used.

A runner reads SPEC.json (written by the benchmark from tuneforge's resolved config: model, seed, optimizer,
schedule, batch, max length, data file), builds tuneforge's model itself, hands it to its TRL trainer and calls
`train_and_record`, which writes `metrics.jsonl` in the run's output directory, one line per optimizer step:
{"step", "time" (wall clock at the end of the step), "loss", "lr", "grad_norm", the runner's counts summed over
the step's micro-batches, "trl_num_tokens" (TRL's own running count of real tokens, to cross-check ours)}.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import datasets
import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback, set_seed

if TYPE_CHECKING:
    from trainer.config import ModelConfig


@dataclass
class TrlRun:
    spec: dict
    model_cfg: ModelConfig  # tuneforge's, to build the same model
    tokenizer: PreTrainedTokenizerBase
    dataset: datasets.Dataset  # the benchmark's JSONL, as TRL users load it


def load_run(spec_path: str) -> TrlRun:
    """Read the spec, set the thread count, load tokenizer and data, and seed last: the model built next gets
    the same initial weights as tuneforge's (non-ZeRO-3) build."""
    from trainer.config import ModelConfig, TinyModelConfig
    from trainer.model import load_tokenizer

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    model_cfg = ModelConfig(**{**spec["model"], "tiny": TinyModelConfig(**spec["model"]["tiny"])})
    tokenizer = load_tokenizer(model_cfg)
    dataset = datasets.load_dataset("json", data_files=spec["data_path"], split="train")
    set_seed(spec["seed"])
    return TrlRun(spec, model_cfg, tokenizer, dataset)


def adamw_fields(spec: dict) -> dict:
    """TRL's optimizer settings for tuneforge's AdamW (`spec` carries tuneforge's resolved optim config)."""
    return dict(learning_rate=spec["lr"], adam_beta1=spec["betas"][0], adam_beta2=spec["betas"][1],
                adam_epsilon=spec["eps"], weight_decay=spec["weight_decay"])


def trl_config(config_class, spec: dict, **fields):
    """`config_class` (SFTConfig, RewardConfig) with TRL's defaults, except what makes the computation
    tuneforge's (and the bookkeeping a benchmark needs); `fields` are the trainer's own settings."""
    return config_class(
        output_dir=spec["output_dir"],
        seed=spec["seed"],
        max_steps=spec["steps"],
        per_device_train_batch_size=spec["micro_batch_size"],
        gradient_accumulation_steps=spec["grad_accum"],
        # tuneforge's data.max_length: the packed length (SFT), the longest side of a pair (reward).
        max_length=spec["max_length"],
        # Same AdamW hyper-parameters and warmup + cosine-to-min_lr schedule as tuneforge.
        **adamw_fields(spec),
        max_grad_norm=spec["max_grad_norm"],
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": spec["min_lr_ratio"]},
        warmup_steps=spec["warmup_steps"],
        # tuneforge trains the tiny model in fp32 without activation checkpointing; TRL defaults to bf16 and
        # checkpointing (its `gradient_checkpointing=True`, since Transformers 5 a deprecated alias of this name).
        bf16=False,
        activation_checkpointing=False,
        use_cpu=True,
        # Per-step loss for the loss match; nothing written or reported during the run.
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        **fields,
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
    """Wraps the trainer's collator and records `count(examples, batch)` for every batch, in the order consumed."""

    def __init__(self, collate, count: Callable[[list[dict], dict], dict[str, int]]):
        self.collate, self.count = collate, count
        self.counts: list[dict[str, int]] = []  # one per micro-batch

    def __call__(self, examples):
        batch = self.collate(examples)
        self.counts.append(self.count(examples, batch))
        return batch


def train_and_record(trainer, spec: dict, count: Callable[[list[dict], dict], dict[str, int]]) -> None:
    """Train, then write metrics.jsonl: per step, its end time, the Trainer's logs and `count` summed over the
    step's micro-batches (`count` must give "tokens", the real tokens TRL's num_tokens counts)."""
    recorder = StepRecorder()
    trainer.add_callback(recorder)
    counter = CountingCollator(trainer.data_collator, count)
    trainer.data_collator = counter
    trainer.train()
    if getattr(trainer.model, "is_gradient_checkpointing", False):
        raise SystemExit("error: TRL trained with activation checkpointing on; tuneforge's runs have it off")

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
                **{key: sum(b[key] for b in batches) for key in counter.counts[0]},
                "trl_num_tokens": logs.get("num_tokens"),
            }) + "\n")
    print(f"done: {len(recorder.end_time)} steps, metrics in {out}", flush=True)
