"""Train with TRL's PPOTrainer set up as a tuneforge PPO run, for `bench/ppo_vs_trl.py`.

    bench/.venv-trl-ppo/bin/python -m bench.trl_ppo SPEC.json

Runs in its own environment (`bench/setup_trl_ppo.sh`: TRL 1.12.0, the last release with PPO) and imports nothing
of tuneforge: the spec names the model directories and the prompt file (token ids) the benchmark wrote, and
carries tuneforge's resolved PPO settings. TRL keeps its defaults except where `ppo_config` says why.

Writes `metrics.jsonl` in the run's output directory, one line per PPO iteration: {"step", "time" (wall clock at
the iteration's end), "rollouts", "prompt_tokens" (real, unpadded), "response_tokens" (those TRL treats as real:
up to and including the first EOS), "generate_s", "score_s" (generation end to the first training forward: the
reference, value and reward passes and GAE), "train_s" (the PPO epochs to the iteration's end), "score" (raw
reward score, mean), "kl" (per-sequence k1 KL, mean), "entropy" (policy token entropy, mean)}. The phases are
timed by wrapping two module-level functions of TRL's trainer (`batch_generation`, `forward`); nothing else of
TRL is touched.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.ppo import ppo_trainer as trl_ppo
from trl.experimental.utils import first_true_indices

from bench.trl_harness import StepRecorder, adamw_fields


def ppo_config(spec: dict) -> PPOConfig:
    """TRL's PPOConfig with its defaults, except what makes the computation tuneforge's PPO."""
    return PPOConfig(
        output_dir=spec["output_dir"],
        seed=spec["seed"],
        # One iteration = one rollout batch: TRL's batch_size is per_device_train_batch_size x
        # gradient_accumulation_steps. With no accumulation, TRL slices each mini-batch out of the batch and takes
        # one optimizer step per mini-batch, as tuneforge does (with accumulation, accelerate would step once per
        # gradient_accumulation_steps micro-batches across mini-batches).
        total_episodes=spec["iterations"] * spec["rollout_batch"],
        per_device_train_batch_size=spec["rollout_batch"],
        gradient_accumulation_steps=1,
        num_mini_batches=spec["rollout_batch"] // spec["mini_batch_size"],
        num_ppo_epochs=spec["ppo_epochs"],  # default 4; tuneforge's algo.ppo_epochs
        response_length=spec["response_length"],  # default 53; tuneforge's rollout.max_new_tokens
        temperature=spec["temperature"],  # default 0.7; tuneforge samples at rollout.temperature (1.0)
        # Responses end at the first EOS (default: no stop token, all response_length tokens are real).
        stop_token="eos",
        kl_coef=spec["kl_coef"],
        kl_estimator=spec["kl_estimator"],
        gamma=spec["gamma"],
        lam=spec["lam"],
        cliprange=spec["clip_eps"],
        cliprange_value=spec["value_clip_eps"],
        # The policy's AdamW; constant like tuneforge's PPO schedule (TRL's default decays linearly to 0).
        **adamw_fields(spec),
        lr_scheduler_type="constant",
        # tuneforge runs fp32 without activation checkpointing on CPU; TRL defaults to bf16 and checkpointing.
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        # No sample tables (tuneforge: train.samples_every=0), a log record every iteration, nothing saved.
        num_sample_generations=0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
    )


class PhaseClock:
    """Per iteration: when generation starts and ends, when training starts, and what the rollout holds."""

    def __init__(self, stop_token_id: int, pad_token_id: int):
        self.stop, self.pad = stop_token_id, pad_token_id
        self.iterations: list[dict] = []
        self.generate, self.forward = trl_ppo.batch_generation, trl_ppo.forward
        trl_ppo.batch_generation, trl_ppo.forward = self.timed_generate, self.timed_forward

    def timed_generate(self, model, queries, *args, **kwargs):
        start = time.time()
        query_responses, logits = self.generate(model, queries, *args, **kwargs)
        end = time.time()
        responses = trl_ppo.truncate_response(self.stop, self.pad, query_responses[:, queries.shape[1]:])
        self.iterations.append({
            "generate_start": start, "generate_end": end, "rollouts": queries.shape[0],
            "prompt_tokens": int((queries != self.pad).sum()),
            # TRL's real response tokens: those before the first pad after truncation (its padding_mask)
            "response_tokens": int(first_true_indices(responses == self.pad).sum()),
        })
        return query_responses, logits

    def timed_forward(self, model, *args, **kwargs):
        if isinstance(model, trl_ppo.PolicyAndValueWrapper) and "train_start" not in self.iterations[-1]:
            self.iterations[-1]["train_start"] = time.time()
        return self.forward(model, *args, **kwargs)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    tokenizer = AutoTokenizer.from_pretrained(spec["policy_path"])
    tokenizer.padding_side = "left"  # TRL's PPO generates after left-padded prompts (its examples set this too)
    dataset = datasets.load_dataset("json", data_files=spec["prompts_path"], split="train")
    set_seed(spec["seed"])
    load = {"dtype": torch.float32}
    policy = AutoModelForCausalLM.from_pretrained(spec["policy_path"], **load)
    ref_policy = AutoModelForCausalLM.from_pretrained(spec["policy_path"], **load)
    value_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_path"], num_labels=1, **load)
    reward_model = AutoModelForSequenceClassification.from_pretrained(spec["reward_path"], num_labels=1, **load)
    trainer = PPOTrainer(args=ppo_config(spec), processing_class=tokenizer, model=policy, ref_model=ref_policy,
                         reward_model=reward_model, value_model=value_model, train_dataset=dataset)
    recorder = StepRecorder()
    trainer.add_callback(recorder)
    clock = PhaseClock(trainer.stop_token_id, tokenizer.pad_token_id)
    trainer.train()
    if policy.is_gradient_checkpointing or value_model.is_gradient_checkpointing:
        raise SystemExit("error: TRL trained with activation checkpointing on; tuneforge's runs have it off")

    out = Path(spec["output_dir"]) / "metrics.jsonl"
    with out.open("w") as f:
        for step, phases in zip(sorted(recorder.end_time), clock.iterations):
            end, logs = recorder.end_time[step], recorder.logs.get(step, {})
            f.write(json.dumps({
                "step": step,
                "time": end,
                "rollouts": phases["rollouts"],
                "prompt_tokens": phases["prompt_tokens"],
                "response_tokens": phases["response_tokens"],
                "generate_s": phases["generate_end"] - phases["generate_start"],
                "score_s": phases["train_start"] - phases["generate_end"],
                "train_s": end - phases["train_start"],
                "score": logs["objective/scores"],
                "kl": logs["objective/kl"],
                "entropy": logs["policy/entropy_avg"],
            }) + "\n")
    print(f"done: {len(recorder.end_time)} iterations, metrics in {out}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
