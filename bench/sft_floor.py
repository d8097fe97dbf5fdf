"""The compute floor of `bench.sft_vs_trl`'s tuneforge run: the same steps as a plain PyTorch loop.

    python -m bench.sft_floor SPEC.json

SPEC.json, written by `bench.sft_vs_trl --floor`: {"overrides": the tuneforge run's Hydra overrides,
"output_dir": where metrics.jsonl goes}. The loop trains the model tuneforge builds (same seed) on the batches
tuneforge's sampler picks (`harness.replay_steps`), collated as tuneforge collates them, with tuneforge's loss
(`CausalLMTask.loss`: packed rows isolated by their position ids, the output head only where a trained token is
predicted), fused AdamW and its cosine schedule, gradient clipping; and nothing else: no DeepSpeed, no `fit`, no
progress bar, logging or checkpoint, the gradients kept between steps (zeroed, not freed) and glibc told to keep
freed memory (`bench.ppo_floor.keep_freed_memory`), so the floor is as fast as the arithmetic allows in eager
PyTorch. What tuneforge does beyond that arithmetic is what its share of the floor leaves out.

Writes metrics.jsonl as the TRL runners do: per step "step", "time" (wall clock at its end), "loss", "lr",
"tokens" (real), "trained_tokens".
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

if not __package__:  # run as `python bench/sft_floor.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(spec_path: str) -> None:
    from bench.ppo_floor import keep_freed_memory

    allocator = keep_freed_memory()  # before torch allocates anything

    import torch

    from bench import harness
    from trainer.compose import compose
    from trainer.data import build_supervised_data, collate
    from trainer.engine import build_optimizer, lr_multiplier
    from trainer.model import build_causal_lm, load_tokenizer, resolve_lr_for_model
    from trainer.objectives import CausalLMTask
    from trainer.sampling import seed_everything

    spec = json.loads(Path(spec_path).read_text())
    job = compose("sft", spec["overrides"])
    seed_everything(job.seed)  # as trainer.run does before it builds anything
    tokenizer = load_tokenizer(job.model)
    optim = resolve_lr_for_model(job.optim, job.peft.method, job.model, tokenizer=tokenizer)[0]
    rows = build_supervised_data(job.data, tokenizer, seed=job.seed).train
    model = build_causal_lm(job.model, tokenizer, torch.float32)
    optimizer = build_optimizer(model, optim, offload=False)
    total_steps = optim.decay_steps or job.train.max_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, optim, total_steps))
    task = CausalLMTask()
    print(allocator, flush=True)

    records = []
    for step, picked in enumerate(harness.replay_steps(rows, job), start=1):
        batch = collate(picked, tokenizer.pad_token_id)
        trained = task.count(batch)
        loss_sum = task.loss(model, batch)
        (loss_sum / max(trained, 1)).backward()
        if optim.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
        lr = schedule.get_last_lr()[0]
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=False)
        records.append({"step": step, "time": time.time(), "loss": loss_sum.item() / max(trained, 1), "lr": lr,
                        "tokens": sum(len(r["input_ids"]) for r in picked), "trained_tokens": trained})
    out = Path(spec["output_dir"]) / "metrics.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"done: {len(records)} steps, metrics in {out}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_file():
        print("usage: python -m bench.sft_floor SPEC.json (written by `python -m bench.sft_vs_trl --floor`)",
              file=sys.stderr)
        raise SystemExit(2)
    main(sys.argv[1])
