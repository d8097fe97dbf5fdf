"""PPO: rollout layout and alignment, the driver's pure pieces and iteration schedule (fake groups, no
Ray), and real runs of `python -m rlhf.ppo` on a local Ray instance (loopback) with tiny random-init
roles: learning signals, preemption and resume equivalence, a reward function, a dying actor and a
killed policy rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fake_groups import scheduling_driver
from runs import PPO_SMALL, REPO, committed, left_behind, marked, processes_of, run_env, signal_when, tiny_ppo_model
from rlhf.config import PPOConfig
from rlhf.experience import (
    build_rollout,
    cut_at_stop,
    last_token_positions,
    pad_right,
    prompt_groups,
    response_positions,
    shared_prompt_layout,
    shuffled_by_group,
)
from rlhf.scoring import prompt_reuse_note, sample_prompts, score_rollout
from rlhf.worker import RoleWorker



@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> list[str]:
    return tiny_ppo_model(tmp_path_factory.mktemp("tiny_model"))


# The policy's 2 ranks under ZeRO-3, the path models past deepspeed.auto_partition_above_gb take; auto would train
# this tiny one unpartitioned, as tests/test_grpo.py's runs do.
ZERO3_POLICY = "actor.deepspeed.stage=3"


def run_ppo(run_dir: Path, model: list[str], *overrides: str, check: bool = True, timeout: int = 600,
            pythonpath: str = ""):
    cmd = [sys.executable, "-m", "rlhf.ppo", *model, *PPO_SMALL, *overrides, f"hydra.run.dir={run_dir}"]
    env = run_env()
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # as users run it: the driver keeps Ray on loopback
    if pythonpath:
        env["PYTHONPATH"] = pythonpath  # the driver hands it on to the actors
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc


def iterations_done(run_dir: Path) -> list[int]:
    """The iterations metrics.jsonl has logged so far (a line still being written is skipped)."""
    path, done = run_dir / "metrics.jsonl", []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "time/iteration_s" in record:
            done.append(record["step"])
    return done


def records(run_dir: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["step"], {}).update(rec)
    return out


# ------------------------------------------------------------------------------------------ layout and alignment


def test_build_rollout_lays_out_prompt_then_response_right_padded():
    exp = build_rollout([[1, 5, 6], [1, 7]], [[8, 2], [9, 9, 9]], pad_id=0)
    assert exp.sequences.tolist() == [[1, 5, 6, 8, 2], [1, 7, 9, 9, 9]]
    assert exp.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert exp.responses.tolist() == [[8, 2, 0], [9, 9, 9]]
    assert exp.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    # logits at position prompt_length + t - 1 score response token t
    assert response_positions(exp.prompt_lengths, 3, 5).tolist() == [[2, 3, 4], [1, 2, 3]]


def test_cut_at_stop_keeps_the_stop_token_and_drops_the_rest():
    assert cut_at_stop([4, 5, 2, 0, 0], {2}) == [4, 5, 2]
    assert cut_at_stop([4, 5, 6], {2}) == [4, 5, 6]  # truncated: no stop token


def test_trimmed_shards_cover_the_rows_in_order_with_ragged_widths():
    exp = build_rollout([[1, 2], [1, 2, 3], [1], [1, 4]], [[5], [6, 7, 8], [9, 9], [2]], pad_id=0)
    exp = exp.with_fields(values=torch.randn(4, exp.responses.shape[1]), scores=torch.randn(4))
    parts = [p.trimmed() for p in exp.shards(2)]
    assert parts[0].sequences.shape[1] == 6 and parts[1].sequences.shape[1] == 3
    for name in ("sequences", "attention_mask", "responses", "response_mask", "scores"):
        width = getattr(exp, name).shape[1] if getattr(exp, name).dim() == 2 else 0
        back = torch.cat([pad_right(getattr(p, name), width) if width else getattr(p, name) for p in parts])
        assert torch.equal(back, getattr(exp, name)), name
    values = torch.cat([pad_right(p.values * p.response_mask, exp.responses.shape[1]) for p in parts])
    assert torch.equal(values, exp.values * exp.response_mask)


def toy_policy():
    """A seeded 2-layer Llama over a 32-token vocabulary, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4)).eval()


def test_response_logprobs_are_aligned_and_padding_invariant():
    """Log-probs of a batched, right-padded rollout equal each sequence scored alone, with the output head run
    only at the positions that score a response token (`head_inputs_at` with positions)."""
    model = toy_policy()
    prompts, responses = [[1, 5, 6, 7], [1, 8, 3]], [[9, 10, 2], [11, 2]]
    exp = build_rollout(prompts, responses, pad_id=0)
    worker = SimpleNamespace(model=model)
    with torch.no_grad():
        batched = RoleWorker.response_logprobs(worker, exp, temperature=0.7)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            logits = model(torch.tensor([p + r])).logits[0] / 0.7
            expected = torch.log_softmax(logits.float(), -1)[len(p) - 1 : len(p) + len(r) - 1].gather(
                1, torch.tensor(r)[:, None]).squeeze(1)
            assert torch.allclose(batched[i, : len(r)], expected, atol=1e-5)


def test_critic_values_and_reward_scores_read_the_head_and_last_block_only_where_they_are_used():
    """A scalar-head role's values (one per response token) and scores (one per rollout's last token) equal the
    head's output at every position read there, with the same gradients, while the last block's MLP runs only at
    the positions read."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_labels=1, pad_token_id=0))
    exp = build_rollout([[1, 5, 6, 7], [1, 8, 3]], [[9, 10, 2], [11, 2]], pad_id=0)
    worker = SimpleNamespace(model=model)
    rows_seen = []
    model.model.layers[-1].mlp.down_proj.register_forward_pre_hook(
        lambda _module, args: rows_seen.append(args[0].shape[:-1].numel()))

    def every_position():  # (B, L): the head at every position, the block run whole
        hidden = model.model(input_ids=exp.sequences, attention_mask=exp.attention_mask).last_hidden_state
        return model.score(hidden).squeeze(-1)

    for read, at in (("response_values", response_positions(exp.prompt_lengths, exp.responses.shape[1],
                                                            exp.sequences.shape[1])),
                     ("sequence_scores", last_token_positions(exp.attention_mask)[:, None])):
        model.zero_grad()
        got = getattr(RoleWorker, read)(worker, exp).reshape(at.shape)
        (got * exp.response_mask[:, : at.shape[1]]).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        expected = every_position().gather(1, at)
        (expected * exp.response_mask[:, : at.shape[1]]).sum().backward()
        assert torch.allclose(got, expected, atol=1e-5), read
        for g, e in zip(grads, (p.grad for p in model.parameters())):
            assert torch.allclose(g, e, atol=1e-5), read
    assert rows_seen == [2 * 3, 2 * 7, 2, 2 * 7]  # trimmed, whole, trimmed, whole


def test_positions_asked_for_twice_read_the_same_output_and_count_once_in_the_gradient():
    """Padding entries clamped onto a real position ask for it again: each copy reads the head's output there, and
    the gradients are the whole model's (the last block runs at each position once, so a repeat is not counted
    twice), for the log-prob head and the scalar head alike."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from trainer.objectives import head_inputs_at, scores_at

    torch.manual_seed(0)
    scorer = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_labels=1, pad_token_id=0))
    ids = torch.randint(3, 32, (2, 6))
    pos = torch.tensor([[1, 3, 5, 5, 5], [0, 2, 2, 4, 5]])  # (B, K) with repeats
    for model in (toy_policy(), scorer):
        width = 32 if model is not scorer else 1
        weights = torch.randn(2, 5, width)

        def trimmed():
            if model is scorer:
                return scores_at(model, {"input_ids": ids}, pos)[..., None]
            with head_inputs_at(model, pos):
                return model(input_ids=ids, use_cache=False).logits  # (B, K, V)

        def whole():
            hidden = model.model(input_ids=ids).last_hidden_state
            out = model.score(hidden) if model is scorer else model.lm_head(hidden)
            return out.gather(1, pos[..., None].expand(-1, -1, width))

        results = []
        for forward in (trimmed, whole):
            model.zero_grad()
            out = forward()
            (out * weights).sum().backward()
            results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
        for a, b in zip(results[0][1], results[1][1]):
            assert torch.allclose(a, b, atol=1e-5)


def test_a_groups_rollouts_scored_with_their_prompt_once_equal_each_rollout_scored_alone():
    """rollout.share_prompt: rollouts of one prompt (a group, in any order in the batch) are scored in one row
    holding the prompt once; their log-probs, entropies and the gradient of a loss over them equal the plain
    layout's, including an empty response, a one-token one and a prompt of its own."""
    model = toy_policy()
    a, b = [1, 5, 6, 7], [1, 8, 3]
    prompts = [a, a, b, a, b, [1, 9]]
    responses = [[9, 10, 2], [11, 2], [4, 4, 4, 4, 2], [12], [], [5, 6]]
    exp = build_rollout(prompts, responses, pad_id=0)
    assert prompt_groups(exp).tolist() == [0, 0, 1, 0, 1, 2]
    layout = shared_prompt_layout(exp)
    assert layout.input_ids.shape == (3, 4 + 3 + 2 + 1)  # one row per prompt, each prompt once
    assert layout.input_ids[0].tolist() == a + [9, 10, 2, 11, 2, 12]
    assert layout.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5, 4]  # each response continues its prompt
    mask = exp.response_mask
    worker = SimpleNamespace(model=model)
    micros = {share: next(exp.micro_batches(len(exp), share_prompt=share)).to("cpu") for share in (False, True)}
    assert micros[False].layout is None and torch.equal(micros[True].layout.input_ids, layout.input_ids)
    assert micros[True].select([0, 1]).layout is None  # other rows: the layout does not follow a selection
    out = {}
    for share in (False, True):
        model.zero_grad()
        logp, entropy = RoleWorker.response_logprobs(worker, micros[share], 0.7, with_entropy=True,
                                                     entropy_grad=True)
        ((logp - 0.1 * entropy) * mask).sum().backward()
        out[share] = (logp * mask, entropy * mask, [p.grad.clone() for p in model.parameters()])
    assert torch.allclose(out[True][0], out[False][0], atol=1e-5)
    assert torch.allclose(out[True][1], out[False][1], atol=1e-5)
    for shared, plain in zip(out[True][2], out[False][2]):
        assert torch.allclose(shared, plain, atol=1e-5)
    with torch.no_grad():  # the entropy as a metric (no graph), from the log-prob's own log-sum-exp
        metric = RoleWorker.response_logprobs(worker, micros[True], 0.7, with_entropy=True)[1]
    assert torch.allclose(metric * mask, out[False][1], atol=1e-5)
    assert shared_prompt_layout(build_rollout([a, b], [[2], [2]], pad_id=0)) is None  # nothing shared: plain rows


def test_update_order_keeps_each_groups_rollouts_together_and_is_a_plain_shuffle_without_groups():
    groups = torch.tensor([0, 0, 1, 0, 1, 2])
    order = shuffled_by_group(groups, torch.Generator().manual_seed(3)).tolist()
    assert sorted(order) == list(range(6))
    runs = [groups[i].item() for i in order]
    assert [g for i, g in enumerate(runs) if i == 0 or runs[i - 1] != g] == list(dict.fromkeys(runs))  # contiguous
    assert [i for i in order if groups[i] == 0] == [0, 1, 3]
    assert torch.equal(shuffled_by_group(torch.arange(7), torch.Generator().manual_seed(5)),
                       torch.randperm(7, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (0.7, 8, 0.9)])
def test_log_probs_recorded_while_sampling_equal_a_forward_over_the_rollout(temperature, top_k, top_p):
    """rollout.old_logprobs=generation: what `SampledLogprobs` records during batched, left-padded,
    KV-cached, per-row seeded sampling (`sample_responses`) is what the policy's forward pass over the
    finished rollout gives, token for token (fp32), including rows that stopped early; with top-k/top-p too
    (both score the full temperature-scaled distribution)."""
    from rlhf.actor import sample_responses

    model = toy_policy()
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 9]]
    responses, recorded = sample_responses(model, prompts, [3, 1, 4], max_new_tokens=12, temperature=temperature,
                                           top_k=top_k, top_p=top_p, stop_ids=[2, 3], pad_id=0, record=True)
    assert [len(r) for r in recorded] == [len(r) for r in responses]
    assert any(len(r) < 12 for r in responses), "no row stopped early: pick other seeds"
    exp = build_rollout(prompts, responses, pad_id=0)
    with torch.no_grad():
        forward = RoleWorker.response_logprobs(SimpleNamespace(model=model), exp, temperature=temperature)
    for i, r in enumerate(responses):
        assert torch.allclose(torch.tensor(recorded[i]), forward[i, : len(r)], atol=1e-5), i


def test_old_log_probs_auto_records_them_in_fp32_and_recomputes_them_in_bf16():
    from rlhf.config import RolloutConfig, old_logprobs_from_generation

    assert old_logprobs_from_generation(RolloutConfig(), "fp32")
    assert not old_logprobs_from_generation(RolloutConfig(), "bf16")
    assert old_logprobs_from_generation(RolloutConfig(old_logprobs="generation"), "bf16")
    assert not old_logprobs_from_generation(RolloutConfig(old_logprobs="recompute"), "fp32")


# ------------------------------------------------------------------------------------------ driver pieces


def test_sample_prompts_is_a_function_of_the_iteration():
    prompts = list(range(10))
    first = [sample_prompts(prompts, it, 4, seed=1) for it in range(5)]
    again = [sample_prompts(prompts, it, 4, seed=1) for it in (3, 4)]  # a resumed run starts mid-way
    assert again == first[3:]
    epoch0 = first[0] + first[1] + first[2][:2]
    assert sorted(epoch0) == prompts  # one pass over the data sees every prompt once


def test_an_iteration_larger_than_the_prompts_repeats_some_and_says_so():
    prompts = list(range(3))
    batch = sample_prompts(prompts, 0, 5, seed=1)
    assert len(batch) == 5 and sorted(set(batch)) == prompts  # every prompt, two of them twice
    assert prompt_reuse_note(3, 5) == ("note: rollout.prompts_per_iteration=5 is more than the 3 training prompts: "
                                       "each iteration samples some of them more than once")
    assert prompt_reuse_note(3, 3) is None


def test_score_rollout_puts_the_score_on_the_last_token_minus_kl():
    exp = build_rollout([[1, 3], [1, 3]], [[4, 2], [4, 5, 2]], pad_id=0)
    t = exp.responses.shape[1]
    exp = exp.with_fields(old_logp=torch.zeros(2, t), ref_logp=torch.full((2, t), -0.5), values=torch.zeros(2, t))
    cfg = PPOConfig()
    cfg.algo.gamma, cfg.algo.lam, cfg.algo.whiten_advantages, cfg.algo.reward_clip = 1.0, 1.0, False, None
    scored, metrics = score_rollout(exp, torch.tensor([1.0, 3.0]), cfg, kl_coef=0.1,
                                    reward_stats={"mean": 1.0, "std": 2.0})
    # k1 KL = logp - ref = 0.5 per token; normalised scores (1-1)/2 = 0 and (3-1)/2 = 1
    assert torch.allclose(scored.rewards, torch.tensor([[-0.05, -0.05, 0.0], [-0.05, -0.05, 0.95]]))
    # gamma = lam = 1 and zero values: the advantage is the reward-to-go
    assert torch.allclose(scored.advantages, torch.tensor([[-0.1, -0.05, 0.0], [0.85, 0.9, 0.95]]))
    assert metrics["kl/seq_mean"] == pytest.approx((1.0 + 1.5) / 2)
    assert metrics["reward/score_raw_mean"] == pytest.approx(2.0)


def generations(log: list) -> list[int]:
    """The iterations whose generation was called, in order (known by their first sample's seed: iteration i's
    first prompt is at position 4 * i of the prompt stream)."""
    from trainer.sampling import derive_seed

    iteration = {derive_seed(PPOConfig().seed, "sample", 4 * i, 0): i for i in range(10)}
    return [iteration[e[3]] for e in log if e[:3] == ("call", "actor", "generate")]


def test_the_next_generation_starts_before_the_wait_on_the_critic_and_never_when_stopping(monkeypatch, tmp_path):
    driver, log = scheduling_driver(monkeypatch, tmp_path, iterations=3, overlap=True)
    driver.iteration(0)
    early = next(i for i, e in enumerate(log) if e[:3] == ("call", "actor", "generate") and e[3] != log[0][3])
    assert early < log.index(("wait", (("critic", "train"),)))  # sampled while the critic's update runs
    assert log.index(("wait", (("actor", "train"),))) < early  # ... from the updated policy
    log.clear()
    driver.iteration(1, stopping=lambda: True)  # a preemption: the checkpoint must not wait on a generation
    assert generations(log) == []  # iteration 1's was started by iteration 0, and none for 2
    assert driver._next_generation == {}
    log.clear()
    driver.iteration(2)  # nothing was started for it: it samples its own, and as the last, none beyond
    assert generations(log) == [2]
    assert driver._next_generation == {}

    driver, log = scheduling_driver(monkeypatch, tmp_path, iterations=3, overlap=False)
    driver.iteration(0)
    assert generations(log) == [0]
    assert driver._next_generation == {}


# ------------------------------------------------------------------------------------------ real runs on Ray


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_model):
    run = tmp_path_factory.mktemp("ppo") / "straight"
    proc = run_ppo(run, tiny_model, ZERO3_POLICY, "train.iterations=4", "train.save_every=2")
    return run, proc


@pytest.mark.distributed
def test_ppo_runs_all_four_roles_and_learns_signals(straight_run):
    run, proc = straight_run
    placement = (run / "placement.txt").read_text()
    for role in ("actor", "critic", "reference", "reward"):
        assert role in placement
    assert placement.count("actor") == 2  # the policy group has 2 ranks by default
    # The local instance is on loopback even though the CLI ran without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER.
    assert [row.split()[2] for row in placement.splitlines()[1:]] == ["127.0.0.1"] * 5
    # ZeRO-3 over the policy's 2 ranks (asked for); the critic's one rank unpartitioned (auto); the frozen roles are
    # plain replicas (stage 0).
    assert [row.split()[-1] for row in placement.splitlines()[1:]] == ["3", "3", "0", "0", "0"]
    recs = records(run)
    assert sorted(k for k in recs if k > 0) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        r = recs[step]
        for key in ("reward/score_raw_mean", "kl/seq_mean", "policy/loss", "policy/clip_frac", "policy/approx_kl",
                    "policy/entropy", "critic/loss", "value/explained_variance", "response/length_mean",
                    "time/generate_s", "time/forward_s", "time/train_s", "throughput/rollouts_per_s"):
            assert key in r and r[key] == r[key], (step, key)  # present and not NaN
    # The reference starts equal to the policy: KL is 0 before the first update and not after it.
    assert recs[1]["kl/seq_mean"] == pytest.approx(0.0, abs=1e-4)
    assert abs(recs[3]["kl/seq_mean"]) > 1e-6
    assert recs[1]["policy/grad_norm"] > 0 and recs[1]["critic/grad_norm"] > 0
    assert "eval/exact_match" in recs[0] and "eval/reward_score" in recs[4]
    before_after = json.loads((run / "before_after.json").read_text())
    assert set(before_after["eval/exact_match"]) == {"start", "ppo"}
    assert (run / "samples.jsonl").read_text().count("\n") >= 4
    assert (run / "checkpoints" / "driver" / "latest").read_text().strip() == "step_00000004"


@pytest.mark.distributed
def test_sigusr1_saves_the_iteration_and_resume_reproduces_the_straight_run(straight_run, tiny_model, tmp_path):
    """What a scheduler's preemption does: SIGUSR1 (or SIGTERM) ends the current iteration with a
    checkpoint, whatever save_every says, and exit status 75; `resume=auto` then continues exactly
    as the uninterrupted run did. The straight and the interrupted run sample each iteration's rollouts
    while the critic's previous update finishes (rollout.overlap_critic_update, the default); the resumed
    part waits for both updates, and all must agree: the overlap changes only when work runs."""
    run, _ = straight_run
    resumed = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "rlhf.ppo", *tiny_model, *PPO_SMALL, ZERO3_POLICY, "train.iterations=4",
           "train.save_every=100", f"hydra.run.dir={resumed}"]
    proc = signal_when(cmd, lambda: bool(iterations_done(resumed)), signal.SIGUSR1)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "preempted: saved iteration" in proc.stdout
    stopped_at = int((resumed / "checkpoints" / "driver" / "latest").read_text().split("_")[1])
    assert 1 <= stopped_at < 4, "saved at the end of the interrupted iteration, not at save_every"
    for role in ("actor", "critic"):
        assert (resumed / "checkpoints" / role / f"step_{stopped_at:08d}" / "COMPLETE").exists()

    proc = run_ppo(resumed, tiny_model, ZERO3_POLICY, "train.iterations=4", "train.save_every=100",
                   "rollout.overlap_critic_update=false", "resume=auto")
    assert "resumed from" in proc.stdout
    a, b = records(run), records(resumed)
    assert iterations_done(resumed) == [1, 2, 3, 4], "each iteration logged once"
    for step in range(1, 5):
        for key in ("reward/score_raw_mean", "kl/seq_mean", "policy/loss", "critic/loss", "response/length_mean"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-5), (step, key)


@pytest.mark.distributed
def test_reward_function_kl_in_loss_zero3_generation_colocated_then_a_dying_actor_ends_the_run(tiny_model, tmp_path):
    """One run for two things (each PPO start costs ~20 s): a rule-based reward, the KL in the loss, ZeRO-3
    generation, old log-probs from a forward pass and colocated devices work for an iteration; then the reward actor dies mid-run, the error
    names it and iteration 1's checkpoint stays the good one."""
    run = tmp_path / "dies"
    proc = run_ppo(run, tiny_model, "train.iterations=4", "train.save_every=1", "reward_source=exact_match",
                   "algo=ppo_kl_loss", "cluster.colocate=both", "reference.devices_per_node=2",
                   "rollout.generation=zero3", "rollout.old_logprobs=recompute",
                   "reward.functions=[{_target_: ppo_faults.die_on_call, call: 4}]",
                   check=False, pythonpath=str(REPO / "tests"))
    placement = (run / "placement.txt").read_text().splitlines()
    assert sum(line.startswith("reference") for line in placement) == 2
    recs = records(run)
    assert recs[1]["reward/score_raw_mean"] in (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    assert "policy/kl_loss" in recs[1]

    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "reward rank 0 on node" in proc.stderr
    # the start eval scores greedy then sampled answers (calls 1, 2), iteration 1 is call 3, iteration 2
    # dies: iteration 1's checkpoint stays the good one.
    assert 2 not in recs
    assert (run / "checkpoints" / "driver" / "latest").read_text().strip() == "step_00000001"
    assert (run / "checkpoints" / "actor" / "step_00000001" / "COMPLETE").exists()


@pytest.mark.distributed
def test_the_one_device_layout_all_colocated_with_an_unpartitioned_policy_and_no_checkpoints(tiny_model, tmp_path):
    """The layout of one GPU (bench.gpu_check --ppo): every role on the same device, the policy on one rank,
    where `auto` leaves it unpartitioned and its own module generates (no replica to refresh);
    train.save_every=-1 writes no checkpoint."""
    run = tmp_path / "one_device"
    # One CPU slot in Ray's accounting: the four roles fit only by sharing it.
    run_ppo(run, tiny_model, "train.iterations=2", "train.save_every=-1", "actor.devices_per_node=1",
            "cluster.colocate=all", "cluster.num_cpus=1")
    placement = [row.split() for row in (run / "placement.txt").read_text().splitlines()[1:]]
    assert [(row[0], row[-1]) for row in placement] == [("actor", "0"), ("critic", "0"), ("reference", "0"),
                                                        ("reward", "0")]
    recs = records(run)
    assert recs[1]["kl/seq_mean"] == pytest.approx(0.0, abs=1e-4) and abs(recs[2]["kl/seq_mean"]) > 1e-6
    assert recs[2]["policy/replica_refresh_s"] == 0.0
    assert recs[2]["policy/memory_gb"] > 0 and recs[2]["critic/memory_gb"] > 0
    assert not (run / "checkpoints").exists()


# ------------------------------------------------------------------------------------------ bad input


def test_no_sft_export_says_which_stage_to_run(tmp_path):
    from trainer.config import ConfigError, require_export

    with pytest.raises(ConfigError, match=r"run `python -m trainer\.sft` first"):
        require_export(str(tmp_path / "outputs" / "sft"))


@pytest.mark.distributed
def test_a_layout_the_cluster_cannot_hold_fails_before_any_model_loads(tiny_model, tmp_path):
    proc = run_ppo(tmp_path / "big", tiny_model, "actor.devices_per_node=16", "rollout.prompts_per_iteration=16",
                   "algo.mini_batch_size=16", "cluster.num_cpus=4", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "actor: needs 1 node with 16 CPU" in proc.stderr
    assert "models ready" not in proc.stdout


@pytest.mark.distributed
def test_a_reward_model_with_another_tokenizer_fails_at_start(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    model_dir = Path(tiny_model[0].split("=", 1)[1])
    other = tmp_path / "other"
    subprocess.run(["cp", "-r", str(model_dir), str(other)], check=True)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra_token>"])
    tok.save_pretrained(other)
    proc = run_ppo(tmp_path / "mismatch", tiny_model, f"reward.model.name_or_path={other}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "reward.model: its tokenizer" in proc.stderr and "reward.retokenize=true" in proc.stderr
    assert "Started a local Ray instance" not in proc.stderr


@pytest.mark.distributed
def test_a_policy_rank_killed_mid_run_ends_it_naming_the_rank(tiny_model, tmp_path):
    """SIGKILL one policy rank while its peer may sit in a collective: the driver fails fast,
    names the rank, cleans up, and the last complete checkpoint stays."""
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rlhf.ppo", *tiny_model, *PPO_SMALL, "train.iterations=200", "train.save_every=1",
           f"hydra.run.dir={run}"]
    env = {**run_env(), **marked()}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and committed(run) < 2:  # (iterations may be pruned between two looks)
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be killed"
        running = processes_of(env)
        policy = sorted(pid for pid, line in running.items() if "ray::PolicyWorker" in line)
        assert len(policy) == 2, running
        # No idle Ray workers: the local instance starts none ahead (no actor could take one: each carries a
        # runtime_env), which Ray would otherwise do, one per CPU slot.
        assert not [line for line in running.values() if "ray::IDLE" in line], running
        os.kill(policy[-1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr[-3000:]
    assert "actor rank" in stderr and "on node" in stderr
    latest = (run / "checkpoints" / "driver" / "latest").read_text().strip()
    assert int(latest.split("_")[1]) >= 2
    for role in ("actor", "critic"):
        assert (run / "checkpoints" / role / latest / "COMPLETE").exists()
    # The driver killed the actors and stopped its Ray instance (servers included).
    assert not left_behind(env, within_s=60), "processes of the run left behind"


@pytest.mark.parametrize("overrides, environ, joins", [
    ([], {}, False),
    (["cluster=local", "cluster.address=null"], {}, False),
    (["cluster=existing"], {}, True),
    (["cluster.address=10.0.0.1:6379"], {}, True),
    (["+cluster.address='auto'"], {}, True),
    ([], {"RAY_ADDRESS": "10.0.0.1:6379"}, True),
    (["hydra/launcher=ray_cluster"], {}, False),  # a sweep's own Ray instance
    (["hydra/launcher=ray_cluster", "hydra.launcher.ray.init.address=local"], {}, False),
    (["hydra/launcher=ray_cluster", "hydra.launcher.ray.init.address=auto"], {}, True),
])
def test_the_command_line_decides_whether_ray_stays_on_loopback(overrides, environ, joins, monkeypatch):
    from trainer import local_ray
    from trainer.local_ray import LOOPBACK_SWITCH, joins_a_cluster, keep_local_ray_on_loopback

    monkeypatch.setattr(local_ray, "_switched_here", False)

    assert joins_a_cluster(overrides, environ) == joins
    keep_local_ray_on_loopback(overrides, environ)
    assert (environ.get(LOOPBACK_SWITCH) == "0") == (not joins)
    user = {LOOPBACK_SWITCH: "1"}
    keep_local_ray_on_loopback(overrides, user)
    assert user == {LOOPBACK_SWITCH: "1"}, "a user's own setting stands"
