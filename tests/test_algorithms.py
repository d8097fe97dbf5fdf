import math

import pytest
import torch

from rlhf.algorithms import (
    AdaptiveKLController,
    AdvantageInputs,
    advantages,
    aggregate_loss,
    group_reward_stats,
    overlong_penalty,
    policy_loss_terms,
    truncated_is_weights,
    FixedKLController,
    build_kl_controller,
    clip_scores,
    compute_gae,
    explained_variance,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    normalize_scores,
    token_level_rewards,
    value_loss,
)
from trainer.logprobs import entropy_from_logits, logprobs_from_logits

NAN = float("nan")


def policy_loss(logp, old_logp, adv, mask, clip_eps, clip_eps_high=None):
    """The clipped surrogate as a masked token mean: the per-token terms, token_mean aggregation."""
    terms, stats = policy_loss_terms(logp, old_logp, adv, mask, clip_eps, clip_eps_high)
    total, items = aggregate_loss(terms, mask, "token_mean")
    return total / items.clamp(min=1), stats


def ragged_mask(lengths, T):
    return (torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).float()  # (B, T)


# --- masked statistics ------------------------------------------------------------------------------------------


def test_masked_mean_and_var_ignore_padding():
    x = torch.tensor([[1.0, 2.0, NAN], [3.0, 1e9, -1e9]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0]))
    assert masked_var(x, mask).item() == pytest.approx(1.0)  # values 1, 2, 3
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)


def test_whiten_zero_mean_unit_std_over_masked_entries():
    torch.manual_seed(0)
    mask = ragged_mask([7, 3, 10, 1], 10)
    x = torch.randn(4, 10) * 5 + 3
    w = masked_whiten(x, mask)
    valid = w[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert valid.std().item() == pytest.approx(1.0, abs=1e-5)
    assert (w[~mask.bool()] == 0).all()
    garbage = torch.where(mask.bool(), x, torch.full_like(x, 1e6))
    torch.testing.assert_close(masked_whiten(garbage, mask), w)
    unshifted = masked_whiten(x, mask, shift_mean=False)
    assert unshifted[mask.bool()].mean().item() == pytest.approx(x[mask.bool()].mean().item(), abs=1e-5)


def test_masked_ops_on_empty_mask_are_finite():
    x, mask = torch.randn(2, 5), torch.zeros(2, 5)
    for out in [
        masked_mean(x, mask),
        masked_mean(x, mask, dim=1),
        masked_var(x, mask),
        masked_whiten(x, mask),
        explained_variance(x, x + 1, mask),
        policy_loss(x, x, x, mask, 0.2)[0],
        value_loss(x, x, x, mask, 0.2)[0],
        *compute_gae(x, x, mask, 1.0, 0.95),
    ]:
        assert torch.isfinite(out).all()
    assert masked_mean(x, mask).item() == 0.0


# --- log-probs and entropy --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_match_log_softmax_gather(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 50) * 4).to(dtype)
    labels = torch.randint(0, 50, (3, 5))
    expected = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    out = logprobs_from_logits(logits, labels)
    assert out.shape == (3, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_logprobs_gradient_matches_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 4))
    (g,) = torch.autograd.grad(logprobs_from_logits(logits, labels).sum(), logits)
    ref = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).sum()
    (g_ref,) = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g, g_ref)


def test_entropy_matches_categorical():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50) * 4
    expected = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), expected, atol=1e-5, rtol=1e-5)


# --- KL and rewards ---------------------------------------------------------------------------------------------


def test_kl_estimators_on_known_logprobs():
    ln2 = math.log(2)
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.5]]))  # log_ratio = [ln 2, -ln 2]
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([[ln2, -ln2]]))
    assert kl_estimate(logp[:, 1:], ref[:, 1:], "k1").mean() < 0  # k1 is unbiased but not pointwise >= 0
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), torch.full((1, 2), 0.5 * ln2**2))
    # k3 = exp(-lr) - 1 + lr: 0.5 - 1 + ln2, 2 - 1 - ln2
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), torch.tensor([[ln2 - 0.5, 1 - ln2]]))


def test_kl_estimators_properties():
    torch.manual_seed(0)
    logp, ref = torch.randn(4, 8), torch.randn(4, 8)
    for k in ("k1", "k2", "k3"):
        assert (kl_estimate(logp, logp, k) == 0).all()
    assert (kl_estimate(logp, ref, "k2") >= 0).all() and (kl_estimate(logp, ref, "k3") >= 0).all()
    close = logp + 1e-3 * torch.randn(4, 8)
    torch.testing.assert_close(kl_estimate(close, logp, "k3"), kl_estimate(close, logp, "k2"), atol=1e-8, rtol=1e-2)
    assert torch.isfinite(kl_estimate(torch.full((1, 2), 0.0), torch.tensor([[-500.0, 500.0]]), "k3")).all()
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(logp, ref, "k4")


def test_token_level_rewards_score_on_last_real_token():
    mask = ragged_mask([3, 1, 0, 4], 4)
    kl = torch.where(mask.bool(), torch.ones(4, 4), torch.full((4, 4), NAN))
    rewards = token_level_rewards(torch.tensor([1.0, 2.0, 3.0, 4.0]), kl, mask, beta=0.1)
    expected = torch.tensor(
        [
            [-0.1, -0.1, 0.9, 0.0],
            [1.9, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],  # empty row: no score, no penalty
            [-0.1, -0.1, -0.1, 3.9],
        ]
    )
    torch.testing.assert_close(rewards, expected)


def test_normalize_and_clip_scores():
    s = torch.tensor([-3.0, 1.0, 5.0])
    torch.testing.assert_close(normalize_scores(s, 1.0, 2.0), torch.tensor([-2.0, 0.0, 2.0]))
    torch.testing.assert_close(clip_scores(s, 2.0), torch.tensor([-2.0, 1.0, 2.0]))
    assert clip_scores(s, None) is s


# --- GAE --------------------------------------------------------------------------------------------------------


def test_gae_hand_computed():
    # gamma = 0.9, lam = 0.5, 3 real tokens, garbage in the padding slot.
    # t=2: delta = 1 + 0 (end: bootstrap 0) - 3 = -2                 A2 = -2
    # t=1: delta = 0 + 0.9*3 - 2 = 0.7                                A1 = 0.7 + 0.45*(-2)   = -0.2
    # t=0: delta = 0 + 0.9*2 - 1 = 0.8                                A0 = 0.8 + 0.45*(-0.2) = 0.71
    # returns = A + V = [1.71, 1.8, 1.0], 0 on padding
    rewards = torch.tensor([[0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.71, -0.2, -2.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.71, 1.8, 1.0, 0.0]]))


def reference_gae(rewards, values, lengths, gamma, lam):
    adv = torch.zeros_like(rewards)
    for b, n in enumerate(lengths):
        next_adv, next_value = 0.0, 0.0
        for t in reversed(range(n)):
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t].item()
            adv[b, t] = next_adv
    return adv


def test_gae_matches_reference_on_ragged_batch_and_ignores_padding():
    torch.manual_seed(0)
    lengths, T = [7, 1, 0, 10, 4], 10
    mask = ragged_mask(lengths, T)
    rewards, values = torch.randn(5, T), torch.randn(5, T)
    adv, ret = compute_gae(rewards, values, mask, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv, reference_gae(rewards, values, lengths, 0.99, 0.95))
    torch.testing.assert_close(ret, (adv + values) * mask)
    pad = ~mask.bool()
    garbage_r = rewards.masked_fill(pad, 1e6)
    garbage_v = values.masked_fill(pad, NAN)
    adv2, ret2 = compute_gae(garbage_r, garbage_v, mask, gamma=0.99, lam=0.95)
    torch.testing.assert_close(adv2, adv)
    torch.testing.assert_close(ret2, ret)


# --- losses -----------------------------------------------------------------------------------------------------


def policy_case():
    # clip_eps = 0.2; per-token max(-A*r, -A*clip(r, 0.8, 1.2)):
    #   A=+1 r=1.5 -> max(-1.5, -1.2) = -1.2 clipped     A=+1 r=0.5 -> max(-0.5, -0.8) = -0.5
    #   A=-1 r=0.5 -> max( 0.5,  0.8) =  0.8 clipped     A=-1 r=1.5 -> max( 1.5,  1.2) =  1.5
    #   A=+2 r=1.0 -> -2 (inside the trust region)      6th token is padding
    # loss = (-1.2 - 0.5 + 0.8 + 1.5 - 2) / 5 = -0.28, clip_frac = 2/5
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.0, 7.0]])
    old_logp = torch.full((1, 6), -2.0)
    logp = (old_logp + ratio.log()).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    return logp, old_logp, adv, mask


def test_policy_loss_hand_computed():
    logp, old_logp, adv, mask = policy_case()
    loss, stats = policy_loss(logp, old_logp, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.28)
    assert stats["clip_frac"].item() == pytest.approx(0.4)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(2) ** 2) / 5)
    # d/dlogp of -A*r/5 is -A*r/5 where unclipped; 0 where the clipped term is active or padded.
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.1, 0.0, 0.3, -0.4, 0.0]]))


def test_policy_loss_clip_higher():
    logp, old_logp, adv, mask = policy_case()
    # upper bound 1.6: the A=+1 r=1.5 token is no longer clipped -> -1.5; A=-1 r=1.5 is a tie, not clipped.
    loss, stats = policy_loss(logp, old_logp, adv, mask, clip_eps=0.2, clip_eps_high=0.6)
    assert loss.item() == pytest.approx((-1.5 - 0.5 + 0.8 + 1.5 - 2) / 5)
    assert stats["clip_frac"].item() == pytest.approx(0.2)


def test_value_loss_clipped_and_unclipped():
    # eps = 0.5: t0 (1-0)^2=1 vs (0.5-0)^2=0.25 -> 1; t1 1 vs 1 -> 1 (tie, not clipped);
    # t2 (1-2)^2=1 vs (0.5-2)^2=2.25 -> 2.25 clipped. loss = 0.5 * 4.25 / 3
    values = torch.tensor([[1.0, 1.0, 1.0, 5.0]])
    old = torch.tensor([[0.0, 0.8, 0.0, 0.0]])
    returns = torch.tensor([[0.0, 2.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, mask, clip_eps=0.5)
    assert loss.item() == pytest.approx(0.5 * 4.25 / 3)
    assert stats["value_clip_frac"].item() == pytest.approx(1 / 3)
    loss, stats = value_loss(values, old, returns, mask, clip_eps=None)
    assert loss.item() == pytest.approx(0.5)
    assert stats["value_clip_frac"].item() == 0.0


def test_explained_variance():
    torch.manual_seed(0)
    mask = ragged_mask([5, 3], 6)
    returns = torch.randn(2, 6)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    constant = torch.full_like(returns, masked_mean(returns, mask).item())
    assert explained_variance(constant, returns, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert explained_variance(returns, torch.ones(2, 6), mask).item() == 0.0  # Var(R) == 0 -> 0 by convention


# --- KL controllers ---------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_moves_toward_target_with_bounded_step():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=256)  # error 1.0 clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    same = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    same.update(1e6, n_steps=256)
    assert same.value == ctl.value
    down = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    down.update(0.0, n_steps=256)
    assert down.value == pytest.approx(0.1 * (1 - 0.2 * 256 / 10000))
    at_target = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    at_target.update(6.0, n_steps=256)
    assert at_target.value == pytest.approx(0.1)

    restored = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    ctl.update(3.0, 64)
    restored.update(3.0, 64)
    assert restored.value == ctl.value


def test_fixed_kl_controller_and_factory():
    ctl = build_kl_controller("fixed", 0.05)
    assert isinstance(ctl, FixedKLController)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.05
    assert isinstance(build_kl_controller("adaptive", 0.05, target=6.0, horizon=1e4), AdaptiveKLController)
    with pytest.raises(ValueError, match="fixed, adaptive"):
        build_kl_controller("pid", 0.05)


# ------------------------------------------------------------------------------------- critic-free estimators


def seq_inputs(scores, G, **kw) -> AdvantageInputs:
    """Sequence scores as token rewards on the last of 2 real tokens (3 columns)."""
    mask = torch.tensor([[1.0, 1.0, 0.0]] * len(scores))
    rewards = torch.zeros(len(scores), 3)
    rewards[:, 1] = torch.tensor(scores)
    return AdvantageInputs(rewards, mask, G, **kw)


def test_grpo_normalises_within_each_group_and_dr_grpo_only_centres():
    x = seq_inputs([1.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0], G=4)
    adv, ret = advantages("grpo", x)
    # group 1: mean 0.75, unbiased std 0.5; group 2: all equal -> 0
    expected = torch.tensor([0.5, -1.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(adv[:, 0], expected, atol=1e-4) and torch.allclose(adv[:, 1], expected, atol=1e-4)
    assert torch.equal(adv[:, 2], torch.zeros(8)) and torch.equal(ret, adv)  # nothing past the mask
    dr, _ = advantages("grpo", seq_inputs([1.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0], G=4, norm_by_std=False))
    assert torch.allclose(dr[:, 0], torch.tensor([0.25, -0.75, 0.25, 0.25, 0, 0, 0, 0]))


def test_rloo_subtracts_the_mean_of_the_other_samples():
    adv, _ = advantages("rloo", seq_inputs([1.0, 0.0, 1.0, 1.0], G=4))
    # baseline of a 1: (3 - 1) / 3; of the 0: 3 / 3
    assert torch.allclose(adv[:, 0], torch.tensor([1 / 3, -1.0, 1 / 3, 1 / 3]))
    with pytest.raises(ValueError, match="at least 2 samples"):
        advantages("rloo", seq_inputs([1.0], G=1))


def test_sequence_estimators_see_the_kl_in_the_token_rewards():
    # kl_in=reward: each token carries -beta * KL, so the sequence return is the score minus the summed KL
    mask = torch.ones(2, 2)
    rewards = torch.tensor([[-0.5, 1.0], [0.0, 1.0]])
    adv, _ = advantages("grpo", AdvantageInputs(rewards, mask, 2, norm_by_std=False))
    assert torch.allclose(adv[:, 0], torch.tensor([-0.25, 0.25]))


def test_reinforce_pp_whitens_the_returns_to_go_over_the_batch():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    rewards = torch.tensor([[-0.1, 1.0], [0.5, 7.0]])  # 7.0 is past the mask: ignored
    adv, ret = advantages("reinforce_pp", AdvantageInputs(rewards, mask, 1))
    assert torch.allclose(ret, torch.tensor([[0.9, 1.0], [0.5, 0.0]]))
    # masked mean 0.8, unbiased var (0.01 + 0.04 + 0.09) / 2 = 0.07
    expected = (torch.tensor([[0.9, 1.0], [0.5, 0.8]]) - 0.8) / math.sqrt(0.07) * mask
    assert torch.allclose(adv, expected, atol=1e-4)


def test_an_unknown_estimator_names_the_choices():
    with pytest.raises(ValueError, match="gae, grpo, rloo, reinforce_pp"):
        advantages("vtrace", seq_inputs([1.0], G=1))


def test_group_reward_stats_count_groups_without_signal():
    stats = group_reward_stats(torch.tensor([1.0, 1.0, 0.0, 1.0, 3.0, 3.0]), 2)
    assert stats["reward/zero_variance_groups"] == pytest.approx(2 / 3)
    assert stats["reward/group_std_mean"] == pytest.approx(math.sqrt(0.5) / 3)


def test_overlong_penalty_ramps_over_the_buffer():
    lengths = torch.tensor([10, 12, 14, 16, 20])
    assert torch.allclose(overlong_penalty(lengths, 16, 4, 2.0), torch.tensor([0.0, 0.0, -1.0, -2.0, -2.0]))
    assert torch.equal(overlong_penalty(lengths, 16, 0, 2.0), torch.zeros(5))


def test_loss_aggregations_hand_computed():
    terms = torch.tensor([[1.0, 3.0, 9.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    total, items = aggregate_loss(terms, mask, "token_mean")
    assert (total.item(), items.item()) == (6.0, 3.0)
    total, items = aggregate_loss(terms, mask, "seq_mean_token_sum")
    assert (total.item(), items.item()) == (6.0, 2.0)
    total, items = aggregate_loss(terms, mask, "seq_mean_token_mean")
    assert (total.item(), items.item()) == (4.0, 2.0)  # (1 + 3) / 2 + 2 / 1


def test_gspo_sequence_ratio_carries_the_sequence_value_and_each_tokens_gradient():
    logp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -1.9, -2.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.full((1, 3), 0.5)
    terms, stats = policy_loss_terms(logp, old, adv, mask, clip_eps=10.0, ratio_level="sequence")
    s = math.exp(((-1.0 + 1.2) + (-2.0 + 1.9)) / 2)  # exp of the mean log-ratio over real tokens
    assert stats["ratio_mean"].item() == pytest.approx(s)
    total, items = aggregate_loss(terms, mask, "seq_mean_token_mean")
    (total / items).backward()
    # d/dlogp_t of -A * s_i with s_i = exp(mean_t log ratio): -A * s / |y| per real token (GSPO's gradient)
    assert torch.allclose(logp.grad, torch.tensor([[-0.5 * s / 2, -0.5 * s / 2, 0.0]]), atol=1e-6)


def test_clip_higher_and_truncated_importance_weights():
    logp, old, mask = torch.log(torch.tensor([[1.5]])), torch.zeros(1, 1), torch.ones(1, 1)
    adv = torch.ones(1, 1)
    low, _ = policy_loss_terms(logp, old, adv, mask, clip_eps=0.2)
    high, _ = policy_loss_terms(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    assert low.item() == pytest.approx(-1.2) and high.item() == pytest.approx(-1.28)
    w = truncated_is_weights(torch.log(torch.tensor([[0.9, 0.1]])), torch.log(torch.tensor([[0.3, 0.2]])), cap=2.0)
    assert torch.allclose(w, torch.tensor([[2.0, 0.5]]))
    weighted, _ = policy_loss_terms(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), 0.2,
                                    is_weights=w)
    assert torch.allclose(weighted, -w)
