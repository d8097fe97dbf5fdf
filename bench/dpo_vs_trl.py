"""tuneforge's DPO stage vs TRL's DPOTrainer on the same computation, on CPU: pairs/s, paired per repeat.

    python -m bench.dpo_vs_trl [--steps 50] [--repeats 3] [--micro-batch-size 64] [--max-length 128] [--pairs 4096]
                               [--model-size tiny|small] [--threads N] [--out bench/results/dpo_vs_trl.json]

Both sides train the same random-init causal Llama (`trainer.model.build_causal_lm` on `model=tiny`, seeded as
tuneforge's DPO stage seeds it, so both start from identical weights) with the shipped tokenizer on the same
preference file (the first `--pairs` of the synthetic suite's `preference` train split: prompt/chosen/rejected
strings), each side of a
pair tokenized as bos + prompt + response + eos, the log-probs summed over the response and eos. Each step is one
micro-batch of pairs, DPO's sigmoid loss with tuneforge's `dpo.beta` (1.0, TRL's `beta`), no label smoothing, the
reference log-probs of every pair computed once before training (tuneforge `dpo.reference=cached`, TRL
`precompute_ref_log_probs=True`: no reference model during the steps on either side), the same AdamW
hyper-parameters, cosine-to-min_lr schedule and clipping, fp32, one process, no gradient checkpointing, no eval,
no saving. tuneforge runs as its real CLI (`python -m trainer.dpo model=tiny`); TRL runs in `bench/trl_dpo.py` as a
plain process with its defaults except what equality needs. Throughput is pairs/s (and real tokens/s), from
wall-clock step ends after the first `--skip-steps` steps, next to the mean loss of the last `--loss-window` steps.
Both reference passes happen before the first step, so they count in `wall s` only.

Both sides must train on the same pairs: the bench stops if TRL's training set differs from the one tuneforge
builds here (pair count, token count, response-token count, a digest of the token ids), if TRL would truncate any
sequence (tuneforge drops overlong pairs; none are at the default --max-length), or if any step of either side
holds other than `--micro-batch-size` pairs. The sample order differs (each side shuffles with its own sampler),
so the pairs of a given step, and so its tokens, differ between the two.

Systems (`--systems`), run in this order `--repeats` times, each run its own process:
- tuneforge-auto: the DPO stage's defaults (`deepspeed=auto`: unpartitioned on this one process), pairs packed into
  rows of `--max-length` tokens with each pair's shared prompt computed once (`data.packing=true
  preference_loss.share_prompt=true`; log-probs equal to each sequence scored alone, tested in tests/test_dpo.py);
- trl: TRL's DPOTrainer, one right-padded batch of chosen then rejected rows (padded to the longest row: TRL's
  `pad_to_multiple_of` default on CPU);
- tuneforge-auto-padded (only when `--systems` names it): tuneforge with TRL's batch layout (`data.packing=false
  preference_loss.share_prompt=false`; rows padded to a multiple of 8, its collator's fixed rounding).

Besides medians, the result file holds the harness's `paired` ratios (tuneforge/TRL per repeat, their median,
min and max), the model's parameter count and, per run, how busy the machine was before it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

if not __package__:  # run as `python bench/dpo_vs_trl.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness  # noqa: E402  (after the sys.path fix above)
from bench.reward_vs_trl import PADDED_LAYOUT, check_same_pairs  # noqa: E402

DPO = harness.Comparison(
    name="dpo_vs_trl", stage="dpo", data="preference", data_columns=("prompt", "chosen", "rejected"),
    tuneforge_overrides=(
        "model=tiny",  # random init on both sides, never the newest SFT export (conf/model/sft_output.yaml)
        "dpo.loss=sigmoid",  # TRL's loss_type=["sigmoid"]
        "dpo.label_smoothing=0.0",  # TRL's sigmoid has none
        "dpo.reference=cached",  # TRL's precompute_ref_log_probs=True
        "data.overlong=drop",  # checked: at the default --max-length no pair is overlong, so TRL truncates nothing
        "train.eval_at_start=false",  # no eval on either side
        "train.save_every=0",  # no checkpoint inside the measured steps (the final one comes after them)
    ),
    systems=("tuneforge-auto", "trl"),
    optional_systems=("tuneforge-auto-padded",),
    trl_systems=("trl",),
    counts={"pairs": "pairs", "tokens": "tok", "padded_tokens": "padded tok"},
    sizes={"steps": 50, "micro_batch_size": 64, "max_length": 128, "warmup_steps": 0},
    size_help={**harness.SUPERVISED_SIZE_HELP,
               "micro_batch_size": "preference pairs per step (= global batch; conf/dpo.yaml's 64)",
               "max_length": "longest side of a pair in tokens; longer pairs are dropped (tuneforge) and the bench "
                             "stops if TRL would truncate one"},
)


def tuneforge_pairs(job, padded: bool) -> tuple[dict, list[dict]]:
    """A summary of tuneforge's training pairs ({"pairs", "tokens", "response_tokens", "longest", "digest"}, as
    TRL's runner writes it) and {"pairs", "tokens", "padded_tokens"} of every step, replayed from its data and
    sampler in the padded layout or the default packed, prompt-sharing one."""
    from bench.trl_reward import pairs_digest
    from trainer.model import load_tokenizer
    from trainer.preference import build_preference_data, collate_pairs

    tokenizer = load_tokenizer(job.model)
    pairs = build_preference_data(job.data, tokenizer, seed=job.seed).train
    sides = [(p["chosen_input_ids"], p["rejected_input_ids"]) for p in pairs]
    data = {"pairs": len(pairs), "tokens": sum(len(c) + len(r) for c, r in sides),
            "response_tokens": sum(sum(p["chosen_response_mask"]) + sum(p["rejected_response_mask"]) for p in pairs),
            "longest": max(max(len(c), len(r)) for c, r in sides), "digest": pairs_digest(sides)}
    layout = {} if padded else {"pack_length": job.data.max_length, "share_prompt": job.preference_loss.share_prompt}
    steps = [{"pairs": len(picked),
              "tokens": sum(len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in picked),
              "padded_tokens": collate_pairs(picked, tokenizer.pad_token_id, response_logps=True,
                                             **layout)["input_ids"].numel()}
             for picked in harness.replay_steps(pairs, job)]
    return data, steps


def add_arguments(p) -> None:
    p.add_argument("--pairs", type=int, default=4096,
                   help="train on the first N pairs of the synthetic split (0: all 20,000). Both sides compute the "
                        "reference log-probs of every pair before the first step; fewer pairs keep that pass, which "
                        "is outside the measured steps, short. The default is more than 50 steps x 64 pairs, so no "
                        "pair is seen twice")


def main(argv: Optional[list[str]] = None) -> None:
    args = harness.parse_args(DPO, __doc__, argv, add_arguments)
    with harness.prepared(args, DPO) as setup:
        if args.pairs:  # both sides read this file, so both get the same subset
            lines = setup.data_path.read_text(encoding="utf-8").splitlines(keepends=True)[: args.pairs]
            setup.data_path.write_text("".join(lines), encoding="utf-8")
            setup.rows = len(lines)
        job = setup.job
        data, step_counts = tuneforge_pairs(job, padded=False)
        padded_step_counts = tuneforge_pairs(job, padded=True)[1]
        spec = {**harness.trl_spec(job, setup.data_path, args.threads), "beta": job.dpo.beta, "loss": job.dpo.loss}
        print(f"training pairs: {data['pairs']} ({data['tokens']} tokens, {data['tokens'] / data['pairs']:.1f} "
              f"per pair, longest sequence {data['longest']})", flush=True)

        def run_system(system: str, run_dir: Path):
            if system in DPO.trl_systems:
                records, wall = harness.run_runner("trl_dpo", run_dir, spec, args.threads, args.profile)
                trained_on = json.loads((run_dir / "data.json").read_text())
                if trained_on["longest"] > job.data.max_length:
                    raise SystemExit(f"error: {run_dir}: TRL would truncate sequences of {trained_on['longest']} "
                                     f"tokens to {job.data.max_length}; tuneforge drops them")
            else:
                padded = system.endswith("-padded")
                records, wall = harness.run_tuneforge(
                    "dpo", "auto", run_dir, [*setup.overrides, *(PADDED_LAYOUT if padded else ())],
                    padded_step_counts if padded else step_counts, args.threads, args.profile)
                stats = json.loads((run_dir / "data_stats.json").read_text())
                trained_on = {"pairs": stats["kept"], "tokens": stats["tokens"]}
            check_same_pairs(system, run_dir, trained_on, data, records, job.train.micro_batch_size)
            return records, wall

        harness.compare(args, DPO, setup, run_system, argv=argv, recorded={
            "trl_spec": {k: v for k, v in spec.items() if k != "data_path"},
            "trl_reference": "precompute_ref_log_probs=True (reference log-probs of every pair computed once before "
                             "training, no reference model kept), as tuneforge's dpo.reference=cached",
            "training_pairs": data,
        })


if __name__ == "__main__":
    main()
