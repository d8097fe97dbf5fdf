"""`python -m trainer.preview [--config sft|instruct|reward|dpo] [--n 3] [overrides]`: what the model will train on.

Prints the first tokenized examples with every trained (loss) span wrapped in [[...]], or the first
preference pairs as the reward model or DPO sees them, then the data statistics. Writes nothing.
"""

from __future__ import annotations

import argparse
import itertools
from typing import Optional

from trainer.config import DataConfig
from trainer.contracts import PREFERENCE_STAGES
from trainer.data import IGNORE_INDEX, build_supervised_data, unpack_row
from trainer.preference import build_preference_data


def format_trained_spans(row: dict, tokenizer) -> str:
    """Decode one example with every trained (loss) span wrapped in [[...]]."""
    out, run, trained = [], [], None
    for token, label in zip(row["input_ids"], row["labels"]):
        if (label != IGNORE_INDEX) != trained and run:
            out.append(_decode_run(tokenizer, run, trained))
            run = []
        run.append(token)
        trained = label != IGNORE_INDEX
    if run:
        out.append(_decode_run(tokenizer, run, trained))
    return "".join(out)


def _decode_run(tokenizer, ids: list[int], trained: bool) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return f"[[{text}]]" if trained else text




def preview_pairs(cfg: DataConfig, tokenizer, seed: int, n: int, stage: str = "reward") -> None:
    """Print the first n training pairs as the stage sees them (decoded: a reward model scores each side at its
    last token; DPO sums the log-probs of the response, wrapped in [[...]]), then the stats."""
    data = build_preference_data(cfg, tokenizer, seed)
    how = "log-probs of [[...]] summed" if stage == "dpo" else "scored at the last token"
    for i, pair in enumerate(data.train[:n]):
        for side in ("chosen", "rejected"):
            ids, mask = pair[f"{side}_input_ids"], pair[f"{side}_response_mask"]
            print(f"--- pair {i} {side} ({len(ids)} tokens, margin {pair['margin']:g}; {how}) ---")
            if stage == "dpo":
                labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
                print(format_trained_spans({"input_ids": ids, "labels": labels}, tokenizer))
            else:
                print(tokenizer.decode(ids, skip_special_tokens=False))
    print("--- stats ---")
    print(data.stats.summary())


def preview(stage: str, n: int, overrides: list[str]) -> None:
    from trainer.compose import compose
    from trainer.config import validate
    from trainer.model import load_tokenizer

    job = compose(stage, overrides)
    validate(job)
    tokenizer = load_tokenizer(job.model)
    if job.stage in PREFERENCE_STAGES:
        preview_pairs(job.data, tokenizer, job.seed, n, job.stage)
        return
    data = build_supervised_data(job.data, tokenizer, job.seed)
    examples = (ex for row in data.train for ex in unpack_row(row))
    for i, ex in enumerate(itertools.islice(examples, n)):
        trained = sum(t != IGNORE_INDEX for t in ex["labels"])
        print(f"--- example {i} ({len(ex['input_ids'])} tokens, {trained} trained, [[...]] = trained) ---")
        print(format_trained_spans(ex, tokenizer))
    print("--- stats ---")
    print(data.stats.summary())


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.preview", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sft", help="config name under conf/ (sft, instruct, reward, dpo)")
    parser.add_argument("--n", type=int, default=3, help="examples to print")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. data.path=my.jsonl")
    args = parser.parse_args(argv)

    import datasets
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from trainer.cli import exit_with_user_error, user_errors

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its own load errors are re-raised as DataError
    try:
        preview(args.config, args.n, args.overrides)
    except (*user_errors(), HydraException, OmegaConfBaseException) as e:
        exit_with_user_error(e)


if __name__ == "__main__":
    main()
