"""tuneforge SFT vs TRL's SFTTrainer on the same computation, on CPU: trained tokens/s at matching loss.

    python -m bench.sft_vs_trl [--steps 30] [--repeats 3] [--micro-batch-size 16] [--max-length 128]
                               [--model-size tiny|medium] [--threads N] [--floor]
                               [--out bench/results/sft_vs_trl.json]

Both sides train the same random-init Llama (tuneforge's `model.tiny`, same seed) with the shipped tokenizer on
the same prompt/completion file (the synthetic suite's train split), packed to the same max length, with the same
micro-batch, AdamW hyper-parameters, cosine-to-min_lr schedule, clipping, fp32, one process, completion-only loss.
tuneforge runs as its real CLI (`python -m trainer.sft`) under ZeRO-3 and ZeRO-0; TRL runs in `bench/trl_sft.py`
with its defaults except what equality needs. The two systems pack differently, so throughput is compared in
tokens: trained tokens (tokens with a loss) per second and all real (non-pad) tokens per second, measured from
wall-clock step ends after the first `--skip-steps` steps, plus the mean loss of the last `--loss-window` steps.

Systems (`--systems`): tuneforge-auto (the default `deepspeed=auto`: unpartitioned on one process),
tuneforge-zero3 (the default until 2026-11-26), tuneforge-zero0 (the same DeepSpeed config as auto here),
tuneforge-auto-masked (only with `--systems`: auto with `model.per_sequence_attention=false`, packed rows
attending under transformers' block-diagonal mask instead of one sequence at a time), trl-packed (TRL with
packing=True) and trl-unpacked (TRL without packing, padded batches of as many examples as a
tuneforge step holds on average, grouped by length as a careful CPU user sets it: the same work per step without
TRL's padding-free packed attention, which costs O((batch x length)^2) on CPU). Runs alternate, tuneforge and TRL
in turn (`SFT.systems`), `--repeats` times; the tables show medians and the paired tuneforge/TRL ratios (per
repeat; median, min-max).

With --floor, `bench.sft_floor` trains the tuneforge run's steps again after each repeat's runs, as a plain
PyTorch loop doing the same arithmetic and nothing else, and every system's trained tokens/s is reported as a share
of that floor, and the floor as a multiple of each TRL system, paired per repeat: how far any loop around these
kernels could go.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Optional

if not __package__:  # run as `python bench/sft_vs_trl.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402  (after the sys.path fix above)

SFT = harness.Comparison(
    name="sft_vs_trl", stage="sft", data="sft", data_columns=("prompt", "completion"), tuneforge_overrides=(),
    systems=("tuneforge-auto", "trl-packed", "tuneforge-zero3", "trl-unpacked", "tuneforge-zero0"),
    optional_systems=("tuneforge-auto-masked",), reference_systems=("tuneforge-auto-masked",),
    trl_systems=("trl-packed", "trl-unpacked"),
    counts={"trained_tokens": "trained tok", "tokens": "tok"},
    sizes={"steps": 30, "micro_batch_size": 16, "max_length": 128, "warmup_steps": 0},
    size_help={**harness.SUPERVISED_SIZE_HELP, "micro_batch_size": "packed sequences per step (= global batch)",
               "max_length": "packed sequence length"},
)


# tuneforge-auto-masked: packed rows attend under transformers' sdpa with its block-diagonal mask, as before
# trainer/packed_attention.py, instead of one sequence at a time.
MASKED = ("model.per_sequence_attention=false",)


def tuneforge_step_counts(job) -> list[dict]:
    """{"tokens" (real), "trained_tokens", "examples"} of every step of a tuneforge run, replayed from its data.

    tuneforge's metrics.jsonl logs real tokens but not trained ones; the replay gives both exactly."""
    from trainer.data import build_supervised_data
    from trainer.model import load_tokenizer
    from trainer.objectives import IGNORE_INDEX

    rows = build_supervised_data(job.data, load_tokenizer(job.model), seed=job.seed).train
    return [{"tokens": sum(len(r["input_ids"]) for r in picked),
             "trained_tokens": sum(label != IGNORE_INDEX for r in picked for label in r["labels"][1:]),
             "examples": sum(r["position_ids"].count(0) for r in picked)}  # positions restart at every packed example
            for picked in harness.replay_steps(rows, job)]


def add_arguments(p) -> None:
    p.add_argument("--trl-unpacked-batch", type=int, default=None,
                   help="trl-unpacked examples per step (default: the mean of a tuneforge step's packed examples)")
    p.add_argument("--floor", action="store_true",
                   help="after each repeat's runs, train the same steps as a plain PyTorch loop (bench.sft_floor) "
                        "and report every system's share of it per repeat")


def floor_rate(args, setup, run_dir: Path) -> float:
    """The floor's trained tokens/s: `bench.sft_floor` over the tuneforge run's steps, now, in a process of its own
    with the runs' threads; its metrics stay in `run_dir`."""
    records, _ = harness.run_runner("sft_floor", run_dir, {"overrides": setup.overrides}, args.threads, False)
    measured = harness.steady_state(records, args.skip_steps, args.loss_window, SFT.counts)
    print(f"floor final loss {measured['final_loss']:.4f}", flush=True)
    return measured["trained_tokens_per_s"]


def main(argv: Optional[list[str]] = None) -> None:
    args = harness.parse_args(SFT, __doc__, argv, add_arguments)
    with harness.prepared(args, SFT) as setup:
        step_counts = tuneforge_step_counts(setup.job)
        packed = {**harness.trl_spec(setup.job, setup.data_path, args.threads), "packing": setup.job.data.packing}
        unpacked_batch = args.trl_unpacked_batch or round(statistics.mean(s["examples"] for s in step_counts))
        specs = {"trl-packed": packed,
                 "trl-unpacked": {**packed, "packing": False, "micro_batch_size": unpacked_batch, "group_by_length": True}}

        def run_system(system: str, run_dir: Path):
            if system in SFT.trl_systems:
                return harness.run_runner("trl_sft", run_dir, specs[system], args.threads, args.profile)
            zero = system.removeprefix("tuneforge-").removesuffix("-masked")
            overrides = [*setup.overrides, *(MASKED if system.endswith("-masked") else ())]
            return harness.run_tuneforge("sft", zero, run_dir, overrides, step_counts, args.threads, args.profile)

        harness.compare(args, SFT, setup, run_system, argv=argv,
                        floor=(lambda run_dir: floor_rate(args, setup, run_dir)) if args.floor else None, recorded={
            "trl_specs": {name: {k: v for k, v in spec.items() if k != "data_path"} for name, spec in specs.items()},
        })


if __name__ == "__main__":
    main()
