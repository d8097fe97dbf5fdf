"""The RL driver: the role groups the algorithm needs (policy and reward always; the critic for PPO's GAE, the
reference when there is a KL term and the policy has no adapters to turn off: `PPOConfig.active_roles`) started on
their placements, and what one iteration, an evaluation and a checkpoint ask of them.

One iteration: sample prompts, G samples each -> the policy generates (with algo.dynamic_sampling, more rounds
until the batch holds groups whose scores differ) -> in parallel, policy log-probs, reference log-probs (from the
policy's own ranks with its adapters off when it trains LoRA adapters), critic values and reward scores -> token
rewards, KL and advantages (`rlhf.scoring`, pure functions over the whole rollout batch) -> critic and policy
updates in parallel (the policy's generation replica is refreshed at the end of its update; the next iteration's
generation starts as soon as the policy is done, while the critic finishes) -> log. The run directory gets
metrics.jsonl, samples.jsonl, placement.txt and checkpoints.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from rlhf.algorithms import build_kl_controller, masked_mean
from rlhf.checkpoint import ResumePoint, commit, drop_uncommitted
from rlhf.config import PPOConfig
from rlhf.experience import Experience, Generation, build_rollout, pad_right, pad_rows
from rlhf.group import ActorGroup, PendingCall, limits_of, wait_all
from rlhf.placement import RoleLayout, check_resources, create_placements, placement_table, remove_placements
from rlhf.reward_functions import function_names
from rlhf.scoring import pad_to_multiple, prompt_reuse_note, sample_prompts, score_rollout, split_evenly
from trainer.config import ConfigError
from trainer.metrics import MetricsLogger
from trainer.sampling import derive_seed
from trainer.sweep import current_member, tag_logger

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------- checks


def check_tokenizers(cfg: PPOConfig) -> None:
    """Reference and critic read the policy's token ids, so they need its vocabulary; a reward model
    with another tokenizer needs reward.retokenize=true. Checked before any model is loaded."""
    from trainer.model import load_tokenizer

    vocab = load_tokenizer(cfg.actor.model).get_vocab()
    for role in ("reference", "critic", "reward"):
        rc = cfg.role(role)
        if role not in cfg.active_roles or (role == "reward" and (rc.functions or rc.retokenize)):
            continue
        if load_tokenizer(rc.model).get_vocab() != vocab:
            hint = ("set reward.retokenize=true to decode and re-encode responses for it" if role == "reward"
                    else f"{role} must use the policy's tokenizer")
            raise ConfigError(f"{role}.model: its tokenizer ({rc.model.tokenizer or rc.model.name_or_path}) differs "
                              f"from the policy's ({cfg.actor.model.tokenizer or cfg.actor.model.name_or_path}); {hint}")


def load_reward_stats(cfg: PPOConfig) -> Optional[dict]:
    """The reward stage's score mean/std for normalisation, when asked for and available."""
    from trainer.reward_stats import read_reward_stats

    rc = cfg.reward
    if not cfg.algo.normalize_reward or rc.functions:
        return None
    stats = read_reward_stats(rc.model.name_or_path)
    if stats is None:
        print(f"note: no reward_stats.json with the reward model ({rc.model.name_or_path}); scores are not "
              f"normalised (algo.normalize_reward)", flush=True)
    return stats


# ---------------------------------------------------------------------------------------------------- the groups


def start_groups(cfg: PPOConfig, run_dir: Path, use_gpu: bool, preemption=None) -> tuple[dict[str, ActorGroup], dict]:
    """The four roles placed on the cluster, their actors started, each role's process group formed and its
    model loaded: (groups by role, placements by role). placement.txt in `run_dir` says where each rank runs.
    Until the models are loaded every call is waited for within cluster.start_timeout_s, later ones within
    cluster.call_timeout_s, and after a signal to `preemption` (a `trainer.preemption.PreemptionFlag`) all within
    cluster.preemption_wait_s of it (`rlhf.group.wait_all`).
    If any step fails, what was started is stopped before the error propagates."""
    import ray

    from rlhf.actor import PolicyWorker
    from rlhf.critic import CriticWorker
    from rlhf.reference import ReferenceWorker
    from rlhf.reward import RewardWorker

    workers = {"actor": PolicyWorker, "critic": CriticWorker, "reference": ReferenceWorker, "reward": RewardWorker}
    layouts = {r: RoleLayout(r, cfg.role(r).num_nodes, cfg.role(r).devices_per_node) for r in cfg.active_roles}
    check_resources(layouts, cfg.cluster.colocate, use_gpu, [n for n in ray.nodes() if n.get("Alive")])
    placements = create_placements(layouts, cfg.cluster.colocate, use_gpu, cfg.cluster.placement_timeout_s)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(cfg.cluster.torch_threads), "TOKENIZERS_PARALLELISM": "false"}
    limits = limits_of(cfg, preemption)
    groups: dict[str, ActorGroup] = {}
    try:
        for role in cfg.active_roles:
            groups[role] = ActorGroup(role, workers[role], cfg.role(role).world_size, placements[role], cfg, env,
                                      limits)
        table = placement_table([row for g in groups.values() for row in g.start()])
        (run_dir / "placement.txt").write_text(table + "\n")
        print(table, flush=True)
        t0 = time.perf_counter()
        setup = [g.call("setup") for g in groups.values()]
        for call in setup:
            call.limit = "start_timeout_s"
        wait_all(setup)
        print(f"models ready in {time.perf_counter() - t0:.1f}s", flush=True)
    except BaseException:
        stop_groups(groups, placements)
        raise
    return groups, placements


def stop_groups(groups: dict[str, ActorGroup], placements: dict) -> None:
    for g in groups.values():
        g.kill()
    if placements:
        remove_placements(placements)


# ---------------------------------------------------------------------------------------------------- the driver


class Driver:
    def __init__(self, cfg: PPOConfig, run_dir: Path, groups: dict[str, ActorGroup], tokenizer,
                 train_prompts: list, eval_prompts: list, logger: MetricsLogger,
                 inputs: Optional[dict] = None, placements: Optional[dict] = None):
        """A driver over started role groups (`start_groups`; anything with their `world_size` and
        `call*` methods will do). `placements`, when given, are removed with the groups by `stop()`;
        `Driver.start` builds the whole thing for a run."""
        self.cfg, self.run_dir, self.groups, self.placements = cfg, run_dir, groups, placements or {}
        self.tokenizer, self.train_prompts, self.eval_prompts = tokenizer, train_prompts, eval_prompts
        self.logger, self.inputs = logger, inputs or {"models": {}, "reward_stats": None}
        self.reward_stats = self.inputs["reward_stats"]
        a = cfg.algo
        self.kl = build_kl_controller(a.kl_controller, a.kl_coef, a.kl_target, a.kl_horizon)
        self._next_generation: dict[int, tuple[list, PendingCall]] = {}  # iteration -> its prompts and generation
        self.reward_names = function_names(cfg.reward.functions)  # each reward function's column in the scores

    @classmethod
    def start(cls, cfg: PPOConfig, run_dir: Path, resolved: dict, use_gpu: bool, inputs: dict,
              preemption=None) -> "Driver":
        """A run's driver: the policy's tokenizer, the train and eval prompts, the logger (`resolved` is the
        config it records), then the role groups started on Ray. `inputs`: the models and reward statistics
        it starts from (`rlhf.checkpoint.resolved_inputs`, or what the run's first start recorded).
        `preemption`: the run's `trainer.preemption.PreemptionFlag`, which bounds the waits after a signal."""
        from trainer.data import build_prompts
        from trainer.model import load_tokenizer

        tokenizer = load_tokenizer(cfg.actor.model)
        d = cfg.data
        train_prompts = build_prompts(d, tokenizer, d.path, d.split, d.format, d.name)
        eval_prompts = (build_prompts(d, tokenizer, d.eval_path, d.eval_split, d.eval_format)[: cfg.train.eval_prompts]
                        if d.eval_path else [])
        print(f"policy={cfg.actor.model.name_or_path or 'tiny random init'} "
              f"reward={', '.join(function_names(cfg.reward.functions)) or cfg.reward.model.name_or_path or 'tiny random init'} "
              f"algo={cfg.algo.name} roles={','.join(cfg.active_roles)} "
              f"prompts={len(train_prompts)} eval_prompts={len(eval_prompts)} "
              f"rollout_batch={cfg.rollout_batch} iterations={cfg.train.iterations} run_dir={run_dir}", flush=True)
        if note := prompt_reuse_note(len(train_prompts), cfg.rollout.prompts_per_iteration):
            print(note, flush=True)
        logger_cfg, logged_config = tag_logger(cfg.logger, resolved, current_member())
        logger = MetricsLogger(run_dir, logger_cfg, logged_config, job_type="ppo", enabled=True)
        try:
            groups, placements = start_groups(cfg, run_dir, use_gpu, preemption)
        except BaseException:
            logger.close()
            raise
        return cls(cfg, run_dir, groups, tokenizer, train_prompts, eval_prompts, logger, inputs, placements)

    def stop(self) -> None:
        stop_groups(self.groups, self.placements)
        self.logger.close()

    # -------------------------------------------------------------- one iteration

    def _start_generation(self, it: int, round_: int = 0) -> tuple[list, PendingCall]:
        """Round `round_` of iteration `it`: its prompts, each repeated rollout.samples_per_prompt times (a
        group), and the policy's generation call for them, in flight. Each sample's seed comes from its
        prompt's position in the prompt stream and its index in the group."""
        cfg = self.cfg
        n, G = cfg.rollout.prompts_per_iteration, cfg.rollout.samples_per_prompt
        rounds = cfg.algo.max_sampling_rounds if cfg.algo.dynamic_sampling else 1
        start = (it * rounds + round_) * n  # the stream position of this round's first prompt
        prompts = sample_prompts(self.train_prompts, it * rounds + round_, n, cfg.seed)
        rows = [(p, derive_seed(cfg.seed, "sample", start + i, k)) for i, p in enumerate(prompts) for k in range(G)]
        return [p for p, _ in rows], self._generate([p.prompt_ids for p, _ in rows], [s for _, s in rows])

    def _generate(self, ids: list[list[int]], seeds: Optional[list[int]]) -> PendingCall:
        actor = self.groups["actor"]
        shards = split_evenly(ids, actor.world_size)
        seed_shards = split_evenly(seeds, actor.world_size) if seeds is not None else [None] * actor.world_size
        return actor.call_per_rank("generate", list(zip(shards, seed_shards)))

    def _sampled(self, it: int, first: Optional[tuple[list, PendingCall]]) -> tuple[list, list[Generation], Optional[torch.Tensor], dict]:
        """The iteration's prompts and generations (one per policy rank), and with algo.dynamic_sampling their
        scores (B, 1 + K) (None otherwise: the forward phase scores them), after as many rounds as it takes to
        fill the batch with groups whose scores differ (at most algo.max_sampling_rounds)."""
        cfg, a = self.cfg, self.cfg.algo
        prompts, pending = first or self._start_generation(it)
        generated: list[Generation] = wait_all([pending])[0]
        if not a.dynamic_sampling:
            return prompts, generated, None, {}
        n, G = cfg.rollout.prompts_per_iteration, cfg.rollout.samples_per_prompt
        kept, dropped, round_ = [], [], 0  # groups: (prompts, responses, logprobs, scores)
        while True:
            responses = [r for rank in generated for r in rank.responses]
            logps = [lp for rank in generated for lp in rank.logprobs] if generated[0].logprobs is not None else None
            ids = [p.prompt_ids for p in prompts]
            raw = self._score(build_rollout(ids, responses, self.tokenizer.pad_token_id), self._texts(prompts, responses))
            for g in range(len(prompts) // G):
                rows = slice(g * G, (g + 1) * G)
                group = (prompts[rows], responses[rows], logps[rows] if logps else None, raw[rows])
                (kept if raw[rows, 0].max() > raw[rows, 0].min() else dropped).append(group)
            round_ += 1
            if len(kept) >= n or round_ >= a.max_sampling_rounds:
                break
            prompts, pending = self._start_generation(it, round_)
            generated = wait_all([pending])[0]
        groups = (kept + dropped)[:n]  # short after the last round: filled with groups that carry no advantage
        metrics = {"rollout/sampling_rounds": round_, "rollout/groups_dropped": len(dropped),
                   "rollout/groups_refilled": max(0, n - len(kept))}
        prompts = [p for grp in groups for p in grp[0]]
        merged = Generation([r for grp in groups for r in grp[1]],
                            [lp for grp in groups for lp in grp[2]] if groups[0][2] is not None else None,
                            max(rank.seconds for rank in generated))
        return prompts, [merged], torch.cat([grp[3] for grp in groups]), metrics

    def iteration(self, it: int, stopping: Callable[[], bool] = lambda: False) -> dict:
        """One iteration; `stopping()` true (a preemption) starts no generation for the next one, which a
        checkpoint of the policy would otherwise have to wait for."""
        cfg, g, a = self.cfg, self.groups, self.cfg.algo
        t_start = time.perf_counter()
        # Started by the previous iteration while its critic update finished (rollout.overlap_critic_update).
        prompts, generated, scored, metrics = self._sampled(it, self._next_generation.pop(it, None))
        prompt_ids = [p.prompt_ids for p in prompts]
        actor = g["actor"]
        responses = [r for rank in generated for r in rank.responses]
        # The sampler's log-probs (rollout.old_logprobs, algo.tis_cap), else None.
        sampled_logp = (None if generated[0].logprobs is None else [lp for rank in generated for lp in rank.logprobs])
        recompute = sampled_logp is None or a.tis_cap is not None  # the policy knows its precision; it said
        t_generated = time.perf_counter()
        rollout = build_rollout(prompt_ids, responses, self.tokenizer.pad_token_id)
        texts = self._texts(prompts, responses)

        old_logp, ref_logp, values, raw = self._forward_phase(rollout, texts, policy_logprobs=recompute,
                                                              scores=scored)
        width = rollout.responses.shape[1]
        rollout_logp = None if sampled_logp is None else pad_rows(sampled_logp, width)
        if not recompute:
            old_logp, rollout_logp = rollout_logp, None
        elif rollout_logp is not None:
            metrics["rollout/logp_mismatch"] = float(masked_mean((old_logp - rollout_logp).abs(), rollout.response_mask))
        t_scored = time.perf_counter()
        exp = rollout.with_fields(old_logp=old_logp, rollout_logp=rollout_logp, ref_logp=ref_logp, values=values)
        exp, scored_metrics = score_rollout(exp, raw[:, 0], cfg, self.kl.value, self.reward_stats)
        metrics.update(scored_metrics)
        metrics.update({f"reward/fn/{name}_mean": float(raw[:, 1 + i].mean()) for i, name in enumerate(self.reward_names)})

        critic_update = None
        if "critic" in g:
            critic_update = g["critic"].call_sharded("train", exp.shards(g["critic"].world_size), it)
        if "critic" not in g or it >= a.critic_warmup_iterations:
            policy = wait_all([actor.call_sharded("train", exp.shards(actor.world_size), it, self.kl.value)])[0]
            metrics.update({f"policy/{k}": v for k, v in policy[0].items()})
        # The next rollouts need only the updated policy: they are sampled while the critic finishes, whose new
        # weights are first read when they are scored. The same computation, with less idle time.
        if critic_update is not None and cfg.rollout.overlap_critic_update and it + 1 < cfg.train.iterations \
                and not stopping():
            self._next_generation = {it + 1: self._start_generation(it + 1)}
        if critic_update is not None:
            metrics.update({f"critic/{k}": v for k, v in wait_all([critic_update])[0][0].items()})
        t_trained = time.perf_counter()
        self.kl.update(metrics["kl/seq_mean"], len(exp))
        metrics.update({
            "time/generate_s": t_generated - t_start,
            "time/generate_rank_max_s": max(rank.seconds for rank in generated),
            "time/forward_s": t_scored - t_generated,
            "time/train_s": t_trained - t_scored,
            "time/iteration_s": t_trained - t_start,
            "throughput/rollouts_per_s": len(exp) / (t_trained - t_start),
        })
        if cfg.train.samples_every and (it + 1) % cfg.train.samples_every == 0:
            self._log_samples(it + 1, texts, raw[:, 0], exp)
        return metrics

    def _forward_phase(self, rollout: Experience, texts: dict, policy_logprobs: bool,
                       scores: Optional[torch.Tensor] = None):
        """Policy log-probs (when asked), reference log-probs and critic values (where those roles run) and the
        reward scores (unless given), all groups at once; what is not computed is None. A policy with adapters is
        its own reference (`PPOConfig.reference_from_policy`): its ranks score the rollouts again with them off."""
        g = self.groups
        calls: dict[str, PendingCall] = {}
        if "reference" in g:
            calls["reference"] = g["reference"].call_sharded("log_probs", rollout.shards(g["reference"].world_size))
        elif self.cfg.reference_from_policy:
            calls["reference"] = g["actor"].call_sharded("reference_log_probs", rollout.shards(g["actor"].world_size))
        if "critic" in g:
            calls["critic"] = g["critic"].call_sharded("values", rollout.shards(g["critic"].world_size))
        if scores is None:
            calls["reward"] = self._scores_call(rollout, texts)
        if policy_logprobs:
            calls["actor"] = g["actor"].call_sharded("log_probs", rollout.shards(g["actor"].world_size))
        results = dict(zip(calls, wait_all(list(calls.values()))))
        width = rollout.responses.shape[1]

        def cat(role: str) -> Optional[torch.Tensor]:
            return torch.cat([pad_right(p, width) for p in results[role]]) if role in results else None

        raw = torch.cat(results["reward"]) if scores is None else scores
        return cat("actor"), cat("reference"), cat("critic"), raw

    def _scores_call(self, rollout: Experience, texts: dict) -> PendingCall:
        reward = self.groups["reward"]
        n = reward.world_size
        size = len(rollout) // n
        text_shards = [dict(zip(texts, vals)) for vals in zip(*(split_evenly(texts[k], n) for k in texts))]
        return reward.call_per_rank("scores", [(shard, t, r * size) for r, (shard, t)
                                               in enumerate(zip(rollout.shards(n), text_shards))])

    def _score(self, rollout: Experience, texts: dict) -> torch.Tensor:
        """(B, 1 + K) raw scores: the score, then each reward function's own."""
        return torch.cat(wait_all([self._scores_call(rollout, texts)])[0])

    def _texts(self, prompts: list, responses: list[list[int]]) -> dict:
        dec = self.tokenizer.batch_decode
        return {"prompts": dec([p.prompt_ids for p in prompts], skip_special_tokens=True),
                "responses": dec(responses, skip_special_tokens=True),
                "rows": [p.row for p in prompts]}

    def _log_samples(self, step: int, texts: dict, raw: torch.Tensor, exp: Experience, n: int = 8) -> None:
        rows = [[texts["prompts"][i], texts["responses"][i], float(raw[i]), float(exp.scores[i])]
                for i in range(min(n, len(exp)))]
        self.logger.log_table(step, "samples", ["prompt", "response", "score_raw", "score"], rows)

    # -------------------------------------------------------------- evaluation

    def evaluate(self, it: int) -> dict:
        """The held-out prompts answered greedily (exact match per family and split, and the mean reward
        score, raw as the reward model or functions give it) and sampled as in rollouts, G times per prompt
        (G = rollout.samples_per_prompt): the mean reward score of the policy's distribution, how often a
        sample is exactly right (eval/exact_match_sampled, which is pass@1), and with G > 1 how often one of
        a prompt's G samples is (eval/pass@G)."""
        from trainer.evaluate import exact_match_metrics

        if not self.eval_prompts:
            return {}
        from trainer.progress import progress

        n, G = len(self.eval_prompts), self.cfg.rollout.samples_per_prompt
        # Two waits on the roles (greedy answers, then G samples per prompt): the bar's rate after the first
        # gives the second's ETA.
        bar = progress(total=n * (1 + G), desc="evaluate", unit="answer")
        texts, raw, rollout = self._answer_and_score(self.eval_prompts, None)
        bar.update(n)
        metrics, _ = exact_match_metrics(self.eval_prompts, texts["responses"][:n])
        metrics["eval/reward_score"] = float(raw.mean())
        by_split: dict[str, list[float]] = {}
        for p, score in zip(self.eval_prompts, raw.tolist()):
            if p.family_split and p.phrasing:
                by_split.setdefault(f"eval/reward_score/{p.family_split}_families_{p.phrasing}_phrasing", []).append(score)
        metrics.update({k: sum(v) / len(v) for k, v in sorted(by_split.items())})
        metrics["eval/response_length"] = float(rollout.response_mask[:n].sum(1).mean())
        repeated = [p for p in self.eval_prompts for _ in range(G)]
        seeds = [derive_seed(self.cfg.seed, "eval_sample", it, i, k) for i in range(n) for k in range(G)]
        texts, raw, _ = self._answer_and_score(repeated, seeds)
        bar.update(n * G)
        bar.close()
        metrics["eval/reward_score_sampled"] = float(raw.mean())
        _, samples = exact_match_metrics(repeated, texts["responses"][: n * G])
        correct = torch.tensor([ok for *_, ok in samples], dtype=torch.float32).view(n, G)
        metrics["eval/exact_match_sampled"] = float(correct.mean())
        if G > 1:
            metrics["eval/pass@1"] = float(correct.mean())
            metrics[f"eval/pass@{G}"] = float(correct.max(1).values.mean())
        return metrics

    def _answer_and_score(self, prompts: list, seeds: Optional[list[int]]) -> tuple[dict, torch.Tensor, Experience]:
        """Responses to `prompts` (greedy without `seeds`; padded to split over both groups' ranks) and their raw
        scores."""
        actor, reward = self.groups["actor"], self.groups["reward"]
        m = math.lcm(actor.world_size, reward.world_size)
        padded = pad_to_multiple(prompts, m)
        ids = [p.prompt_ids for p in padded]
        generated = wait_all([self._generate(ids, None if seeds is None else pad_to_multiple(seeds, m))])[0]
        responses = [r for rank in generated for r in rank.responses]
        rollout = build_rollout(ids, responses, self.tokenizer.pad_token_id)
        texts = self._texts(padded, responses)
        raw = self._score(rollout, texts)[: len(prompts), 0].float()
        return texts, raw, rollout

    # -------------------------------------------------------------- checkpoints

    def save(self, it: int) -> None:
        """Every trained role's checkpoint of iteration `it`, then the driver's state, which commits it."""
        root = self.run_dir / "checkpoints"
        wait_all([self.groups[r].call("save", str(root), it) for r in self.cfg.trained_roles])
        state = {"iteration": it, "kl": self.kl.state_dict(), "world_sizes":
                 {r: self.groups[r].world_size for r in self.groups}}
        commit(root, it, state, self.cfg.trained_roles, self.cfg.train.keep_last, self.inputs)

    def resume(self, point: Optional[ResumePoint]) -> int:
        """Iterations already done (0 when starting fresh): the roles and the KL controller restored."""
        if point is None:
            return 0
        state = point.state
        if point.root == self.run_dir / "checkpoints":
            drop_uncommitted(point.root, point, self.cfg.trained_roles)
        wait_all([self.groups[r].call("load", str(point.root), point.tag) for r in self.cfg.trained_roles])
        self.kl.load_state_dict(state["kl"])
        print(f"resumed from {point.root / point.tag} after iteration {state['iteration']}", flush=True)
        return state["iteration"]
