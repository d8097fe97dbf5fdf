"""Held-out loss, generation-based exact match and preference-pair metrics, sharded over ranks.

All are collectives: every rank calls them with the same arguments. Under
ZeRO-3 each forward gathers parameters collectively, so generation runs with
`synced_gpus` and every rank runs the same number of batches (`rank_batches`).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from trainer.engine import DistInfo, all_reduce_sum, device, torch_linear
from trainer.objectives import PairEval, Task, reward_pair_eval, split_loss
from trainer.progress import progress
from trainer.sampling import derive_seed
from trainer.synthetic import has_chatter


def rank_batches(items: list, info: DistInfo, batch_size: int) -> Iterator[tuple[list[int], list]]:
    """This rank's share of `items` as (indices, batch). Every rank yields as many batches as the largest
    share needs (ZeRO-3 forwards are collective); past the end of its share a rank gets ([], [items[0]]),
    a batch to run and ignore."""
    mine = list(range(info.rank, len(items), info.world_size))
    for b in range(rank_batch_count(len(items), info, batch_size)):
        idx = mine[b * batch_size : (b + 1) * batch_size]
        yield idx, [items[i] for i in idx] or [items[0]]


def rank_batch_count(num_items: int, info: DistInfo, batch_size: int) -> int:
    """How many batches `rank_batches` yields on every rank: those of the largest share."""
    return -(-(-(-num_items // info.world_size)) // batch_size)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """Evaluation: eval mode, and torch's own Linear (no gradients, so ZeRO-3's wrapper would only cost time)."""
    was_training = module.training
    module.eval()
    try:
        with torch_linear():
            yield
    finally:
        module.train(was_training)


@torch.no_grad()
def eval_loss(engine, task: Task, rows: list[dict], collate: Callable, batch_size: int, max_batches: int, info: DistInfo) -> dict:
    rows = rows[: batch_size * max_batches * info.world_size]
    loss_sum, items = 0.0, 0.0
    with eval_mode(engine.module):
        for idx, batch_rows in rank_batches(rows, info, batch_size):
            batch = {k: v.to(device()) for k, v in collate(batch_rows).items()}
            loss, _ = split_loss(task.loss(engine, batch))
            if idx:
                loss_sum += float(loss)
                items += task.count(batch)
    loss_sum, items = all_reduce_sum([loss_sum, items])
    return {"eval/loss": loss_sum / max(items, 1.0)}


@torch.no_grad()
def exact_match(engine, tokenizer, prompts: list, batch_size: int, max_new_tokens: int, info: DistInfo, zero3: bool,
                sample_seed: Optional[int] = None):
    """Greedy-decode each prompt (or, with `sample_seed`, sample from the model's full distribution:
    temperature 1, no top-k/top-p, seeded per rank) and compare the stripped text with its answer.

    Returns (metrics, samples): overall EM plus EM per family and per phrasing
    group where prompts carry them; samples are (prompt, answer, generated, match)."""
    model = engine.module
    stop_ids = stop_token_ids(tokenizer)
    sampling = {} if sample_seed is None else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    results = []
    with eval_mode(model), torch.random.fork_rng(devices=[device()] if device().type == "cuda" else []):
        if sample_seed is not None:
            torch.manual_seed(derive_seed(sample_seed, "rank", info.rank))
        batches = rank_batches(prompts, info, batch_size)
        desc = "eval: generating" + (" (sampled)" if sample_seed is not None else "")
        for idx, batch in progress(batches, total=rank_batch_count(len(prompts), info, batch_size), desc=desc,
                                   enabled=info.is_main, unit="batch"):
            input_ids, attention_mask = left_pad([p.prompt_ids for p in batch], tokenizer.pad_token_id)
            out = model.generate(
                input_ids=input_ids.to(device()),
                attention_mask=attention_mask.to(device()),
                max_new_tokens=max_new_tokens,
                do_sample=sample_seed is not None,
                **sampling,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                synced_gpus=zero3 and info.world_size > 1,
            )
            texts = tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
            results += zip(idx, texts)

    gathered = [None] * info.world_size
    if info.world_size > 1:
        dist.all_gather_object(gathered, results)
    else:
        gathered = [results]
    by_index = dict(pair for part in gathered for pair in part)
    return exact_match_metrics(prompts, [by_index[i] for i in range(len(prompts))])


def exact_match_metrics(prompts: list, generated: list[str]) -> tuple[dict, list[tuple]]:
    """Exact match of each generated text (stripped) with its prompt's answer: overall, per
    family, per phrasing group and per split of the synthetic suite where prompts carry them.
    Returns (metrics, samples) with samples (prompt, answer, generated, match)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    samples = []
    for p, text in zip(prompts, generated):
        text = text.strip()
        ok = text == p.answer.strip()
        groups["eval/exact_match"].append(ok)
        if p.family:
            groups[f"eval/em/{p.family}"].append(ok)
            if p.phrasing:
                groups[f"eval/em/{p.family}/{p.phrasing}_phrasing"].append(ok)
        if p.phrasing:
            groups[f"eval/em_phrasing/{p.phrasing}"].append(ok)
        if p.family_split and p.phrasing:
            # e.g. eval/em_split/trained_families_seen_phrasing: new instances of trained tasks.
            groups[f"eval/em_split/{p.family_split}_families_{p.phrasing}_phrasing"].append(ok)
        samples.append((p.prompt_text, p.answer, text, ok))
    metrics = {k: sum(v) / len(v) for k, v in sorted(groups.items())}
    return metrics, samples


def chatter_metrics(prompts: list, generated: list[str]) -> dict:
    """Share of generated answers that carry the synthetic suite's chatter (`trainer.synthetic.has_chatter`):
    eval/chatter overall and eval/chatter_split/<split> per split of the suite where prompts carry one."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for p, text in zip(prompts, generated):
        chatter = has_chatter(text)
        groups["eval/chatter"].append(chatter)
        if p.family_split and p.phrasing:
            groups[f"eval/chatter_split/{p.family_split}_families_{p.phrasing}_phrasing"].append(chatter)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def _pair_groups(row: dict) -> list[str]:
    """The accuracy groups of an eval pair: its kind, its split of the synthetic suite, and both."""
    groups = []
    if row.get("family_split") and row.get("phrasing"):
        # e.g. trained_families_seen_phrasing: new instances of the trained distribution
        groups.append(f"{row['family_split']}_families_{row['phrasing']}_phrasing")
    if row.get("kind"):
        groups += [row["kind"]] + [f"{row['kind']}/{g}" for g in groups]
    return groups


@torch.no_grad()
def pairwise_metrics(engine, rows: list[dict], collate: Callable, batch_size: int, info: DistInfo,
                     pair_eval: Callable[..., PairEval] = reward_pair_eval) -> dict:
    """Metrics on held-out preference pairs, from `pair_eval(engine, batch)`'s scores: a reward model's
    (the default: `reward_pair_eval`, Bradley-Terry loss with each pair's margin and no centering term), or
    DPO's implicit rewards (`DPOTask.pair_eval`, its own loss).

    eval/accuracy (r_chosen > r_rejected), eval/margin (mean r_chosen - r_rejected), eval/loss (mean per pair),
    eval/reward_mean and eval/reward_std over every chosen and rejected score, eval/accuracy/<group> for the
    groups of `_pair_groups` where rows carry them, and eval/<name> (mean per pair) for `pair_eval`'s sums."""
    groups = sorted({g for r in rows for g in _pair_groups(r)})
    # n, correct, margin, loss, sum r, sum r^2, then (n, correct) per group
    sums = torch.zeros(6 + 2 * len(groups), dtype=torch.float64)
    extra: dict[str, float] = {}  # every rank runs at least one batch, so every rank has the same keys
    with eval_mode(engine.module):
        for idx, batch_rows in progress(rank_batches(rows, info, batch_size), desc="eval: pairs", unit="batch",
                                        total=rank_batch_count(len(rows), info, batch_size), enabled=info.is_main):
            batch = {k: v.to(device()) for k, v in collate(batch_rows).items()}
            out = pair_eval(engine, batch)
            chosen, rejected = out.chosen.float().cpu(), out.rejected.float().cpu()
            for k, v in out.sums.items():
                extra[k] = extra.get(k, 0.0) + (float(v) if idx else 0.0)
            if not idx:
                continue  # the padding batch of a rank whose share ran out
            correct = (chosen > rejected).double()
            scores = torch.cat([chosen, rejected]).double()
            sums[:6] += torch.stack([
                torch.tensor(float(len(idx))), correct.sum(), (chosen - rejected).double().sum(),
                out.loss_sum.detach().double().cpu(), scores.sum(), (scores**2).sum(),
            ])
            for row, ok in zip(batch_rows, correct):
                for g in _pair_groups(row):
                    k = 6 + 2 * groups.index(g)
                    sums[k] += 1
                    sums[k + 1] += ok
    names = sorted(extra)
    reduced = all_reduce_sum(sums.tolist() + [extra[k] for k in names])
    sums, extra = torch.tensor(reduced[:len(sums)], dtype=torch.float64), dict(zip(names, reduced[len(sums):]))
    n = max(float(sums[0]), 1.0)
    mean = float(sums[4]) / (2 * n)
    metrics = {
        "eval/accuracy": float(sums[1]) / n,
        "eval/margin": float(sums[2]) / n,
        "eval/loss": float(sums[3]) / n,
        "eval/reward_mean": mean,
        "eval/reward_std": max(float(sums[5]) / (2 * n) - mean**2, 0.0) ** 0.5,
    }
    for i, g in enumerate(groups):
        metrics[f"eval/accuracy/{g}"] = float(sums[7 + 2 * i]) / max(float(sums[6 + 2 * i]), 1.0)
    metrics.update({f"eval/{k}": v / n for k, v in extra.items()})
    return metrics


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    return ids, mask


def stop_token_ids(tokenizer) -> list[int]:
    """EOS plus a chat template's end-of-turn marker, whichever the model emits first."""
    ids = {tokenizer.eos_token_id}
    for marker in ("<|end|>", "<|eot_id|>", "<|im_end|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)
