"""Pure tensor math for RL on language models: masked statistics, KL, advantage estimators (GAE with a
critic; GRPO, RLOO and REINFORCE++ without one), policy-loss variants and their aggregation.

Token log-probs and entropies are in trainer/logprobs.py (DPO shares them). No I/O, no distributed calls,
nothing that knows about Ray or DeepSpeed; every function maps tensors to tensors.

Shapes: B = rollouts in a batch, T = padded response length, V = vocabulary size. `mask` is a (B, T) float tensor,
1.0 on real response tokens (up to and including EOS or the truncation point) and 0.0 after. Per-token tensors
(log-probs, values, rewards) are aligned to response tokens: entry t belongs to response token t. Every "mean" is
a token mean over all masked entries of the batch, sum(x * mask) / max(sum(mask), 1), so an empty mask gives 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
KL_CONTROLLERS = ("fixed", "adaptive")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")
RATIO_LEVELS = ("token", "sequence")


# ---------------------------------------------------------------------------------------------------------------
# Masked statistics


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over entries where `mask` is non-zero, over all entries (dim=None) or along `dim`.

    Entries outside the mask are excluded even when they hold inf/NaN (padding is often garbage).
    """
    masked = torch.where(mask != 0, x * mask, 0.0)  # (B, T)
    if dim is None:
        return masked.sum() / mask.sum().clamp(min=1)
    return masked.sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over all masked entries (scalar). With n <= 1 masked entries it is 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)  # Bessel; n in {0, 1} leaves the (zero) variance alone
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise `x` (B, T) to unit variance (and zero mean if `shift_mean`) over the batch's masked entries.

    Returns (B, T) with masked-out entries set to 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask != 0, whitened, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# KL and rewards


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from sampled-token log-probs (B, T) -> (B, T), unmasked.

    Schulman's estimators (http://joschu.net/blog/kl-approx.html), with log_ratio = logp - ref_logp:
    k1 = log_ratio (unbiased, can be negative), k2 = 0.5 * log_ratio**2 (>= 0, low variance, biased),
    k3 = exp(-log_ratio) - 1 + log_ratio (>= 0, unbiased); k3's log_ratio is clamped to [-20, 20] so exp stays finite.
    """
    log_ratio = logp - ref_logp  # (B, T)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        log_ratio = log_ratio.clamp(-20.0, 20.0)
        return torch.expm1(-log_ratio) + log_ratio  # expm1: exp(-x) - 1 cancels badly in float32 for small x
    raise ValueError(f"unknown KL estimator {estimator!r}; allowed values: {', '.join(KL_ESTIMATORS)}")


def token_level_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token PPO rewards: -beta * kl on every real token, plus the sequence score on the last real one.

    scores (B,), kl (B, T), mask (B, T) -> (B, T), zero outside the mask. The mask is a prefix per row, so the
    last real token is mask.sum(1) - 1; a row with an empty mask receives nothing.
    """
    T = mask.shape[1]
    last = mask.sum(1).long() - 1  # (B,), -1 for empty rows
    at_last = torch.nn.functional.one_hot(last.clamp(min=0), T).to(kl.dtype)  # (B, T)
    at_last = at_last * (last >= 0).unsqueeze(1)
    rewards = -beta * kl + scores.unsqueeze(1).to(kl.dtype) * at_last  # (B, T)
    return torch.where(mask != 0, rewards, 0.0)


def normalize_scores(
    scores: torch.Tensor, mean: float | torch.Tensor, std: float | torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """(scores - mean) / (std + eps), e.g. with the reward model's running statistics. scores (B,)."""
    return (scores - mean) / (std + eps)


def clip_scores(scores: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Clamp scores (B,) to [-clip, clip]; `clip=None` returns them unchanged."""
    return scores if clip is None else scores.clamp(-clip, clip)


# ---------------------------------------------------------------------------------------------------------------
# Advantages


@torch.no_grad()
def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens. rewards, values, mask (B, T) -> (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t,  A_t = delta_t + gamma * lam * m_{t+1} * A_{t+1},
    so the episode ends at the last real token (bootstrap value 0) whatever `values` holds after it.
    returns = A + V. Both outputs are zero outside the mask and carry no gradient (they are targets).
    """
    rewards = torch.where(mask != 0, rewards, 0.0)  # padding may hold garbage, even NaN
    values = torch.where(mask != 0, values, 0.0)
    B, T = rewards.shape
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)  # V_{t+1} * m_{t+1}, (B,)
    next_mask = torch.zeros_like(next_value)  # m_{t+1}, (B,)
    next_adv = torch.zeros_like(next_value)  # A_{t+1}, (B,)
    advantages = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_mask * next_adv
        advantages.append(next_adv)
        next_value, next_mask = values[:, t], mask[:, t]
    advantages = torch.stack(advantages[::-1], dim=1) * mask  # (B, T)
    returns = (advantages + values) * mask  # (B, T)
    return advantages, returns


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(R - V) / Var(R) over masked entries: 1 is a perfect critic, 0 no better than a constant.

    When Var(R) == 0 (e.g. a single token or constant returns) the ratio is undefined; we return 0 rather than
    NaN/inf so that logged means stay finite.
    """
    var_returns = masked_var(returns, mask)
    var_residual = masked_var(returns - values, mask)
    ev = 1 - var_residual / var_returns.clamp(min=torch.finfo(var_returns.dtype).tiny)
    return torch.where(var_returns > 0, ev, torch.zeros_like(ev)).detach()


# ---------------------------------------------------------------------------------------------------------------
# Advantage estimators, registered by name (`algo.advantage`): what the driver runs is a choice of functions


@dataclass
class AdvantageInputs:
    """What every estimator may read. B = G x groups: rows [g*G, (g+1)*G) answer the same prompt."""

    rewards: torch.Tensor  # (B, T) token rewards: the sequence score on the last real token, minus beta*KL per token
    mask: torch.Tensor  # (B, T)
    group_size: int  # G, samples per prompt
    values: Optional[torch.Tensor] = None  # (B, T) critic values (gae only)
    gamma: float = 1.0
    lam: float = 0.95
    norm_by_std: bool = True  # grpo: divide by the group's std (false: Dr. GRPO)
    eps: float = 1e-6


ADVANTAGE_ESTIMATORS: dict[str, Callable[[AdvantageInputs], tuple[torch.Tensor, torch.Tensor]]] = {}
CRITIC_ESTIMATORS = ("gae",)  # the estimators that need a value model


def register_advantage(name: str):
    def add(fn):
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return add


def advantages(name: str, x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, T) and zero outside the mask, from the estimator registered as `name`."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; allowed values: {', '.join(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name](x)


@register_advantage("gae")
def gae_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's: GAE over the critic's values."""
    if x.values is None:
        raise ValueError("the gae estimator needs critic values")
    return compute_gae(x.rewards, x.values, x.mask, x.gamma, x.lam)


def _grouped_returns(x: AdvantageInputs) -> torch.Tensor:
    """(B / G, G) sequence returns: each row's token rewards summed (its score minus beta * its KL)."""
    B = x.rewards.shape[0]
    if x.group_size < 1 or B % x.group_size:
        raise ValueError(f"{B} rollouts do not form groups of {x.group_size}")
    return torch.where(x.mask != 0, x.rewards, 0.0).sum(1).view(-1, x.group_size)


def _broadcast(seq_adv: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) sequence advantages on every real token; returns equal advantages (no critic to fit)."""
    adv = seq_adv.reshape(-1, 1).to(mask.dtype) * mask  # (B, T)
    return adv, adv


@register_advantage("grpo")
@torch.no_grad()
def grpo_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO (Shao et al. 2024): each return minus its group's mean, divided by the group's std (unbiased, as
    TRL and veRL); `norm_by_std=False` keeps the centred return (Dr. GRPO, Liu et al. 2025). A group whose
    returns are all equal gets advantage 0."""
    r = _grouped_returns(x)  # (B/G, G)
    centred = r - r.mean(1, keepdim=True)
    if x.norm_by_std:
        std = r.std(1, keepdim=True) if x.group_size > 1 else torch.zeros_like(centred)
        centred = centred / (std + x.eps)
    return _broadcast(centred, x.mask)


@register_advantage("rloo")
@torch.no_grad()
def rloo_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO (Ahmadian et al. 2024): each return minus the mean of the other G - 1 returns of its group,
    r_i - (sum_g - r_i) / (G - 1) = G / (G - 1) * (r_i - mean_g). Needs G >= 2."""
    if x.group_size < 2:
        raise ValueError("rloo needs at least 2 samples per prompt (rollout.samples_per_prompt)")
    r = _grouped_returns(x)  # (B/G, G)
    baseline = (r.sum(1, keepdim=True) - r) / (x.group_size - 1)
    return _broadcast(r - baseline, x.mask)


@register_advantage("reinforce_pp")
@torch.no_grad()
def reinforce_pp_advantages(x: AdvantageInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu 2025): the discounted return-to-go of the token rewards (the KL penalty is in them, per
    token), whitened over the whole batch's real tokens; no group baseline, so G = 1 works."""
    rewards = torch.where(x.mask != 0, x.rewards, 0.0)  # (B, T)
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + x.gamma * running
        returns[:, t] = running
    returns = returns * x.mask
    return masked_whiten(returns, x.mask), returns


def group_reward_stats(scores: torch.Tensor, group_size: int) -> dict[str, float]:
    """scores (B,) in groups of G: the mean within-group std and the fraction of groups whose scores are all
    equal (no learning signal under a group baseline)."""
    g = scores.float().view(-1, group_size)  # (B/G, G)
    std = g.std(1) if group_size > 1 else torch.zeros(g.shape[0])
    return {"reward/group_std_mean": float(std.mean()),
            "reward/zero_variance_groups": float((g.max(1).values == g.min(1).values).float().mean())}


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment, (B,) -> (B,) <= 0: nothing up to max_new_tokens - buffer tokens, then
    a linear ramp to -factor at max_new_tokens (and beyond). buffer 0 disables it."""
    if buffer <= 0:
        return torch.zeros_like(lengths, dtype=torch.float32)
    over = (lengths.float() - (max_new_tokens - buffer)).clamp(min=0)
    return -factor * (over / buffer).clamp(max=1.0)


# ---------------------------------------------------------------------------------------------------------------
# Losses


def policy_loss_terms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    ratio_level: str = "token",
    is_weights: torch.Tensor | None = None,
    log_ratio_clamp: float = 20.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate per token. logp, old_logp, advantages, mask (B, T) -> (B, T) loss terms, stats.

    The ratio is clipped to [1 - clip_eps, 1 + clip_eps_high] (clip_eps_high defaults to clip_eps; a larger one
    is DAPO's "clip-higher"). `ratio_level="sequence"` is GSPO (Zheng et al. 2025): every token of a sequence
    carries the sequence's ratio exp(mean_t(logp - old_logp)), with the gradient of each token's own log-prob
    (sg[s_i] * pi_t / sg[pi_t]), so with `seq_mean_token_mean` aggregation the gradient is GSPO's.
    `is_weights` (B, T), detached, multiplies each token's term: truncated importance sampling between the
    sampler's and the trainer's log-probs. The log-ratio is clamped before exp so a stale old_logp cannot
    overflow. stats (detached 0-d, masked token means): clip_frac (tokens where the clipped term is strictly
    the larger, so its gradient is zero), approx_kl (k2 of logp vs old_logp), ratio_mean.
    """
    high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logp - old_logp  # (B, T)
    if ratio_level == "sequence":
        seq = masked_mean(log_ratio.detach(), mask, dim=1)  # (B,)
        log_ratio = seq[:, None] + logp - logp.detach()  # value: the sequence's; gradient: each token's
    elif ratio_level != "token":
        raise ValueError(f"unknown ratio level {ratio_level!r}; allowed values: {', '.join(RATIO_LEVELS)}")
    ratio = torch.exp(log_ratio.clamp(-log_ratio_clamp, log_ratio_clamp))  # (B, T)
    unclipped = -advantages * ratio  # (B, T)
    clipped = -advantages * ratio.clamp(1 - clip_eps, 1 + high)  # (B, T)
    terms = torch.maximum(unclipped, clipped)  # (B, T)
    if is_weights is not None:
        terms = terms * is_weights
    stats = {
        "clip_frac": masked_mean((clipped > unclipped).float(), mask).detach(),
        "approx_kl": masked_mean(kl_estimate(logp.detach(), old_logp, "k2"), mask),
        "ratio_mean": masked_mean(ratio.detach(), mask),
    }
    return terms, stats


def aggregate_loss(terms: torch.Tensor, mask: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) per-token terms -> (summed loss, the items it is a sum over), so a step divides the summed loss of
    a whole mini-batch (over every rank and micro-batch) by its item count:
    token_mean: every real token weighs the same (items = tokens);
    seq_mean_token_mean: each sequence's token mean, averaged over sequences (items = sequences);
    seq_mean_token_sum: each sequence's token sum, averaged over sequences (items = sequences)."""
    masked = torch.where(mask != 0, terms * mask, 0.0)  # (B, T)
    if how == "token_mean":
        return masked.sum(), mask.sum()
    if how == "seq_mean_token_sum":
        return masked.sum(), torch.tensor(float(mask.shape[0]), device=mask.device)
    if how == "seq_mean_token_mean":
        per_seq = masked.sum(1) / mask.sum(1).clamp(min=1)  # (B,)
        return per_seq.sum(), torch.tensor(float(mask.shape[0]), device=mask.device)
    raise ValueError(f"unknown loss aggregation {how!r}; allowed values: {', '.join(LOSS_AGGREGATIONS)}")


def loss_items(mask: torch.Tensor, how: str) -> float:
    """The item count `aggregate_loss` divides by, for a batch's mask (B, T): tokens or sequences."""
    return float(mask.sum()) if how == "token_mean" else float(mask.shape[0])


def truncated_is_weights(train_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (Yao et al. 2025): min(pi_train / pi_rollout, cap) per token, detached,
    for rollouts sampled by an engine whose log-probs differ from the trainer's (bf16, another kernel).
    (B, T) -> (B, T)."""
    return torch.exp((train_logp - rollout_logp).clamp(max=20.0)).clamp(max=cap).detach()


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_eps: float | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 * mean(max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)). (B, T) -> scalar.

    `clip_eps=None` disables clipping. stats: value_clip_frac = fraction of masked tokens where the clipped error
    is strictly the larger.
    """
    unclipped = (values - returns) ** 2  # (B, T)
    if clip_eps is None:
        return 0.5 * masked_mean(unclipped, mask), {"value_clip_frac": torch.zeros((), device=values.device)}
    values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)  # (B, T)
    clipped = (values_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, {"value_clip_frac": masked_mean((clipped > unclipped).float(), mask).detach()}


# ---------------------------------------------------------------------------------------------------------------
# KL coefficient controllers


class KLController:
    """Holds the KL coefficient `value`; the base never changes it. Only `value` is state (the rest is config)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController(KLController):
    """A constant KL coefficient."""


class AdaptiveKLController(KLController):
    """Ziegler et al. 2019: steer the coefficient so that the observed KL approaches `target`.

    value *= 1 + clip(current_kl / target - 1, -0.2, 0.2) * n_steps / horizon; the clip bounds each step.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL controller needs target > 0 and horizon > 0, got {target=}, {horizon=}")
        super().__init__(init_kl_coef)
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


def build_kl_controller(
    kind: str, kl_coef: float, target: float | None = None, horizon: float | None = None
) -> KLController:
    """`kind` in {"fixed", "adaptive"}; "adaptive" needs `target` and `horizon`."""
    if kind == "fixed":
        return FixedKLController(kl_coef)
    if kind == "adaptive":
        if target is None or horizon is None:
            raise ValueError("adaptive KL controller needs both target and horizon")
        return AdaptiveKLController(kl_coef, target, horizon)
    raise ValueError(f"unknown KL controller kind {kind!r}; allowed values: {', '.join(KL_CONTROLLERS)}")
