"""tuneforge's GRPO vs TRL's GRPOTrainer on the same computation, on CPU: rollouts/s (rollout + update), paired.

    python -m bench.grpo_vs_trl [--steps 12] [--repeats 3] [--prompts-per-iteration 16] [--samples-per-prompt 4]
                                [--mini-batch-size 32] [--max-new-tokens 16] [--model-size small|tiny]
                                [--threads N] [--out bench/results/grpo_vs_trl.json]

Both sides load the same policy directory, written here (tuneforge's random-init Llama of `--model-size`,
`trainer.model.build_causal_lm`; by default `small`: hidden 512, 8 layers, about 25M parameters), and sample from the same prompts: the synthetic suite's sft train split as
tuneforge's PPO driver builds them (bos + the text up to and including "\\nAnswer:"), handed to TRL as text that its
tokenizer call turns into the same token ids (checked for every prompt before any run). Each iteration takes
`--prompts-per-iteration` prompts, samples `--samples-per-prompt` (G) responses of at most `--max-new-tokens`
tokens each at temperature 1 (no top-k, top-p 1), scores them with tuneforge's exact-match function against the
prompts' answers, normalises each reward by its group's mean and std (GRPO), and trains one pass in mini-batches of
`--mini-batch-size` rollouts, one optimizer step each, with the clipped surrogate (clip 0.2 low, 0.28 high: DAPO's
clip-higher, tuneforge's `algo=grpo` default) aggregated as a token mean, no KL term and so no reference model, fp32,
no activation checkpointing, constant learning rate, the same AdamW and gradient clipping.

tuneforge runs as its real CLI (`python -m rlhf.ppo algo=grpo`: a local Ray instance on loopback, the policy's 2 ranks
and the reward function's actor, no critic and no reference) with the defaults of `conf/algo/grpo.yaml` apart from
the model path and the sizes above, and no evaluation or checkpoint inside the run. TRL 1.16 runs in
`bench/trl_grpo.py` as one plain process with its defaults except what equality needs (that file lists each change
and why). What the two compute differently:
- old log-probs: tuneforge records each sampled token's log-prob while sampling (`rollout.old_logprobs=auto` in
  fp32); TRL computes them in a forward pass over the batch (its second mini-batch is off-policy after the first);
- prompts: TRL generates for the G copies of every prompt as G rows, as tuneforge does (neither shares the prompt's
  prefill across its group);
- TRL's response tokens include the EOS, tuneforge's response length does too (`response/length_mean`); with a
  random-init policy almost every response runs to `--max-new-tokens`.

Throughput is rollouts per second of wall time between iteration ends after the first `--skip-steps` iterations
(each iteration generates and trains on prompts x G rollouts), with real prompt and response tokens per second, the
mean phase times (generate / score / train) and the mean reward over the measured iterations; every run reports the
policy's mean token entropy over its last `--loss-window` iterations (`final entropy`) as a check that both sides
sample from the same policy. The result file holds what `bench.harness.compare` records: medians, `paired` (the
tuneforge/TRL ratio of each repeat), the policy's parameter count and how busy the machine was before each run.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Optional

if not __package__:  # run as `python bench/grpo_vs_trl.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402  (after the sys.path fix above)
from bench.ppo_vs_trl import (compose_ppo, model_config, run_driver, save_models, tuneforge_layout,  # noqa: E402
                              tuneforge_records)

GRPO = harness.Comparison(
    name="grpo_vs_trl", stage="ppo", data="sft", data_columns=("prompt", "answer"),
    tuneforge_overrides=(
        "algo=grpo",
        "data.eval_path=null",  # no evaluation before or after the iterations: TRL's run has none either
        "train.eval_every=0",
        "train.samples_every=0",
        "train.save_every=0",  # the one checkpoint comes after the last iteration (outside the measured window)
    ),
    systems=("tuneforge", "trl"),
    optional_systems=("tuneforge-zero0", "tuneforge-zero3", "tuneforge-1rank", "tuneforge-unshared"),
    trl_systems=("trl",),
    counts={"rollouts": "rollouts", "response_tokens": "resp tok", "prompt_tokens": "prompt tok"},
    sizes={"steps": 12, "prompts_per_iteration": 16, "samples_per_prompt": 4, "mini_batch_size": 32,
           "max_new_tokens": 16},
    size_help={"steps": "GRPO iterations per run (each: generate, score, update)",
               "prompts_per_iteration": "prompts per iteration (rollout.prompts_per_iteration; TRL: generation "
                                        "batch / num_generations)",
               "samples_per_prompt": "responses per prompt, G (rollout.samples_per_prompt; TRL's num_generations)",
               "mini_batch_size": "rollouts per optimizer step (algo.mini_batch_size; TRL's per-device batch)",
               "max_new_tokens": "tokens generated per rollout at most (rollout.max_new_tokens; TRL's "
                                 "max_completion_length)"},
    final="entropy",
    means={"generate_s": "gen s", "score_s": "score s", "train_s": "train s", "score": "reward"},
    profiled=False,  # tuneforge's work runs in Ray actors, outside the process py-spy would sample
    # ~25M parameters: the tiny default (0.9M) measures per-call overheads, not the work of an RL step.
    model_size="small",
)

# What each tuneforge system adds to the shared overrides.
SYSTEM_OVERRIDES = {
    "tuneforge": (),
    "tuneforge-zero0": ("actor.deepspeed.stage=0",),  # the policy's 2 ranks unpartitioned (auto picks it here)
    "tuneforge-zero3": ("actor.deepspeed.stage=3",),  # under ZeRO-3: the default until 2026-12-06
    "tuneforge-1rank": ("actor.devices_per_node=1", "cluster.torch_threads=2"),  # one policy rank (unpartitioned by `auto`) on 2 threads, as TRL
    "tuneforge-unshared": ("rollout.share_prompt=false",),  # every rollout's prompt computed whole, as TRL does
}


def check_matchable(cfg) -> None:
    """Stop where tuneforge's resolved config asks for something this comparison does not set up on TRL's side."""
    r, a = cfg.rollout, cfg.algo
    fixed = {"algo.advantage": (a.advantage, "grpo"), "algo.norm_by_std": (a.norm_by_std, True),
             "algo.ratio": (a.ratio, "token"), "algo.loss_agg": (a.loss_agg, "token_mean"),
             "algo.kl_coef": (a.kl_coef, 0.0), "algo.ppo_epochs": (a.ppo_epochs, 1),
             "algo.entropy_coef": (a.entropy_coef, 0.0), "algo.tis_cap": (a.tis_cap, None),
             "algo.dynamic_sampling": (a.dynamic_sampling, False), "algo.overlong_buffer": (a.overlong_buffer, 0),
             "rollout.top_p": (r.top_p, 1.0), "rollout.top_k": (r.top_k, 0)}
    for key, (value, trl) in fixed.items():
        if value != trl:
            raise SystemExit(f"error: {key}={value}: this comparison sets TRL up for {trl} only")
    if cfg.rollout_batch % a.mini_batch_size:
        raise SystemExit(f"error: --mini-batch-size {a.mini_batch_size} must divide prompts x G = {cfg.rollout_batch}")


def trl_spec(cfg, policy: Path, prompts_path: Path, threads: int) -> dict:
    """What bench/trl_grpo.py needs, taken from tuneforge's resolved config."""
    from trainer.model import resolve_lr_for_model

    r, a = cfg.rollout, cfg.algo
    o = resolve_lr_for_model(cfg.actor.optim, cfg.actor.peft.method, cfg.actor.model, key="actor.optim")[0]
    return {
        "policy_path": str(policy), "prompts_path": str(prompts_path), "seed": cfg.seed,
        "iterations": cfg.train.iterations, "rollout_batch": cfg.rollout_batch,
        "samples_per_prompt": r.samples_per_prompt, "mini_batch_size": a.mini_batch_size,
        "max_new_tokens": r.max_new_tokens, "temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k,
        "clip_eps": a.clip_eps, "clip_eps_high": a.clip_eps_high, "kl_coef": a.kl_coef,
        "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
        "max_grad_norm": o.max_grad_norm, "threads": threads,
    }


def write_prompts(prompts: list, tokenizer, path: Path) -> None:
    """The prompts as TRL users hand them over (text and answer), after checking that TRL's tokenizer call
    (`processing_class(text=...)`, special tokens added) gives back tuneforge's token ids for every one."""
    with path.open("w") as f:
        for i, p in enumerate(prompts):
            text = tokenizer.decode(p.prompt_ids, skip_special_tokens=True)
            if tokenizer(text)["input_ids"] != p.prompt_ids:
                raise SystemExit(f"error: prompt {i}: TRL's tokenization of {text!r} differs from tuneforge's ids")
            f.write(json.dumps({"prompt": text, "answer": p.answer}) + "\n")


def check_trl_records(run_dir: Path, records: list[dict], cfg) -> list[dict]:
    if len(records) != cfg.train.iterations or any(r["rollouts"] != cfg.rollout_batch for r in records):
        raise SystemExit(f"error: {run_dir}: TRL trained {len(records)} iterations of "
                         f"{sorted({r['rollouts'] for r in records})} rollouts, not {cfg.train.iterations} x "
                         f"{cfg.rollout_batch}")
    return records


def main(argv: Optional[list[str]] = None) -> None:
    args = harness.parse_args(GRPO, __doc__, argv)
    with tempfile.TemporaryDirectory(prefix=f"{GRPO.name}_") as tmp:
        work = args.keep_runs or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        from rlhf.scoring import sample_prompts
        from trainer.data import build_prompts
        from trainer.model import load_tokenizer

        policy, _ = save_models(work / "models", args.model_size, args.seed)
        overrides = [
            f"actor.model.name_or_path={policy}",
            f"train.iterations={args.steps}",
            f"rollout.prompts_per_iteration={args.prompts_per_iteration}",
            f"rollout.samples_per_prompt={args.samples_per_prompt}",
            f"rollout.max_new_tokens={args.max_new_tokens}",
            f"algo.mini_batch_size={args.mini_batch_size}",
            f"seed={args.seed}",
            *GRPO.tuneforge_overrides,
        ]
        cfg = compose_ppo(overrides)
        check_matchable(cfg)

        d = cfg.data
        tokenizer = load_tokenizer(cfg.actor.model)
        prompts = build_prompts(d, tokenizer, d.path, d.split, d.format, d.name)
        prompts_path = work / "prompts.jsonl"
        write_prompts(prompts, tokenizer, prompts_path)
        G = cfg.rollout.samples_per_prompt
        prompt_tokens = [G * sum(len(p.prompt_ids) for p in sample_prompts(prompts, it, cfg.rollout.prompts_per_iteration,
                                                                           cfg.seed))
                         for it in range(cfg.train.iterations)]
        spec = trl_spec(cfg, policy, prompts_path, args.threads)
        setup = harness.Setup(work, prompts_path, len(prompts), overrides, cfg,
                              harness.model_parameters(model_config(args.model_size)))

        def run_system(system: str, run_dir: Path):
            if system in GRPO.trl_systems:
                records, wall = harness.run_runner("trl_grpo", run_dir, spec, args.threads, False)
                return check_trl_records(run_dir, records, cfg), wall
            wall = run_driver([*overrides, *SYSTEM_OVERRIDES[system]], run_dir, args.threads, len(prompts))
            roles = {line.split()[0] for line in (run_dir / "placement.txt").read_text().splitlines()[1:]}
            if roles != {"actor", "reward"}:
                raise SystemExit(f"error: {run_dir}: tuneforge ran {sorted(roles)}, not the policy and reward only")
            return tuneforge_records(run_dir, prompt_tokens, cfg.rollout_batch), wall

        harness.compare(args, GRPO, setup, run_system, argv=argv, recorded={
            "trl_spec": {k: v for k, v in spec.items() if not k.endswith("_path")},
            "prompts": {"count": len(prompts), "tokens": sum(len(p.prompt_ids) for p in prompts)},
            "tuneforge_layout": {k: v for k, v in tuneforge_layout(cfg).items() if k in ("torch_threads_per_actor",
                                                                                      "actor", "reward")},
        })


if __name__ == "__main__":
    main()
