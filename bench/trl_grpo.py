"""Train with TRL's GRPOTrainer set up as a tuneforge GRPO run, for `bench/grpo_vs_trl.py`.

    python -m bench.trl_grpo SPEC.json

SPEC.json is written by `grpo_vs_trl.py` from tuneforge's resolved config (`algo=grpo`), so the two runs share one
source of truth. TRL keeps its defaults except where `grpo_config` says why. The policy is the model directory the
benchmark wrote; the prompts are its JSONL ("prompt": the text tuneforge's driver builds, which TRL's tokenizer call
turns into the very token ids tuneforge samples from (the benchmark checks it), "answer"). The reward is tuneforge's
own exact-match function (`rlhf.reward_functions.exact_match`) on TRL's decoded completions.

Writes `metrics.jsonl` in the run's output directory, one line per GRPO iteration (one generation batch: the
`rollout_batch` rollouts of `rollout_batch / G` prompts, trained on in `steps_per_generation` optimizer steps):
{"step", "time" (wall clock at the end of the iteration's last optimizer step), "rollouts", "prompt_tokens" (real,
one per rollout as TRL repeats each prompt G times), "response_tokens" (TRL's completion mask: up to and including
the first EOS), "generate_s" (`_generate_single_turn`), "score_s" (the rest of `_generate_and_score_completions`:
old log-probs, decoding and the reward), "train_s" (from the rollout's end to the iteration's last step end), "score" (mean reward),
"entropy" (policy token entropy, mean over the iteration's steps)}. The phases are timed by wrapping two methods
of the trainer instance; nothing else of TRL is touched.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import GRPOConfig, GRPOTrainer

from bench.trl_harness import StepRecorder, adamw_fields
from rlhf.reward_functions import exact_match


def grpo_config(spec: dict) -> GRPOConfig:
    """TRL's GRPOConfig with its defaults, except what makes the computation tuneforge's GRPO."""
    steps_per_generation = spec["rollout_batch"] // spec["mini_batch_size"]
    return GRPOConfig(
        output_dir=spec["output_dir"],
        seed=spec["seed"],
        # One tuneforge iteration = one TRL generation batch of rollout_batch rollouts, trained in mini-batches of
        # algo.mini_batch_size, one optimizer step each (algo.ppo_epochs=1): TRL's per-device batch is the
        # mini-batch, no accumulation, and it generates every steps_per_generation steps. Old log-probs then come
        # from a forward pass on TRL's side (its buffered steps are off-policy after the first); tuneforge records
        # them while sampling.
        max_steps=spec["iterations"] * steps_per_generation,
        per_device_train_batch_size=spec["mini_batch_size"],
        gradient_accumulation_steps=1,
        steps_per_generation=steps_per_generation,
        num_generations=spec["samples_per_prompt"],  # default 8; tuneforge's rollout.samples_per_prompt
        max_completion_length=spec["max_new_tokens"],  # default 512; tuneforge's rollout.max_new_tokens
        temperature=spec["temperature"], top_p=spec["top_p"], top_k=spec["top_k"],  # the defaults, 1.0 / 1.0 / 0
        epsilon=spec["clip_eps"],
        epsilon_high=spec["clip_eps_high"],  # default: = epsilon; tuneforge's GRPO clips higher (DAPO)
        loss_type="dapo",  # the default: token mean over the accumulated batch, tuneforge's algo.loss_agg=token_mean
        scale_rewards="group",  # the default: group std, tuneforge's algo.norm_by_std=true
        beta=spec["kl_coef"],  # 0.0, the default: no KL term and no reference model, as tuneforge's algo.kl_coef
        # The policy's AdamW and clipping; constant like tuneforge's RL schedule (TRL's default decays linearly).
        **adamw_fields(spec),
        max_grad_norm=spec["max_grad_norm"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        # tuneforge trains the tiny model in fp32 without activation checkpointing; GRPOConfig defaults to bf16
        # and checkpointing.
        bf16=False,
        activation_checkpointing=False,
        use_cpu=True,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        log_completions=False,
    )


class PhaseTimer:
    """Wraps the trainer's rollout (`_generate_and_score_completions`) and sampling (`_generate_single_turn`)
    methods and records, per generation batch, their seconds and the rollouts' sizes and rewards."""

    def __init__(self, trainer: GRPOTrainer):
        self.batches: list[dict] = []
        rollout, sample = trainer._generate_and_score_completions, trainer._generate_single_turn

        def timed_sample(prompt_ids, *args, **kwargs):
            t0 = time.perf_counter()
            completion_ids, logprobs = sample(prompt_ids, *args, **kwargs)
            self._current.update(generate_s=time.perf_counter() - t0,
                                 prompt_tokens=sum(len(p) for p in prompt_ids),
                                 response_tokens=sum(len(c) for c in completion_ids), rollouts=len(completion_ids))
            return completion_ids, logprobs

        def timed_rollout(*args, **kwargs):
            self._current = {"start": time.time()}
            t0 = time.perf_counter()
            out = rollout(*args, **kwargs)
            self._current["rollout_s"] = time.perf_counter() - t0
            self.batches.append(self._current)
            return out

        trainer._generate_and_score_completions = timed_rollout
        trainer._generate_single_turn = timed_sample


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["policy_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["policy_path"], dtype=torch.float32)
    dataset = datasets.load_dataset("json", data_files=spec["prompts_path"], split="train")
    set_seed(spec["seed"])

    def exact_match_reward(prompts, completions, answer, **_):
        return exact_match(prompts, completions, [{"answer": a} for a in answer])

    trainer = GRPOTrainer(model=model, reward_funcs=exact_match_reward, args=grpo_config(spec),
                          train_dataset=dataset, processing_class=tokenizer)
    if trainer.ref_model is not None:
        raise SystemExit("error: TRL loaded a reference model; tuneforge's GRPO without a KL term runs none")
    timer = PhaseTimer(trainer)
    recorder = StepRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    if getattr(trainer.model, "is_gradient_checkpointing", False):
        raise SystemExit("error: TRL trained with activation checkpointing on; tuneforge's runs have it off")

    per = spec["rollout_batch"] // spec["mini_batch_size"]
    out = Path(spec["output_dir"]) / "metrics.jsonl"
    with out.open("w") as f:
        for it, batch in enumerate(timer.batches, start=1):
            steps = range((it - 1) * per + 1, it * per + 1)
            if steps[-1] not in recorder.end_time:
                break  # a generation batch the run did not train on
            end = recorder.end_time[steps[-1]]
            logs = [recorder.logs.get(s, {}) for s in steps]
            f.write(json.dumps({
                "step": it, "time": end, "rollouts": batch["rollouts"], "prompt_tokens": batch["prompt_tokens"],
                "response_tokens": batch["response_tokens"], "generate_s": batch["generate_s"],
                "score_s": batch["rollout_s"] - batch["generate_s"],
                "train_s": end - batch["start"] - batch["rollout_s"],
                "score": sum(x["reward"] for x in logs if "reward" in x) / max(1, sum("reward" in x for x in logs)),
                "entropy": sum(x["entropy"] for x in logs if "entropy" in x) / max(1, sum("entropy" in x for x in logs)),
            }) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
