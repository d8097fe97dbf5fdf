"""tuneforge's PPO vs TRL's PPOTrainer on the same computation, on CPU: rollouts/s (rollout + update).

    python -m bench.ppo_vs_trl [--steps 30] [--repeats 3] [--rollout-batch 64] [--mini-batch-size 32]
                               [--ppo-epochs 1] [--response-length 16] [--model-size tiny|small] [--threads N]
                               [--floor [--floor-repeats 3]] [--out bench/results/ppo_vs_trl.json]

With --floor, `bench.ppo_floor`'s plain pieces are timed again after each repeat's runs, and every system's
rollouts/s is reported as a share of the floor of its own repeat (paired, as the TRL ratios are): a floor timed in
a separate run minutes later saw another stretch of a machine whose speed drifts.

TRL dropped PPO after 1.12, so its side runs in its own environment (`bash bench/setup_trl_ppo.sh` makes
`bench/.venv-trl-ppo` with TRL 1.12.0, whose `trl.experimental.ppo.PPOTrainer` is the "PPOv2" trainer).

Both sides load the same two model directories, written here: the policy (tuneforge's tiny random-init Llama,
`trainer.model.build_causal_lm`), which is also the reference, and a reward model with a scalar head
(`build_reward_model`, num_labels=1), which is also the critic's/value model's starting point. Both sample from the
same prompts: the synthetic suite's sft train split as tuneforge's PPO driver builds them (bos + the text up to and
including "\\nAnswer:"), handed to TRL as token ids. Each iteration samples `--rollout-batch` prompts, generates
`--response-length` tokens at temperature 1 (top-p 1, no top-k), scores them (policy and reference log-probs,
values, reward), puts the k1 KL penalty (fixed `algo.kl_coef`, the PPO default) in the per-token reward with the raw score on the
last token, computes GAE (gamma 1, lambda 0.95), whitens the advantages, and trains `--ppo-epochs` passes in
mini-batches of `--mini-batch-size` rollouts (clipped surrogate 0.2, clipped value loss 0.2), one optimizer step
per mini-batch, fp32, no activation checkpointing, constant learning rate.

tuneforge runs as its real CLI (`python -m rlhf.ppo`: a local Ray instance on loopback with four actor groups,
the policy on 2 ranks) with the defaults of `conf/ppo.yaml` apart from the model paths, the sizes above and what
equality with TRL needs (`TUNEFORGE_OVERRIDES`). TRL runs in `bench/trl_ppo.py` as one plain process with its
defaults except what equality needs (that file lists each change and why). What the two compute differently, and
cannot be aligned without changing either, is listed in bench/README.md.

Throughput is rollouts per second of wall time between iteration ends after the first `--skip-steps` iterations
(each iteration generates and trains on `--rollout-batch` rollouts), with real prompt and response tokens per
second, the mean phase times (generate / score / train) and the mean raw reward score and per-sequence KL over the
measured iterations. As a check that both sides sample from the same policy, every run reports the mean token
entropy of the policy over its last `--loss-window` iterations (`final entropy`).

Systems (`--systems`), run in this order `--repeats` times; the tables show medians and paired tuneforge/TRL ratios:
- tuneforge: the PPO defaults (the policy's 2 ranks and the critic's 1 rank unpartitioned, both by
  `deepspeed.stage=auto`: every bench size's training state is under `auto_partition_above_gb`, where until
  2026-12-06 the policy's 2 ranks were under ZeRO-3; old log-probs recorded while sampling,
  `rollout.old_logprobs=auto` in fp32; the next rollouts sampled while the critic's update finishes,
  `rollout.overlap_critic_update`);
- trl: TRL 1.12.0's PPOTrainer;
- tuneforge-zero0: the policy and critic unpartitioned, asked for (`actor.deepspeed.stage=0 critic.deepspeed.stage=0`:
  the defaults' choice at these sizes);
- tuneforge-zero3-recompute: the defaults before 2026-11-26's second change: policy and critic under ZeRO-3 and old
  log-probs from a second policy forward (`actor.deepspeed.stage=3 critic.deepspeed.stage=3
  rollout.old_logprobs=recompute`).
Optional systems (run only when --systems names them): tuneforge-zero3 (the policy's 2 ranks under ZeRO-3, the
default until 2026-12-06 and for models past the threshold: `actor.deepspeed.stage=3`), tuneforge-noclip (no
gradient clipping, as TRL),
tuneforge-plain-linear (ZeRO-3's Linear wrapper off for training too), tuneforge-no-overlap (each iteration waits for
both updates before sampling: `rollout.overlap_critic_update=false`), tuneforge-persist (the policy's ZeRO-3 keeps
DeepSpeed's 100k parameter persistence threshold, the default before 2026-11-27).
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Optional

if not __package__:  # run as `python bench/ppo_vs_trl.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402  (after the sys.path fix above)

TRL_VENV = harness.ROOT / "bench" / ".venv-trl-ppo"

PPO = harness.Comparison(
    name="ppo_vs_trl", stage="ppo", data="sft", data_columns=("input_ids",),
    tuneforge_overrides=(
        "algo.normalize_reward=false",  # TRL scores are raw (and the reward dir has no reward_stats.json anyway)
        "algo.reward_clip=null",  # TRL does not clip scores
        "data.eval_path=null",  # no evaluation before or after the iterations: TRL's PPOTrainer has none
        "train.eval_every=0",
        "train.samples_every=0",  # TRL's num_sample_generations=0
        "train.save_every=0",  # the one checkpoint comes after the last iteration (outside the measured window)
    ),
    systems=("tuneforge", "trl", "tuneforge-zero0", "tuneforge-zero3-recompute"),
    # Gradient clipping off on both tuneforge models, as TRL's PPO loop never clips: isolates that difference.
    optional_systems=("tuneforge-zero3", "tuneforge-noclip", "tuneforge-plain-linear", "tuneforge-no-overlap",
                      "tuneforge-persist"),
    trl_systems=("trl",),
    counts={"rollouts": "rollouts", "response_tokens": "resp tok", "prompt_tokens": "prompt tok"},
    sizes={"steps": 30, "rollout_batch": 64, "mini_batch_size": 32, "ppo_epochs": 1, "response_length": 16},
    size_help={"steps": "PPO iterations per run (each: generate, score, update)",
               "rollout_batch": "rollouts per iteration (rollout.prompts_per_iteration; TRL's batch_size)",
               "mini_batch_size": "rollouts per optimizer step (algo.mini_batch_size; TRL: batch / num_mini_batches)",
               "ppo_epochs": "passes over each rollout batch (algo.ppo_epochs; TRL's num_ppo_epochs)",
               "response_length": "tokens generated per rollout (rollout.max_new_tokens; TRL's response_length)"},
    final="entropy",
    means={"generate_s": "gen s", "score_s": "score s", "train_s": "train s", "score": "score", "kl": "kl"},
    trl_python=TRL_VENV / "bin" / "python",
    profiled=False,  # tuneforge's work runs in Ray actors, outside the process py-spy would sample
)

# What each tuneforge system adds to the shared overrides.
SYSTEM_OVERRIDES = {
    "tuneforge": (),
    "tuneforge-zero0": ("actor.deepspeed.stage=0", "critic.deepspeed.stage=0"),
    "tuneforge-zero3": ("actor.deepspeed.stage=3",),
    "tuneforge-plain-linear": ("actor.deepspeed.memory_efficient_linear=false",),
    "tuneforge-noclip": ("actor.optim.max_grad_norm=0", "critic.optim.max_grad_norm=0"),
    "tuneforge-no-overlap": ("rollout.overlap_critic_update=false",),
    "tuneforge-persist": ("actor.deepspeed.stage3_param_persistence_threshold=100000",),
    "tuneforge-zero3-recompute": ("actor.deepspeed.stage=3", "critic.deepspeed.stage=3", "rollout.old_logprobs=recompute"),
}


def add_arguments(p) -> None:
    p.add_argument("--tuneforge-threads", type=int, default=None,
                   help="torch threads of each of tuneforge's Ray actors (cluster.torch_threads; default: the "
                        "config's 1); --threads sets TRL's process and tuneforge's driver")
    p.add_argument("--floor", action="store_true",
                   help="after each repeat's runs, time the floor (bench.ppo_floor's plain pieces, --floor-repeats "
                        "timings each) and report every system's share of it per repeat")
    p.add_argument("--floor-repeats", type=int, default=3, help="timings of each floor piece per repeat (--floor)")


def floor_rate(args, run_dir: Path) -> float:
    """The floor's rollouts/s for the bench's settings, timed now by `bench.ppo_floor` (its plain pieces, one
    thread, in a process of its own); its result file stays in `run_dir`."""
    out = run_dir / "floor.json"
    cmd = [sys.executable, "-m", "bench.ppo_floor", "--model-size", args.model_size,
           "--rollout-batch", str(args.rollout_batch), "--mini-batch-size", str(args.mini_batch_size),
           "--response-length", str(args.response_length), "--repeats", str(args.floor_repeats),
           "--seed", str(args.seed), "--no-zero3", "--out", str(out)]
    harness.run_child(cmd, run_dir, 1, False)
    return json.loads(out.read_text())["floors_rollouts_per_s"]["floor"]


def model_config(model_size: str):
    """The `trainer.config.ModelConfig` of tuneforge's tiny random-init model at --model-size."""
    from trainer.config import ModelConfig, TinyModelConfig

    return ModelConfig(tiny=TinyModelConfig(**harness.MODEL_SIZES[model_size]))


def save_models(out: Path, model_size: str, seed: int) -> tuple[Path, Path]:
    """Write the policy and the reward model, each with the shipped tokenizer, as tuneforge builds its tiny
    random-init models; both sides load them with `from_pretrained`."""
    import torch
    from transformers import set_seed

    from trainer.model import build_causal_lm, build_reward_model, load_tokenizer

    cfg = model_config(model_size)
    tokenizer = load_tokenizer(cfg)
    dirs = []
    for name, build in (("policy", build_causal_lm), ("reward", build_reward_model)):
        set_seed(seed)
        model = build(cfg, tokenizer, torch.float32)
        model.config.use_cache = True  # as an export is saved: generation uses the KV cache on both sides
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        dirs.append(out / name)
    return dirs[0], dirs[1]


def compose_ppo(overrides: list[str]):
    """tuneforge's typed, validated PPOConfig for these overrides (what `python -m rlhf.ppo` will run)."""
    from rlhf.config import validate
    from trainer.compose import compose

    cfg = compose("ppo", overrides)
    validate(cfg)
    return cfg


def check_matchable(cfg) -> None:
    """Stop where tuneforge's resolved config asks for something TRL's PPOTrainer cannot do."""
    r, a = cfg.rollout, cfg.algo
    fixed = {"rollout.samples_per_prompt": (r.samples_per_prompt, 1), "rollout.top_p": (r.top_p, 1.0),
             "rollout.top_k": (r.top_k, 0), "algo.kl_in": (a.kl_in, "reward"),
             "algo.kl_controller": (a.kl_controller, "fixed"), "algo.whiten_advantages": (a.whiten_advantages, True),
             "algo.entropy_coef": (a.entropy_coef, 0.0),
             "algo.critic_warmup_iterations": (a.critic_warmup_iterations, 0)}
    for key, (value, trl) in fixed.items():
        if value != trl:
            raise SystemExit(f"error: {key}={value}: TRL's PPOTrainer has only {trl}")
    if a.kl_estimator not in ("k1", "k3"):
        raise SystemExit(f"error: algo.kl_estimator={a.kl_estimator}: TRL's PPOTrainer has k1 and k3")
    if a.value_clip_eps is None:
        raise SystemExit("error: algo.value_clip_eps=null: TRL's PPOTrainer always clips the value loss")


def trl_spec(cfg, policy: Path, reward: Path, prompts_path: Path, threads: int) -> dict:
    """What bench/trl_ppo.py needs, taken from tuneforge's resolved config."""
    from trainer.model import resolve_lr_for_model

    r, a = cfg.rollout, cfg.algo
    o = resolve_lr_for_model(cfg.actor.optim, cfg.actor.peft.method, cfg.actor.model, key="actor.optim")[0]
    return {
        "policy_path": str(policy), "reward_path": str(reward), "prompts_path": str(prompts_path),
        "seed": cfg.seed, "iterations": cfg.train.iterations, "rollout_batch": cfg.rollout_batch,
        "mini_batch_size": a.mini_batch_size, "ppo_epochs": a.ppo_epochs, "response_length": r.max_new_tokens,
        "temperature": r.temperature, "kl_coef": a.kl_coef, "kl_estimator": a.kl_estimator, "gamma": a.gamma,
        "lam": a.lam, "clip_eps": a.clip_eps, "value_clip_eps": a.value_clip_eps,
        "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay, "threads": threads,
    }


def tuneforge_layout(cfg) -> dict:
    """Where tuneforge's work runs: ranks, micro-batch and ZeRO stage per role (as its actors resolve
    `deepspeed.stage=auto`), and the torch threads of each Ray actor."""
    from trainer.contracts import ROLES

    return {"torch_threads_per_actor": cfg.cluster.torch_threads,
            **{role: {"ranks": cfg.role(role).world_size, "micro_batch_size": cfg.role(role).micro_batch_size,
                      "zero_stage": cfg.zero_stage(role)[0].stage} for role in ROLES}}


def tuneforge_records(run_dir: Path, prompt_tokens: list[int], rollout_batch: int) -> list[dict]:
    """Per-iteration records of a tuneforge run from its metrics.jsonl; prompt tokens come from replaying its
    prompt sampler, and every iteration must have trained on `rollout_batch` rollouts."""
    records = []
    for r in harness.read_jsonl(run_dir / "metrics.jsonl"):
        if "time/iteration_s" not in r:
            continue  # the step-0 record (no evaluation here: empty)
        rollouts = round(r["throughput/rollouts_per_s"] * r["time/iteration_s"])
        if rollouts != rollout_batch:
            raise SystemExit(f"error: {run_dir}: iteration {r['step']} trained on {rollouts} rollouts, "
                             f"not {rollout_batch}")
        records.append({
            "step": r["step"], "time": r["time"], "rollouts": rollouts,
            "prompt_tokens": prompt_tokens[r["step"] - 1],
            "response_tokens": round(r["response/length_mean"] * rollouts),
            "generate_s": r["time/generate_s"], "score_s": r["time/forward_s"], "train_s": r["time/train_s"],
            "score": r["reward/score_raw_mean"], "kl": r["kl/seq_mean"], "entropy": r["policy/entropy"],
        })
    return records


def run_driver(overrides: list[str], run_dir: Path, threads: int, prompts: int) -> float:
    """Run `python -m rlhf.ppo` once; stop unless its driver built the bench's `prompts` prompts. Wall seconds."""
    cmd = [sys.executable, "-m", "rlhf.ppo", *overrides, f"hydra.run.dir={run_dir}"]
    wall = harness.run_child(cmd, run_dir, threads, False)
    seen = re.search(r"prompts=(\d+)", (run_dir / "output.log").read_text())
    if seen is None or int(seen.group(1)) != prompts:
        raise SystemExit(f"error: {run_dir}: tuneforge's driver built other prompts than the bench "
                         f"({seen.group(0) if seen else 'none found'}, expected prompts={prompts})")
    return wall


def main(argv: Optional[list[str]] = None) -> None:
    args = harness.parse_args(PPO, __doc__, argv, add_arguments)
    if args.floor and args.ppo_epochs != 1:  # before minutes of set-up
        raise SystemExit("error: --floor: bench.ppo_floor times one pass over the rollouts (give --ppo-epochs 1)")
    if args.floor and args.floor_repeats < 1:
        raise SystemExit(f"error: --floor-repeats {args.floor_repeats}: the floor needs at least one timing per piece")
    if not PPO.trl_python.exists() and "trl" in args.systems:
        raise SystemExit(f"error: no {PPO.trl_python}; run `bash bench/setup_trl_ppo.sh` first (TRL's side runs "
                         f"in its own environment: PPOTrainer is gone from the TRL tuneforge uses)")
    with tempfile.TemporaryDirectory(prefix=f"{PPO.name}_") as tmp:
        work = args.keep_runs or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        from rlhf.scoring import sample_prompts
        from trainer.data import build_prompts
        from trainer.model import load_tokenizer

        policy, reward = save_models(work / "models", args.model_size, args.seed)
        overrides = [
            *(f"{role}.model.name_or_path={policy}" for role in ("actor", "reference")),
            *(f"{role}.model.name_or_path={reward}" for role in ("critic", "reward")),
            f"train.iterations={args.steps}",
            f"rollout.prompts_per_iteration={args.rollout_batch}",
            f"rollout.max_new_tokens={args.response_length}",
            f"algo.mini_batch_size={args.mini_batch_size}",
            f"algo.ppo_epochs={args.ppo_epochs}",
            f"seed={args.seed}",
            *PPO.tuneforge_overrides,
            *([f"cluster.torch_threads={args.tuneforge_threads}"] if args.tuneforge_threads else []),
        ]
        cfg = compose_ppo(overrides)
        check_matchable(cfg)

        # The prompts exactly as tuneforge's driver builds them, for TRL as token ids, and each iteration's prompt
        # tokens on tuneforge's side from its own sampler.
        d = cfg.data
        prompts = build_prompts(d, load_tokenizer(cfg.actor.model), d.path, d.split, d.format, d.name)
        prompts_path = work / "prompts.jsonl"
        with prompts_path.open("w") as f:
            for p in prompts:
                f.write(json.dumps({"input_ids": p.prompt_ids}) + "\n")
        prompt_tokens = [sum(len(p.prompt_ids) for p in sample_prompts(prompts, it, cfg.rollout_batch, cfg.seed))
                         for it in range(cfg.train.iterations)]
        spec = trl_spec(cfg, policy, reward, prompts_path, args.threads)
        setup = harness.Setup(work, prompts_path, len(prompts), overrides, cfg,
                              harness.model_parameters(model_config(args.model_size)))

        def run_system(system: str, run_dir: Path):
            if system in PPO.trl_systems:
                return harness.run_runner("trl_ppo", run_dir, spec, args.threads, False, PPO.trl_python)
            wall = run_driver([*overrides, *SYSTEM_OVERRIDES[system]], run_dir, args.threads, len(prompts))
            return tuneforge_records(run_dir, prompt_tokens, cfg.rollout_batch), wall

        harness.compare(args, PPO, setup, run_system, argv=argv,
                        floor=(lambda run_dir: floor_rate(args, run_dir)) if args.floor else None, recorded={
            "trl_spec": {k: v for k, v in spec.items() if not k.endswith("_path")},
            "prompts": {"count": len(prompts), "tokens": sum(len(p.prompt_ids) for p in prompts)},
            "tuneforge_layout": tuneforge_layout(cfg),
        })


if __name__ == "__main__":
    main()
