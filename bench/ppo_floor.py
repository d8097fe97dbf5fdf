"""The compute floor of one PPO iteration of `bench.ppo_vs_trl` (or, with --algo grpo, one GRPO iteration of
`bench.grpo_vs_trl`) on this machine: each piece of the iteration's work timed alone, in one process on one
thread, as plain PyTorch with the bench's Hugging Face models (no DeepSpeed, no Ray, no collectives), so what
remains is the work itself.

    python -m bench.ppo_floor [--algo ppo|grpo] [--rollout-batch 64] [--mini-batch-size 32]
                              [--response-length 16] [--policy-ranks 2] [--model-size tiny] [--repeats 7]
                              [--samples-per-prompt G] [--[no-]share-prompt]
                              [--cores N] [--[no-]zero3] [--zero3-option KEY=VALUE ...]
                              [--vs bench/results/ppo_vs_trl.json] [--out bench/results/ppo_floor.json]

The pieces, each the median of --repeats timings after two warm-up rounds (GRPO's iteration, as both benches
run it, has only the first and the policy update: no KL term, so no reference; a reward function, no reward
model; no critic; and the old log-probs are the sampler's, which tuneforge keeps and TRL recomputes):
- generate: one policy rank's share of the prompts (rollout batch / --policy-ranks), sampled at temperature 1
  with the KV cache, counted once per rank; every response runs to --response-length (no stop token), so every
  pass below reads full-length rollouts;
- reference log-probs, reward scores, critic values: one forward pass each over every rollout, in micro-batches
  of 32; every pass is the role's own (`RoleWorker.response_logprobs`, `sequence_scores`, `response_values`: the
  head and the last block's MLP only where their output is read: where a response token is scored, at each
  rollout's last token, at each response token's position);
- policy update, critic update: forward + backward + AdamW step per mini-batch over every rollout (no gradient
  clipping: about a millisecond here, which the ZeRO-3 piece below does pay);
- GRPO's rollouts come in groups of --samples-per-prompt (G) rows per prompt, as its bench samples them, and with
  --share-prompt (the default, as tuneforge's `rollout.share_prompt`) a group's prompt is prefilled once when
  sampling and laid out once in the log-prob pass; --no-share-prompt runs every row whole, the work TRL does;
- the policy update again as tuneforge runs it under ZeRO-3 (its default until 2026-12-06, and now for models whose
  training state is over `deepspeed.auto_partition_above_gb`): a ZeRO-3 engine (`trainer.engine`) over --policy-ranks
  processes started by torchrun, each mini-batch split over them, counted as ranks x its median wall time;
  --zero3-option sets a `DeepSpeedConfig` field for it.

Every piece runs with glibc told to keep the memory a step frees (`keep_freed_memory`; recorded as `allocator`):
the plain update frees its gradients at every step, and glibc's defaults give that memory back to the kernel, which
hands it out again page by page. That makes the floor faster than PyTorch's defaults would (a stricter limit);
tuneforge's roles keep their gradients in one buffer and run with glibc's defaults.

The floor is the plain pieces' sum divided by --cores: the iteration time if every core did nothing but this
work, with no overhead and perfect packing. A second floor swaps in the ZeRO-3 update. No real system reaches
either; they tell how far a throughput target is from what the machine can do at all. With --vs, both are set
beside the rows of a `bench.ppo_vs_trl` result, as multiples of its TRL median.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

if not __package__:  # run as `python bench/ppo_floor.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import harness  # noqa: E402


def keep_freed_memory() -> str:
    """Fix glibc's mmap and trim thresholds for this process, so that what a step frees stays in the heap for the
    next step instead of going back to the kernel (whose fresh pages fault in zeroed). What it did, in words."""
    if platform.libc_ver()[0] != "glibc":
        return f"allocator: the C library's defaults ({platform.libc_ver()[0] or 'not glibc'})"
    mallopt = ctypes.CDLL(None).mallopt
    # M_MMAP_THRESHOLD: 32 MiB, the most glibc takes on 64-bit; M_TRIM_THRESHOLD: mallopt's int maximum; M_TOP_PAD.
    settings = {-3: 32 << 20, -1: (1 << 31) - 1, -2: 64 << 20}
    if not all(mallopt(param, value) == 1 for param, value in settings.items()):
        return "allocator: glibc refused the thresholds (its defaults)"
    return "allocator: glibc keeps freed memory (mmap threshold 32 MiB, no trimming under 2 GiB)"


def median_s(fn: Callable[[], None], repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def role_pass(method: str, model, rollouts) -> torch.Tensor:
    """A `RoleWorker` pass (`sequence_scores`, `response_values`) of `model` over `rollouts`, as the roles run it."""
    from types import SimpleNamespace

    from rlhf.worker import RoleWorker

    return getattr(RoleWorker, method)(SimpleNamespace(model=model), rollouts)


def response_logprobs(model, rollouts, share_prompt: bool) -> torch.Tensor:
    """(b, t) the rollouts' response log-probs as the policy computes them (`RoleWorker.response_logprobs`: the
    head at the positions that score a response token; with `share_prompt` each group's prompt once)."""
    from types import SimpleNamespace

    from rlhf.experience import shared_prompt_layout
    from rlhf.worker import RoleWorker

    if share_prompt:
        rollouts = rollouts.with_fields(layout=shared_prompt_layout(rollouts))
    return RoleWorker.response_logprobs(SimpleNamespace(model=model), rollouts, 1.0)


def micro_batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def measure(args: argparse.Namespace, work: Path) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from bench.ppo_vs_trl import compose_ppo, save_models
    from rlhf.actor import cache_kwarg, shared_prefill
    from rlhf.experience import build_rollout
    from rlhf.scoring import sample_prompts
    from trainer.data import build_prompts
    from trainer.evaluate import left_pad
    from trainer.model import load_tokenizer

    policy_dir, reward_dir = save_models(work, args.model_size, args.seed)
    cfg = compose_ppo([*(f"{role}.model.name_or_path={policy_dir}" for role in ("actor", "reference")),
                       *(f"{role}.model.name_or_path={reward_dir}" for role in ("critic", "reward")),
                       f"seed={args.seed}"])
    tokenizer = load_tokenizer(cfg.actor.model)
    d = cfg.data
    G = args.samples_per_prompt
    prompts = sample_prompts(build_prompts(d, tokenizer, d.path, d.split, d.format, d.name), 0,
                             args.rollout_batch // G, args.seed)
    prompt_ids = [p.prompt_ids for p in prompts for _ in range(G)]  # each group's G rows together
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir)
    share = args.rollout_batch // args.policy_ranks

    def generate(rows: slice) -> torch.Tensor:
        cache = shared_prefill(policy, prompt_ids[rows], ids[rows], mask[rows]) if args.share_prompt else None
        return policy.generate(input_ids=ids[rows], attention_mask=mask[rows], do_sample=True, temperature=1.0,
                               top_k=0, top_p=1.0, max_new_tokens=args.response_length,
                               min_new_tokens=args.response_length, pad_token_id=tokenizer.pad_token_id,
                               **(cache_kwarg(policy, cache) if cache is not None else {}))

    torch.manual_seed(args.seed)
    with torch.no_grad():
        sequences = generate(slice(None))  # (B, prompt width + response length): what every pass below reads
    attention = torch.cat([mask, torch.ones(len(sequences), args.response_length, dtype=mask.dtype)], dim=1)
    rollouts = build_rollout(prompt_ids, [row[ids.shape[1]:].tolist() for row in sequences], tokenizer.pad_token_id)
    micros = micro_batches(len(sequences), 32)

    def lm_forward(rows: slice):  # the policy's own log-prob pass (`RoleWorker.response_logprobs`), shared or not
        return response_logprobs(policy, rollouts.select(rows), args.share_prompt)

    def scores(rows: slice):  # the reward model's pass: a score at each rollout's last token
        return role_pass("sequence_scores", reward, rollouts.select(rows))

    def values(rows: slice):  # the critic's: a value at each response token's position
        return role_pass("response_values", reward, rollouts.select(rows))

    def update(model: torch.nn.Module, forward: Callable[[slice], torch.Tensor]) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-7, fused=True)

        def run() -> None:
            for rows in micro_batches(len(sequences), args.mini_batch_size):
                forward(rows).float().square().mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return run

    def frozen(forward: Callable[[slice], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                for rows in micros:
                    forward(rows)
        return run

    def generate_share() -> None:
        with torch.no_grad():
            generate(slice(0, share))

    torch.save({"sequences": sequences, "attention": attention,
                **{k: getattr(rollouts, k) for k in ("prompt_lengths", "responses", "response_mask")}},
               work / "rollouts.pt")
    pieces = {"generate": median_s(generate_share, args.repeats) * args.policy_ranks}
    if args.algo == "ppo":
        pieces["reference log-probs"] = median_s(frozen(lm_forward), args.repeats)
        pieces["reward scores"] = median_s(frozen(scores), args.repeats)
        pieces["critic values"] = median_s(frozen(values), args.repeats)
    pieces["policy update"] = median_s(update(policy, lm_forward), args.repeats)
    if args.algo == "ppo":
        pieces["critic update"] = median_s(update(reward, values), args.repeats)
    return pieces


def parameters(args: argparse.Namespace) -> int:
    """The policy's parameter count (what the vs-TRL benches record as `parameters`)."""
    from bench.ppo_vs_trl import model_config

    return harness.model_parameters(model_config(args.model_size))


def zero3_options(pairs: list[str]) -> list[tuple[str, int]]:
    """--zero3-option KEY=VALUE pairs as `DeepSpeedConfig` fields (integer values: thresholds and sizes)."""
    from dataclasses import fields

    from trainer.config import DeepSpeedConfig

    names = {f.name for f in fields(DeepSpeedConfig)}
    out = []
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in names or not value.lstrip("-").isdigit():
            raise SystemExit(f"error: --zero3-option {pair}: expected KEY=INTEGER with KEY a field of "
                             f"trainer.config.DeepSpeedConfig")
        out.append((key, int(value)))
    return out


def zero3_child(args: argparse.Namespace) -> None:
    """One rank of the policy's update as tuneforge runs it under ZeRO-3: a DeepSpeed ZeRO-3 engine built by
    `trainer.engine` over the ranks torchrun started, each mini-batch split over them, one step per mini-batch.
    Rank 0 writes the median seconds of one iteration's update."""
    from transformers import AutoModelForCausalLM

    from rlhf.experience import Experience
    from trainer.config import DeepSpeedConfig, OptimConfig
    from trainer.engine import build_deepspeed_config, build_engine, init_distributed, optimizer_step, zero3_init_context

    info = init_distributed()
    rollouts = torch.load(args.work / "rollouts.pt", weights_only=True)
    sequences, attention = rollouts["sequences"], rollouts["attention"]
    per_rank = args.mini_batch_size // info.world_size
    ds = DeepSpeedConfig(stage=3, **dict(zero3_options(args.zero3_option)))
    config = build_deepspeed_config(ds, per_rank, 1, info.world_size, 1.0)
    with zero3_init_context(config):
        model = AutoModelForCausalLM.from_pretrained(args.work / "policy")
    engine = build_engine(model, ds, OptimConfig(lr=1e-7, warmup_steps=0, min_lr_ratio=1.0), config, 10**6)

    exp = Experience(sequences, attention, rollouts["prompt_lengths"], rollouts["responses"], rollouts["response_mask"])

    def run() -> None:
        for start in range(0, len(sequences), args.mini_batch_size):
            rows = slice(start + info.rank * per_rank, start + (info.rank + 1) * per_rank)
            out = response_logprobs(engine, exp.select(rows), args.share_prompt)
            engine.backward(out.float().square().mean(), scale_wrt_gas=False)
            optimizer_step(engine)

    seconds = median_s(run, args.repeats)
    if info.rank == 0:
        (args.work / "zero3.json").write_text(json.dumps({"seconds": seconds, "ranks": info.world_size}))


def zero3_policy_update(args: argparse.Namespace, work: Path) -> float:
    """Core-seconds of one iteration's policy update under ZeRO-3 over --policy-ranks processes (ranks x the
    median wall time: each rank holds a core for the whole update)."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.policy_ranks}",
           "-m", "bench.ppo_floor", "--zero3-child", str(work), f"--mini-batch-size={args.mini_batch_size}",
           f"--response-length={args.response_length}", f"--repeats={args.repeats}", f"--algo={args.algo}",
           f"--samples-per-prompt={args.samples_per_prompt}",
           "--share-prompt" if args.share_prompt else "--no-share-prompt",
           *(f"--zero3-option={pair}" for pair in args.zero3_option)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=harness.ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: the ZeRO-3 policy update failed:\n{done.stderr[-3000:]}")
    measured = json.loads((work / "zero3.json").read_text())
    return measured["seconds"] * measured["ranks"]


def floor_tables(result: dict) -> str:
    """Markdown, from a result file: the pieces, the floors, and (with `vs`) the floors beside a ppo_vs_trl run's
    medians, as multiples of its TRL median and as shares of the floor."""
    cores, ranks = result["settings"]["cores"], result["settings"]["policy_ranks"]
    rows = [[name, f"{sec:.3f}"] for name, sec in result["pieces_s"].items()]
    zero3_update = result["zero3_policy_update_core_s"]
    if zero3_update is not None:
        rows.append([f"policy update, ZeRO-3 on {ranks} ranks (ranks x wall)", f"{zero3_update:.3f}"])
    rate = result["floors_rollouts_per_s"]
    tables = [harness.markdown_table(["piece of one iteration (one core)", "seconds"], rows),
              harness.markdown_table(["", "core-s", f"s/iteration on {cores} cores", "rollouts/s"],
                                     [[name, f"{core_s:.3f}", f"{core_s / cores:.3f}", f"{rate[name]:.1f}"]
                                      for name, core_s in result["floors_core_s"].items()])]
    if result.get("vs"):
        trl, top = result["vs"].get("trl"), max(rate.values())  # a run of tuneforge's systems alone has no TRL
        tables.append(harness.markdown_table(
            ["", "rollouts/s", "vs TRL", "share of the floor"],
            [[name, f"{r:.1f}", f"{r / trl:.2f}x" if trl else "-", f"{r / top:.2f}"]
             for name, r in {**rate, **result["vs"]}.items()]))
    return "\n\n".join(tables)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", choices=("ppo", "grpo"), default="ppo",
                   help="whose iteration: bench.ppo_vs_trl's (policy, reference, reward model, critic) or "
                        "bench.grpo_vs_trl's (policy alone)")
    p.add_argument("--rollout-batch", type=int, default=64)
    p.add_argument("--mini-batch-size", type=int, default=32)
    p.add_argument("--samples-per-prompt", type=int, default=None,
                   help="G, rows per prompt (default: 4 for grpo, as bench.grpo_vs_trl; 1 for ppo)")
    p.add_argument("--share-prompt", action=argparse.BooleanOptionalAction, default=True,
                   help="grpo: each group's prompt prefilled once and laid out once in the update's log-prob pass, "
                        "as tuneforge's rollout.share_prompt (default); --no-share-prompt: every row whole")
    p.add_argument("--response-length", type=int, default=16)
    p.add_argument("--policy-ranks", type=int, default=2, help="ranks the prompts are split over for generation")
    p.add_argument("--model-size", choices=sorted(harness.MODEL_SIZES), default="tiny")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cores", type=int, default=os.cpu_count())
    p.add_argument("--zero3", action=argparse.BooleanOptionalAction, default=True,
                   help="time the policy update under ZeRO-3 too (--no-zero3: the plain pieces only, as "
                        "bench.ppo_vs_trl --floor times them in each repeat)")
    p.add_argument("--zero3-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a DeepSpeedConfig field for the ZeRO-3 policy update, e.g. "
                        "stage3_param_persistence_threshold=100000 (repeatable)")
    p.add_argument("--vs", type=Path, default=None, help="a bench.ppo_vs_trl result to set the floor beside")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--zero3-child", dest="work", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    zero3_options(args.zero3_option)  # a bad pair stops here, before any timing
    if args.samples_per_prompt is None:
        args.samples_per_prompt = 4 if args.algo == "grpo" else 1
    if args.rollout_batch % args.samples_per_prompt:
        p.error(f"--samples-per-prompt {args.samples_per_prompt} must divide --rollout-batch {args.rollout_batch}")
    if args.algo == "ppo" and args.samples_per_prompt > 1:
        p.error("--samples-per-prompt: bench.ppo_vs_trl samples one response per prompt")
    torch.set_num_threads(1)
    allocator = keep_freed_memory()
    if args.work is not None:
        return zero3_child(args)
    if args.vs and not args.vs.is_file():  # before minutes of measuring
        p.error(f"--vs {args.vs}: no such file (a bench.ppo_vs_trl or bench.grpo_vs_trl result)")
    vs = json.loads(args.vs.read_text()) if args.vs else None
    if vs and vs.get("parameters") not in (None, parameters(args)):
        raise SystemExit(f"error: --vs {args.vs} ran a {vs['parameters']:,}-parameter policy, --model-size "
                         f"{args.model_size} is {parameters(args):,}: give the size it ran")
    code = harness.code_version()
    harness.warn_if_dirty(code)
    busy = harness.measure_busy_cores()  # before any of this bench's own work
    with tempfile.TemporaryDirectory(prefix="ppo_floor_") as tmp:
        pieces = measure(args, Path(tmp))
        zero3_update = zero3_policy_update(args, Path(tmp)) if args.policy_ranks > 1 and args.zero3 else None
    floors = {"floor": sum(pieces.values())}  # core-seconds of one iteration's work
    if zero3_update is not None:
        floors[f"floor, policy update under ZeRO-3 on {args.policy_ranks} ranks"] = (
            floors["floor"] - pieces["policy update"] + zero3_update)
    rate = {name: args.rollout_batch * args.cores / core_s for name, core_s in floors.items()}
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "vs", "work")}
    result = {"command": " ".join(["python -m bench.ppo_floor", *(argv if argv is not None else sys.argv[1:])]),
              "settings": settings | {"vs": str(args.vs) if args.vs else None},
              "machine": harness.machine_info(1), "code": code, "parameters": parameters(args),
              "allocator": allocator,
              "busy_cores_before": busy, "loaded": busy is not None and busy > harness.BUSY_CORES_LIMIT,
              "pieces_s": pieces, "zero3_policy_update_core_s": zero3_update,
              "floors_core_s": floors, "floors_rollouts_per_s": rate}
    if vs:
        result["vs"] = {name: m["rollouts_per_s"] for name, m in vs["medians"].items()}
    if args.out:  # before the tables, so that minutes of measuring are kept whatever printing them does
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(floor_tables(result))
    if args.out:
        print(f"wrote {args.out}")

if __name__ == "__main__":
    main()
