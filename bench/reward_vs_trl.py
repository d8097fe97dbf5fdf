"""tuneforge's reward stage vs TRL's RewardTrainer on the same computation, on CPU: pairs/s at matching loss.

    python -m bench.reward_vs_trl [--steps 40] [--repeats 3] [--micro-batch-size 32] [--max-length 128]
                                  [--model-size tiny|small] [--threads N] [--out bench/results/reward_vs_trl.json]

Both sides train the same random-init Llama with a scalar head (`trainer.model.build_reward_model` on
`model=tiny`, num_labels=1, same seed) with the shipped tokenizer on the same preference file (the synthetic
suite's `preference` train split: prompt/chosen/rejected strings), each side of a pair tokenized as
bos + prompt + response + eos, pairs with a side over the max length dropped. Each step is one micro-batch of pairs
as one padded batch (chosen rows, then rejected rows, right-padded to a multiple of 8), the Bradley-Terry loss
without centering or margin, the same AdamW hyper-parameters, cosine-to-min_lr schedule and clipping, fp32, one
process, no gradient checkpointing, no eval, no saving. tuneforge runs as its real CLI (`python -m trainer.reward
model=tiny`) under its default (auto), ZeRO-3 and ZeRO-0; TRL runs in `bench/trl_reward.py` as a plain process with its defaults
except what equality needs. Throughput is pairs/s (and real tokens/s), from wall-clock step ends after the first
`--skip-steps` steps, next to the mean loss of the last `--loss-window` steps.

Both sides must train on the same pairs: the bench stops if either side's training set differs from the one
tuneforge builds here (pair count, token count, a digest of the token ids) or if any step of either side holds
other than `--micro-batch-size` pairs. The sample order differs (each side shuffles with its own sampler), so the
pairs of a given step, and so its tokens, differ between the two.

Systems (`--systems`), run in this order `--repeats` times; the tables show medians and paired tuneforge/TRL ratios:
- tuneforge-auto: the reward stage's defaults (`deepspeed=auto`: unpartitioned on this one process), pairs packed into rows of `--max-length` tokens with each
  pair's shared prompt computed once (`data.packing=true preference_loss.share_prompt=true`; scores equal to the padded
  layout's, tested in tests/test_reward.py);
- trl: TRL's RewardTrainer, one padded batch of chosen then rejected rows;
- tuneforge-zero3: the same under ZeRO-3 (`deepspeed=zero3`; the default until 2026-11-26);
- tuneforge-auto-padded, tuneforge-zero3-padded: the engine on TRL's batch layout (`data.packing=false
  preference_loss.share_prompt=false`), the same tensors TRL computes on, unpartitioned and under ZeRO-3: against
  trl they measure the engine alone, and tuneforge-auto against tuneforge-auto-padded the layout's gain;
- tuneforge-zero0 (only with `--systems`): `deepspeed=zero0`, which writes the same DeepSpeed config as auto on one
  process.
`padded tok` counts the tokens each system's batches really hold, padding included.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Optional

if not __package__:  # run as `python bench/reward_vs_trl.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402  (after the sys.path fix above)

REWARD = harness.Comparison(
    name="reward_vs_trl", stage="reward", data="preference", data_columns=("prompt", "chosen", "rejected"),
    tuneforge_overrides=(
        "model=tiny",  # random init on both sides, never the newest SFT export (conf/model/sft_output.yaml)
        "preference_loss.center_coef=0.0",  # TRL's center_rewards_coefficient=None
        "data.overlong=drop",  # TRL drops pairs with a side over max_length
        "train.save_every=0",  # no checkpoint inside the measured steps (the final one comes after them)
    ),
    systems=("tuneforge-auto", "trl", "tuneforge-auto-padded", "tuneforge-zero3-padded", "tuneforge-zero3"),
    optional_systems=("tuneforge-zero0",),
    trl_systems=("trl",),
    counts={"pairs": "pairs", "tokens": "tok", "padded_tokens": "padded tok"},
    sizes={"steps": 40, "micro_batch_size": 32, "max_length": 128, "warmup_steps": 0},
    size_help={**harness.SUPERVISED_SIZE_HELP, "micro_batch_size": "preference pairs per step (= global batch)",
               "max_length": "longest side of a pair in tokens; longer pairs are dropped"},
    scalar_head=True,
)


# Overrides that give tuneforge TRL's batch layout (one padded row per sequence).
PADDED_LAYOUT = ("data.packing=false", "preference_loss.share_prompt=false")


def tuneforge_pairs(job, padded: bool) -> tuple[dict, list[dict]]:
    """What tuneforge trains on: a summary of its training pairs ({"pairs", "tokens", "digest"}, as TRL's
    runner writes it) and {"pairs", "tokens", "padded_tokens"} of every step, replayed from its data and sampler
    in the padded layout or the default packed, prompt-sharing one."""
    from bench.trl_reward import pairs_digest
    from trainer.model import load_tokenizer
    from trainer.preference import build_preference_data, collate_pairs

    tokenizer = load_tokenizer(job.model)
    pairs = build_preference_data(job.data, tokenizer, seed=job.seed).train
    sides = [(p["chosen_input_ids"], p["rejected_input_ids"]) for p in pairs]
    data = {"pairs": len(pairs), "tokens": sum(len(c) + len(r) for c, r in sides), "digest": pairs_digest(sides)}
    layout = {} if padded else {"pack_length": job.data.max_length, "share_prompt": job.preference_loss.share_prompt}
    steps = [{"pairs": len(picked),
              "tokens": sum(len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in picked),
              "padded_tokens": collate_pairs(picked, tokenizer.pad_token_id, **layout)["input_ids"].numel()}
             for picked in harness.replay_steps(pairs, job)]
    return data, steps


def check_same_pairs(system: str, run_dir: Path, trained_on: dict, expected: dict, records: list[dict],
                     micro_batch_size: int) -> None:
    """Stop unless `system` trained on tuneforge's pairs (the keys of `trained_on` that it reports),
    micro_batch_size of them in every step."""
    for key, value in trained_on.items():
        if value != expected[key]:
            raise SystemExit(f"error: {run_dir}: {system} trains on other pairs than tuneforge builds: {key} "
                             f"{value} != {expected[key]}; the comparison would not be of the same computation")
    wrong = [(r["step"], r["pairs"]) for r in records if r["pairs"] != micro_batch_size]
    if wrong:
        raise SystemExit(f"error: {run_dir}: {system}: (step, pairs) {wrong[:5]} differ from the micro-batch "
                         f"size {micro_batch_size}")


def main(argv: Optional[list[str]] = None) -> None:
    args = harness.parse_args(REWARD, __doc__, argv)
    with harness.prepared(args, REWARD) as setup:
        from trainer.preference import collate_pairs

        job = setup.job
        data, step_counts = tuneforge_pairs(job, padded=False)
        padded_step_counts = tuneforge_pairs(job, padded=True)[1]
        spec = {
            **harness.trl_spec(job, setup.data_path, args.threads),
            "pad_to_multiple_of": inspect.signature(collate_pairs).parameters["pad_to_multiple_of"].default,
            "center_coef": job.preference_loss.center_coef,
        }
        print(f"training pairs: {data['pairs']} ({data['tokens']} tokens, {data['tokens'] / data['pairs']:.1f} "
              f"per pair)", flush=True)

        def run_system(system: str, run_dir: Path):
            if system in REWARD.trl_systems:
                records, wall = harness.run_runner("trl_reward", run_dir, spec, args.threads, args.profile)
                trained_on = json.loads((run_dir / "data.json").read_text())
            else:
                zero, _, layout = system.removeprefix("tuneforge-").partition("-")
                padded = layout == "padded"
                records, wall = harness.run_tuneforge(
                    "reward", zero, run_dir, [*setup.overrides, *(PADDED_LAYOUT if padded else ())],
                    padded_step_counts if padded else step_counts, args.threads, args.profile)
                stats = json.loads((run_dir / "data_stats.json").read_text())
                trained_on = {"pairs": stats["kept"], "tokens": stats["tokens"]}
            check_same_pairs(system, run_dir, trained_on, data, records, job.train.micro_batch_size)
            return records, wall

        harness.compare(args, REWARD, setup, run_system, argv=argv, recorded={
            "trl_spec": {k: v for k, v in spec.items() if k != "data_path"},
            "training_pairs": data,
        })


if __name__ == "__main__":
    main()
