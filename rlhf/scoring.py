"""The driver's pure pieces: which prompts an iteration samples, how work splits over ranks, a rollout's
scores turned into token rewards, advantages and returns (`score_rollout`), and the start-vs-end table.
No Ray, no I/O: the driver (`rlhf/driver.py`) calls these between its groups' calls."""

from __future__ import annotations

from typing import Optional

import torch

from rlhf.algorithms import (
    AdvantageInputs,
    advantages,
    clip_scores,
    explained_variance,
    group_reward_stats,
    kl_estimate,
    masked_mean,
    masked_whiten,
    normalize_scores,
    overlong_penalty,
    token_level_rewards,
)
from rlhf.config import PPOConfig
from rlhf.experience import Experience
from trainer.sampling import SeededOrder

# The evaluation metrics the start-vs-end table compares, in its order.
BEFORE_AFTER_KEYS = ("eval/exact_match", "eval/em_split/trained_families_seen_phrasing",
                     "eval/em_split/trained_families_heldout_phrasing", "eval/reward_score",
                     "eval/reward_score/trained_families_seen_phrasing", "eval/reward_score_sampled",
                     "eval/exact_match_sampled", "eval/response_length")


def sample_prompts(prompts: list, iteration: int, n: int, seed: int) -> list:
    """The n prompts of an iteration: positions iteration*n .. of the endless seeded order over the prompts
    (one permutation per pass), so the sampler's position is a function of the iteration alone (resume
    needs nothing else)."""
    return [prompts[i] for i in SeededOrder(len(prompts), seed, "prompts").take(iteration * n, n)]


def prompt_reuse_note(prompts: int, per_iteration: int) -> Optional[str]:
    """The line that says an iteration asks for more prompts than the data holds, so that `sample_prompts` repeats
    some within it; None where every prompt of an iteration is distinct."""
    if per_iteration <= prompts:
        return None
    return (f"note: rollout.prompts_per_iteration={per_iteration} is more than the {prompts} training prompts: each "
            f"iteration samples some of them more than once")


def split_evenly(items: list, n: int) -> list[list]:
    size = len(items) // n
    return [items[r * size:(r + 1) * size] for r in range(n)]


def pad_to_multiple(items: list, n: int) -> list:
    """Repeat the last item so the list splits evenly over n ranks (extra results are dropped)."""
    return items + [items[-1]] * (-len(items) % n)


def score_rollout(exp: Experience, raw_scores: torch.Tensor, cfg: PPOConfig, kl_coef: float,
                  reward_stats: Optional[dict]) -> tuple[Experience, dict]:
    """Scores -> (normalised, clipped, overlong-penalised) -> token rewards (with the KL penalty when
    algo.kl_in=reward and there is a reference) -> advantages and returns from the estimator algo.advantage
    names. Rows come in groups of rollout.samples_per_prompt answering one prompt."""
    a, G = cfg.algo, cfg.rollout.samples_per_prompt
    mask = exp.response_mask
    lengths = mask.sum(1)  # (B,)
    scores = raw_scores.float()
    if reward_stats is not None:
        scores = normalize_scores(scores, reward_stats["mean"], reward_stats["std"])
    scores = clip_scores(scores, a.reward_clip)
    penalty = overlong_penalty(lengths, cfg.rollout.max_new_tokens, a.overlong_buffer, a.overlong_penalty)
    scores = scores + penalty
    if exp.ref_logp is None:  # no KL term: no reference was started
        kl = torch.zeros_like(mask)
    else:
        kl = kl_estimate(exp.old_logp, exp.ref_logp, a.kl_estimator) * mask  # (B, T)
    beta = kl_coef if a.kl_in == "reward" else 0.0
    rewards = token_level_rewards(scores, kl, mask, beta)
    adv, returns = advantages(a.advantage, AdvantageInputs(rewards, mask, G, exp.values, a.gamma, a.lam,
                                                           a.norm_by_std))
    if a.whiten_advantages:
        adv = masked_whiten(adv, mask)
    seq_kl = kl.sum(1)  # (B,) the per-sequence KL the controller and the table report
    metrics = {
        "reward/score_raw_mean": float(raw_scores.float().mean()),
        "reward/score_raw_std": float(raw_scores.float().std()) if len(raw_scores) > 1 else 0.0,
        "reward/score_mean": float(scores.mean()),
        "reward/total_mean": float((rewards * mask).sum(1).mean()),
        "kl/seq_mean": float(seq_kl.mean()),
        "kl/token_mean": float(masked_mean(kl, mask)),
        "kl/coef": kl_coef,
        "advantage/mean_raw": float(masked_mean(adv, mask)),
        "return/mean": float(masked_mean(returns, mask)),
        "response/length_mean": float(lengths.float().mean()),
    }
    if exp.values is not None:
        metrics["value/mean"] = float(masked_mean(exp.values, mask))
        metrics["value/explained_variance"] = float(explained_variance(exp.values, returns, mask))
    if G > 1:
        metrics.update(group_reward_stats(raw_scores, G))
    if a.overlong_buffer:
        metrics["reward/overlong_penalty_mean"] = float(penalty.mean())
    return exp.with_fields(scores=scores, rewards=rewards, advantages=adv, returns=returns), metrics


def before_after(before: dict, after: dict, algo: str = "ppo") -> tuple[str, dict]:
    """The evaluation at the start (the SFT policy) next to the one at the end: a printable table, and
    {metric: {"start": x, <algo>: y}} for before_after.json. Metrics missing from either side are left out."""
    passes = sorted((k for k in after if k.startswith("eval/pass@")), key=lambda k: int(k.split("@")[1]))
    keys = [k for k in (*BEFORE_AFTER_KEYS, *passes) if k in before and k in after]
    lines = [f"{'metric':<48} {'start (SFT)':>12} {algo.upper():>12}"]
    lines += [f"{k:<48} {before[k]:>12.4f} {after[k]:>12.4f}" for k in keys]
    return "\n".join(lines), {k: {"start": before[k], algo: after[k]} for k in keys}
