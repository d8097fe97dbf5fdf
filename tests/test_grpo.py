"""Critic-free RL on the Ray layout (GRPO, RLOO, REINFORCE++, with DAPO's and GSPO's options): per-sample seeds,
reward functions that see the data, dynamic sampling (fake groups, no Ray), and real runs of
`python -m rlhf.ppo algo=grpo|rloo` on a local Ray instance (loopback) with tiny random-init roles: the roles
that run, the metrics, resume. The estimators and losses themselves are in tests/test_algorithms.py."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys

import pytest
import torch

from fake_groups import scheduling_driver
from rlhf.config import PPOConfig
from rlhf.experience import Generation
from rlhf.reward_functions import (
    RewardFunctionError,
    build_functions,
    check_functions,
    combined_scores,
    exact_match,
    numeric_match,
    regex_match,
)
from reports import assert_report
from runs import (LOOPBACK, PPO_SMALL, REPO, listening_addresses, marked, processes_of, run_env, signal_when,
                  tiny_ppo_model)
from test_ppo import iterations_done, records, run_ppo, toy_policy
from trainer.sampling import derive_seed


# ------------------------------------------------------------------------------------------ sampling


def test_each_sample_depends_on_its_own_seed_alone():
    """A prompt sampled with a seed gets the same response whatever batch, position or neighbours it has."""
    from rlhf.actor import sample_responses

    model = toy_policy()
    kw = dict(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, stop_ids=[2], pad_id=0)
    a, b, c = [1, 5, 6, 7], [1, 8], [1, 9, 9, 4, 4]
    first, _ = sample_responses(model, [a, b], [11, 22], **kw)
    second, _ = sample_responses(model, [c, b, a, a], [33, 22, 11, 44], **kw)
    assert second[1] == first[1] and second[2] == first[0]
    draws = {tuple(sample_responses(model, [a], [s], **kw)[0][0]) for s in range(6)}
    assert len(draws) > 1, "other seeds, other samples"
    greedy, logps = sample_responses(model, [a, b], None, **kw)
    assert logps is None and greedy == sample_responses(model, [b, a], None, **kw)[0][::-1]


@pytest.mark.parametrize("seeds", [[11, 44, 22, 33, 55], None])
def test_a_prompt_several_rows_repeat_is_prefilled_once_and_samples_as_each_row_alone(seeds):
    """rollout.share_prompt in sampling: a group's prompt is prefilled once and its cache copied to the group's
    rows; each row (left-padded beside a longer prompt, or not) gets the response and recorded log-probs it gets
    with the plain prefill, sampled and greedy."""
    from rlhf.actor import sample_responses, shared_prefill
    from trainer.evaluate import left_pad

    model = toy_policy()
    kw = dict(max_new_tokens=8, temperature=0.8, top_k=0, top_p=1.0, stop_ids=[2], pad_id=0, record=True)
    a, b, c = [1, 5, 6, 7], [1, 8], [1, 9, 9, 4, 4]
    prompts = [a, a, b, a, c]
    plain = sample_responses(model, prompts, seeds, **kw)
    shared = sample_responses(model, prompts, seeds, share_prompt=True, **kw)
    assert shared[0] == plain[0]
    if seeds is not None:
        for mine, theirs in zip(shared[1], plain[1]):
            assert torch.allclose(torch.tensor(mine), torch.tensor(theirs), atol=1e-5)
    ids, mask = left_pad(prompts, 0)
    cache = shared_prefill(model, prompts, ids, mask)
    assert cache.get_seq_length() == ids.shape[1] - 1 and cache.layers[0].keys.shape[0] == len(prompts)
    assert shared_prefill(model, [a, b], *left_pad([a, b], 0)) is None  # nothing repeats: generate prefills


def test_the_seeded_sampler_draws_from_the_softmax_and_never_a_token_of_probability_zero():
    """`SeededRowSampler`'s inverse-CDF draw: over many seeds each token comes up about as often as its
    probability says (4 standard errors), and a token masked to -inf (top-k, top-p) never does."""
    from rlhf.actor import SeededRowSampler

    probs = torch.tensor([0.5, 0.3, 0.0, 0.15, 0.05])
    scores = probs.log().expand(4000, -1)  # the masked token's score is -inf
    kept = SeededRowSampler(list(range(4000)), torch.device("cpu"))(None, scores)  # (N, V): 0 at the draw
    drawn = kept.argmax(1)
    assert bool((kept == 0).sum(1).eq(1).all()), "one token left possible per row"
    freq = torch.bincount(drawn, minlength=5).float() / len(drawn)
    assert freq[2] == 0
    assert torch.all((freq - probs).abs() <= 4 * (probs * (1 - probs) / len(drawn)).sqrt() + 1e-9), freq


# ------------------------------------------------------------------------------------------ reward functions


ROWS = [{"answer": "5 7", "unit": "cm"}, {"answer": "12"}, {"answer": None}]


def test_built_in_reward_functions_read_the_row():
    prompts = ["p"] * 3
    assert exact_match(prompts, [" 5 7 ", "12.0", "x"], ROWS) == [1.0, 0.0, 0.0]
    assert numeric_match(prompts, ["it is 12", "12.0000001", "3"], [{"answer": "12"}, ROWS[1], ROWS[2]]) == \
        [1.0, 1.0, 0.0]
    assert exact_match(prompts, ["cm", "cm", "cm"], ROWS, key="unit") == [1.0, 0.0, 0.0]
    assert regex_match(prompts, ["5 7", "The answer is 12", ""], ROWS, pattern=r"[\d ]+") == [1.0, 0.0, 0.0]


def bad_length(prompts, responses, rows):
    return [1.0]


def raises_on_third(prompts, responses, rows):
    return [1.0 / (len(r) - 3) for r in responses]  # "abc" divides by zero


def test_functions_combine_with_weights_and_each_is_reported():
    fns = build_functions([{"_target_": "rlhf.reward_functions.exact_match", "weight": 2.0},
                           {"_target_": "rlhf.reward_functions.regex_match", "pattern": r"\d+", "weight": 0.5},
                           {"_target_": "rlhf.reward_functions.exact_match", "key": "unit", "name": "unit"}])
    rows = [{"answer": "5 7"}, {"answer": "12"}, {"answer": None, "unit": "cm"}]
    total, parts = combined_scores(fns, ["p"] * 3, ["5 7", "12", "cm"], rows)
    assert parts == {"exact_match": [1.0, 1.0, 0.0], "regex_match": [0.0, 1.0, 0.0], "unit": [0.0, 0.0, 1.0]}
    assert total == [2.0, 2.5, 1.0]


@pytest.mark.parametrize("target,message", [
    ("test_grpo.raises_on_third", r"reward function raises_on_third \(reward.functions\[1\]\) raised on prompt 12: "
                                  r"'third' ?: ZeroDivisionError"),
    ("test_grpo.bad_length", r"reward function bad_length \(reward.functions\[1\]\) returned 1 scores for 3 "
                             r"responses \(prompts 10..12\)"),
])
def test_a_failing_reward_function_is_named_with_the_prompt(target, message):
    fns = build_functions([{"_target_": "rlhf.reward_functions.exact_match"}, {"_target_": target}])
    with pytest.raises(RewardFunctionError, match=message):
        combined_scores(fns, ["first", "second", "third"], ["abcd", "abcde", "abc"], ROWS, first_index=10)


@pytest.mark.parametrize("spec,message", [
    ({"_target_": "test_grpo.bad_lenght"}, r"^reward\.functions\[0\]\._target_: 'test_grpo\.bad_lenght' is not a function; "
                                           r"did you mean test_grpo\.bad_length\?$"),
    ({"_target_": "no_such_module.fn"}, r"^reward\.functions\[0\]\._target_: cannot import 'no_such_module' for "
                                        r"'no_such_module\.fn' \(No module named 'no_such_module'\); a module of your own"),
    ({"_target_": "rlhf.reward_functions.numeric_match", "tolerence": 0.1},
     r"^reward\.functions\[0\]: rlhf\.reward_functions\.numeric_match does not take these arguments \(got an "
     r"unexpected keyword argument 'tolerence'\); it takes numeric_match\(prompts, responses, rows, tolerance=1e-06,"),
])
def test_a_misspelt_reward_function_or_argument_is_one_line_naming_it(spec, message):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        check_functions([spec])
    check_functions([{"_target_": "rlhf.reward_functions.numeric_match", "tolerance": 0.1, "weight": 2.0, "name": "n"},
                     {"_target_": "test_grpo.bad_length"}])  # what is right passes


@pytest.mark.distributed
def test_a_reward_function_of_the_users_own_module_runs_from_where_the_run_starts(tiny_model, tmp_path):
    """As users write one: a module beside their data, not installed, named in reward.functions; a misspelt name
    ends the run before Ray starts."""
    (tmp_path / "myreward.py").write_text("def length_score(prompts, responses, rows):\n"
                                          "    return [float(len(r)) for r in responses]\n")
    env = {**run_env(), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)

    def run(target: str, run_dir: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "rlhf.ppo", *tiny_model, *PPO_SMALL, *GRPO, "train.iterations=1",
               f"reward.functions=[{{_target_: {target}}}]", f"hydra.run.dir={run_dir}"]
        return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)

    typo = run("myreward.lenght_score", "typo")
    assert typo.returncode == 2, typo.stderr[-3000:]
    assert typo.stderr.strip().splitlines()[-1] == ("error: reward.functions[0]._target_: 'myreward.lenght_score' is "
                                                    "not a function; did you mean myreward.length_score?")
    assert "Started a local Ray instance" not in typo.stdout + typo.stderr
    done = run("myreward.length_score", "run")
    assert done.returncode == 0, done.stderr[-3000:]
    assert records(tmp_path / "run")[1]["reward/fn/length_score_mean"] > 0


def test_a_non_number_score_names_the_function_and_prompt():
    fns = build_functions([{"_target_": "rlhf.reward_functions.exact_match", "correct": "yes"}])
    with pytest.raises(RewardFunctionError, match=r"returned 'yes' for prompt 0: 'first'; a score must be"):
        combined_scores(fns, ["first", "second", "third"], ["5 7", "0", "0"], ROWS)


# ------------------------------------------------------------------------------------------ the driver, no Ray


def test_dynamic_sampling_fills_the_batch_with_groups_that_carry_signal(monkeypatch, tmp_path):
    """Responses are 'right' or 'wrong' by their seed's parity; groups of 2 whose two samples agree carry no
    signal and are dropped, and more prompts are sampled until the batch is full (or the rounds run out,
    when dropped groups fill it)."""
    cfg = PPOConfig()
    cfg.rollout.prompts_per_iteration, cfg.rollout.samples_per_prompt = 4, 2
    cfg.algo.advantage, cfg.algo.kl_coef, cfg.algo.dynamic_sampling = "grpo", 0.0, True
    cfg.algo.max_sampling_rounds, cfg.algo.whiten_advantages, cfg.algo.mini_batch_size = 3, False, 8
    trained = []

    def generate(shard):
        ids, seeds = shard
        return Generation([[10 + s % 2, 2] for s in seeds], [[-1.0, -1.0] for _ in seeds], 0.0)

    def scores(shard):
        exp, _, _ = shard
        return (exp.responses[:, :1] == 11).float()  # (b, 1)

    def train(exp, *args):
        trained.append(exp)
        return {"loss": 0.0}

    driver, log = scheduling_driver(monkeypatch, tmp_path, 1, False, cfg,
                                    {"actor": {"generate": generate, "train": train}, "reward": {"scores": scores}},
                                    prompts=50)
    metrics = driver.iteration(0)
    assert sum(len(e) for e in trained) == 8  # 4 groups of 2, over the policy's 2 ranks
    # Replay the seeds: which sampled groups agreed, round by round.
    kept = dropped = rounds = 0
    for r in range(3):
        for i in range(4):
            parity = {derive_seed(cfg.seed, "sample", r * 4 + i, k) % 2 for k in range(2)}
            kept, dropped = (kept + 1, dropped) if len(parity) == 2 else (kept, dropped + 1)
        rounds += 1
        if kept >= 4:
            break
    assert (metrics["rollout/sampling_rounds"], metrics["rollout/groups_dropped"]) == (rounds, dropped)
    assert metrics["rollout/groups_refilled"] == max(0, 4 - kept)
    assert metrics["reward/zero_variance_groups"] == pytest.approx(max(0, 4 - kept) / 4)
    assert [e for e in log if e[:3] == ("call", "reward", "scores")], "scored before the batch was complete"


# ------------------------------------------------------------------------------------------ real runs on Ray


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> list[str]:
    return tiny_ppo_model(tmp_path_factory.mktemp("tiny_model"))


GRPO = ["algo=grpo", "rollout.prompts_per_iteration=4", "algo.mini_batch_size=8", "actor.micro_batch_size=4"]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_model):
    run = tmp_path_factory.mktemp("grpo") / "straight"
    # Exact match scores; the weight-0 probe records Ray's actor table from inside the reward actor.
    functions = ("reward.functions=[{_target_: rlhf.reward_functions.exact_match}, "
                 f"{{_target_: ppo_faults.record_actor_classes, weight: 0.0, path: '{run.parent / 'actors.txt'}'}}]")
    proc = run_ppo(run, tiny_model, *GRPO, "train.iterations=4", "train.save_every=2", "logger.report=true", functions,
                   pythonpath=str(REPO / "tests"))
    return run, proc


@pytest.mark.distributed
def test_grpo_runs_the_policy_and_a_reward_function_only(grpo_run):
    run, proc = grpo_run
    rows = [row.split() for row in (run / "placement.txt").read_text().splitlines()[1:]]
    assert [row[0] for row in rows] == ["actor", "actor", "reward"]  # no critic and, without a KL term, no reference
    # deepspeed.stage=auto: this policy's training state is far under actor.deepspeed.auto_partition_above_gb, so its
    # 2 ranks hold it whole (tests/test_ppo.py runs the policy under ZeRO-3).
    assert [row[-1] for row in rows] == ["0", "0", "0"]
    assert "actor.deepspeed.stage: auto -> 0 (training state 0.0" in proc.stdout
    # Ray's own actor table agrees: two policy ranks and the reward actor, no critic or reference process.
    assert (run.parent / "actors.txt").read_text().split() == ["PolicyWorker", "PolicyWorker", "RewardWorker"]
    assert "algo=grpo roles=actor,reward" in proc.stdout
    # The tiny policy is under actor.optim.large_model_params: the small model's rate, its size said.
    assert re.search(r"actor\.optim\.lr: auto -> 2e-05 \(peft\.method=none, [\d,]+ parameters, under "
                     r"actor\.optim\.large_model_params=50,000,000; from actor\.optim\.lr_for\)", proc.stdout)
    recs = records(run)
    for step in (1, 2, 3, 4):
        for key in ("reward/score_raw_mean", "reward/fn/exact_match_mean", "reward/group_std_mean",
                    "reward/zero_variance_groups", "policy/loss", "policy/clip_frac", "policy/entropy",
                    "response/length_mean", "time/generate_s", "throughput/rollouts_per_s"):
            assert key in recs[step] and recs[step][key] == recs[step][key], (step, key)
        assert not any(k.startswith(("critic/", "value/")) for k in recs[step])
    assert {"eval/pass@1", "eval/pass@4", "eval/exact_match"} <= set(recs[0]) and "eval/pass@4" in recs[4]
    before_after = json.loads((run / "before_after.json").read_text())
    assert set(before_after["eval/pass@4"]) == {"start", "grpo"}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["actor", "driver"]


@pytest.mark.distributed
def test_grpo_run_writes_its_report(grpo_run):
    run, proc = grpo_run
    assert f"report: {run / 'report.html'}" in proc.stdout
    assert_report(run, [run], {"rl_reward", "rl_entropy", "rl_clip_frac", "rl_response_length", "rl_exact_match",
                               "rl_phase_times"})
    page = (run / "report.html").read_text()
    # The before/after table and the last iteration's sample generations are in the page too.
    assert "start (SFT)" in page and "GRPO" in page and "Sample generations (step 4)" in page


@pytest.mark.distributed
@pytest.mark.slow
def test_a_run_preempted_in_the_default_directory_continues_with_the_printed_command_as_the_straight_run(
        grpo_run, tiny_model, tmp_path):
    """As a user meets a preemption: the run was typed with no run directory, SIGTERM (which ray.init would
    otherwise turn into an exit of the driver; test_ppo's run uses SIGUSR1) ends it with 75 and the command that
    continues; that command, typed in the same place, finds the run in its default directory, continues it there,
    and every iteration equals the straight run's."""
    run, _ = grpo_run
    # 20 iterations where the straight run has 4 (a constant learning rate: the first 4 are the same run): at this
    # size an iteration takes a fraction of a second, and a run of 4 could finish before the signal lands.
    typed = [sys.executable, "-m", "rlhf.ppo", *tiny_model, *PPO_SMALL, *GRPO, "train.iterations=20",
             "train.save_every=100"]
    env = run_env()
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # as users run it: the driver keeps Ray on loopback
    env["PYTHONPATH"] = str(REPO)  # the runs start in a scratch directory, whose outputs/ is the outputs root
    runs = tmp_path / "outputs" / "ppo"
    first = signal_when(typed, lambda: any(iterations_done(r) for r in runs.glob("*")), signal.SIGTERM, env=env,
                        cwd=tmp_path)
    assert first.returncode == 75, first.stderr[-3000:]
    (resumed,) = runs.iterdir()
    line = next(l for l in first.stdout.splitlines() if l.startswith("preempted:"))
    command = shlex.split(line.split("to continue: ", 1)[1])
    assert command[1:] == [*typed[1:], "resume=auto"]

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resume=auto: continuing outputs/ppo/{resumed.name} from step " in again.stdout
    assert list(runs.iterdir()) == [resumed] and (resumed / "before_after.json").exists()
    a, b = records(run), records(resumed)
    assert iterations_done(resumed) == list(range(1, 21))
    for step in range(1, 5):
        for key in ("reward/score_raw_mean", "policy/loss", "policy/approx_kl", "response/length_mean"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-5), (step, key)


@pytest.mark.distributed
def test_a_run_on_its_own_ray_listens_on_no_interface_but_loopback(tiny_model, tmp_path):
    """As users type it (no RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER in the environment): every TCP socket that any of
    the run's processes (the driver, Ray's servers and agents, the role workers and their process groups) listens
    on, read while it trains, is on loopback."""
    env = {**run_env(), **marked(), "PYTHONPATH": str(REPO)}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    run = tmp_path / "run"
    seen: dict[int, tuple[str, list[str]]] = {}

    def training() -> bool:
        if not iterations_done(run):
            return False
        seen.update({pid: (cmd, listening_addresses(pid)) for pid, cmd in processes_of(env).items()})
        return True

    typed = [sys.executable, "-m", "rlhf.ppo", *tiny_model, *PPO_SMALL, *GRPO, "train.iterations=40",
             "train.save_every=100", f"hydra.run.dir={run}"]
    done = signal_when(typed, training, signal.SIGTERM, env=env)
    assert done.returncode == 75, done.stderr[-3000:]
    assert any(addresses for _, addresses in seen.values()), seen  # Ray's servers were among them
    wide = {pid: (cmd[:120], a) for pid, (cmd, a) in seen.items() if not set(a) <= set(LOOPBACK)}
    assert not wide, wide


@pytest.mark.distributed
def test_rloo_with_a_kl_term_dynamic_sampling_gspo_and_truncated_importance_sampling(tiny_model, tmp_path):
    """One run through the options a GRPO-family user combines: RLOO's baseline, a KL term in the loss (so the
    reference starts), dynamic sampling, GSPO's sequence ratio with sequence-mean aggregation, and truncated
    importance sampling between the sampler's log-probs and recomputed ones."""
    run = tmp_path / "rloo"
    run_ppo(run, tiny_model, *GRPO, "algo=rloo", "train.iterations=2", "train.save_every=-1", "algo.kl_coef=0.01",
            "algo.dynamic_sampling=true", "algo.max_sampling_rounds=2", "algo.ratio=sequence",
            "algo.loss_agg=seq_mean_token_mean", "algo.tis_cap=2.0", "rollout.old_logprobs=recompute",
            "algo.overlong_buffer=2")
    roles = {row.split()[0] for row in (run / "placement.txt").read_text().splitlines()[1:]}
    assert roles == {"actor", "reference", "reward"}
    recs = records(run)
    for key in ("rollout/sampling_rounds", "rollout/groups_dropped", "rollout/logp_mismatch", "policy/tis_weight",
                "policy/kl_loss", "reward/overlong_penalty_mean"):
        assert key in recs[1] and recs[1][key] == recs[1][key], key
    assert 1 <= recs[1]["rollout/sampling_rounds"] <= 2
    # fp32 on the CPU: the sampler's log-probs equal the recomputed ones, so every weight is 1
    assert recs[1]["policy/tis_weight"] == pytest.approx(1.0, abs=1e-4)
