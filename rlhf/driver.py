"""The PPO driver: the four role groups (policy, reference, reward, critic) started on their placements, and
what one iteration, an evaluation and a checkpoint ask of them.

One iteration: sample prompts -> the policy generates -> in parallel, policy log-probs, reference
log-probs, critic values and reward scores -> token rewards, KL and advantages (`rlhf.scoring`, pure
functions over the whole rollout batch) -> critic and policy updates in parallel (the policy's
generation replica is refreshed at the end of its update; the next iteration's generation starts as
soon as the policy is done, while the critic finishes) -> log. The run directory gets
metrics.jsonl, samples.jsonl, placement.txt and checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from rlhf.algorithms import build_kl_controller
from rlhf.config import PPOConfig
from rlhf.experience import Experience, Generation, build_rollout, pad_right, pad_rows
from rlhf.group import ActorGroup, PendingCall, wait_all
from rlhf.placement import RoleLayout, check_resources, create_placements, placement_table, remove_placements
from rlhf.scoring import pad_to_multiple, sample_prompts, score_rollout, split_evenly
from trainer.config import ConfigError
from trainer.contracts import ROLES
from trainer.metrics import MetricsLogger
from trainer.sweep import current_member, tag_logger

ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = "driver"


# ---------------------------------------------------------------------------------------------------- checks


def check_tokenizers(cfg: PPOConfig) -> None:
    """Reference and critic read the policy's token ids, so they need its vocabulary; a reward model
    with another tokenizer needs reward.retokenize=true. Checked before any model is loaded."""
    from trainer.model import load_tokenizer

    vocab = load_tokenizer(cfg.actor.model).get_vocab()
    for role in ("reference", "critic", "reward"):
        rc = cfg.role(role)
        if role == "reward" and (rc.function is not None or rc.retokenize):
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
    if not cfg.algo.normalize_reward or rc.function is not None:
        return None
    stats = read_reward_stats(rc.model.name_or_path)
    if stats is None:
        print(f"note: no reward_stats.json with the reward model ({rc.model.name_or_path}); scores are not "
              f"normalised (algo.normalize_reward)", flush=True)
    return stats


# ---------------------------------------------------------------------------------------------------- the groups


def start_groups(cfg: PPOConfig, run_dir: Path, use_gpu: bool) -> tuple[dict[str, ActorGroup], dict]:
    """The four roles placed on the cluster, their actors started, each role's process group formed and its
    model loaded: (groups by role, placements by role). placement.txt in `run_dir` says where each rank runs.
    If any step fails, what was started is stopped before the error propagates."""
    import ray

    from rlhf.actor import PolicyWorker
    from rlhf.critic import CriticWorker
    from rlhf.reference import ReferenceWorker
    from rlhf.reward import RewardWorker

    workers = {"actor": PolicyWorker, "critic": CriticWorker, "reference": ReferenceWorker, "reward": RewardWorker}
    layouts = {r: RoleLayout(r, cfg.role(r).num_nodes, cfg.role(r).devices_per_node) for r in ROLES}
    check_resources(layouts, cfg.cluster.colocate, use_gpu, [n for n in ray.nodes() if n.get("Alive")])
    placements = create_placements(layouts, cfg.cluster.colocate, use_gpu, cfg.cluster.placement_timeout_s)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(cfg.cluster.torch_threads), "TOKENIZERS_PARALLELISM": "false"}
    groups: dict[str, ActorGroup] = {}
    try:
        for role in ROLES:
            groups[role] = ActorGroup(role, workers[role], cfg.role(role).world_size, placements[role], cfg, env)
        table = placement_table([row for g in groups.values() for row in g.start()])
        (run_dir / "placement.txt").write_text(table + "\n")
        print(table, flush=True)
        t0 = time.perf_counter()
        wait_all([g.call("setup") for g in groups.values()])
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
                 reward_stats: Optional[dict] = None, placements: Optional[dict] = None):
        """A driver over started role groups (`start_groups`; anything with their `world_size` and
        `call*` methods will do). `placements`, when given, are removed with the groups by `stop()`;
        `Driver.start` builds the whole thing for a run."""
        self.cfg, self.run_dir, self.groups, self.placements = cfg, run_dir, groups, placements or {}
        self.tokenizer, self.train_prompts, self.eval_prompts = tokenizer, train_prompts, eval_prompts
        self.logger, self.reward_stats = logger, reward_stats
        a = cfg.algo
        self.kl = build_kl_controller(a.kl_controller, a.kl_coef, a.kl_target, a.kl_horizon)
        self._next_generation: dict[int, tuple[list, PendingCall]] = {}  # iteration -> its prompts and generation

    @classmethod
    def start(cls, cfg: PPOConfig, run_dir: Path, resolved: dict, use_gpu: bool) -> "Driver":
        """A run's driver: the policy's tokenizer, the train and eval prompts, the reward statistics, the
        logger (`resolved` is the config it records), then the four groups started on Ray."""
        from trainer.data import build_prompts
        from trainer.model import load_tokenizer

        tokenizer = load_tokenizer(cfg.actor.model)
        d = cfg.data
        train_prompts = build_prompts(d, tokenizer, d.path, d.split, d.format, d.name)
        eval_prompts = (build_prompts(d, tokenizer, d.eval_path, d.eval_split, d.eval_format)[: cfg.train.eval_prompts]
                        if d.eval_path else [])
        reward_stats = load_reward_stats(cfg)
        print(f"policy={cfg.actor.model.name_or_path or 'tiny random init'} "
              f"reward={cfg.reward.function or cfg.reward.model.name_or_path or 'tiny random init'} "
              f"prompts={len(train_prompts)} eval_prompts={len(eval_prompts)} "
              f"rollout_batch={cfg.rollout_batch} iterations={cfg.train.iterations} run_dir={run_dir}", flush=True)
        logger_cfg, logged_config = tag_logger(cfg.logger, resolved, current_member())
        logger = MetricsLogger(run_dir, logger_cfg, logged_config, job_type="ppo", enabled=True)
        try:
            groups, placements = start_groups(cfg, run_dir, use_gpu)
        except BaseException:
            logger.close()
            raise
        return cls(cfg, run_dir, groups, tokenizer, train_prompts, eval_prompts, logger, reward_stats, placements)

    def stop(self) -> None:
        stop_groups(self.groups, self.placements)
        self.logger.close()

    # -------------------------------------------------------------- one iteration

    def _start_generation(self, it: int) -> tuple[list, PendingCall]:
        """Iteration `it`'s prompts, and the policy's generation call for them, in flight."""
        cfg, actor = self.cfg, self.groups["actor"]
        prompts = [p for p in sample_prompts(self.train_prompts, it, cfg.rollout.prompts_per_iteration, cfg.seed)
                   for _ in range(cfg.rollout.samples_per_prompt)]
        ids = [p.prompt_ids for p in prompts]
        return prompts, actor.call_sharded("generate", split_evenly(ids, actor.world_size), it)

    def iteration(self, it: int, stopping: Callable[[], bool] = lambda: False) -> dict:
        """One PPO iteration; `stopping()` true (a preemption) starts no generation for the next one, which a
        checkpoint of the policy would otherwise have to wait for."""
        cfg, g = self.cfg, self.groups
        t_start = time.perf_counter()
        # Started by the previous iteration while its critic update finished (rollout.overlap_critic_update).
        prompts, generation = self._next_generation.pop(it, None) or self._start_generation(it)
        prompt_ids = [p.prompt_ids for p in prompts]
        actor = g["actor"]
        generated: list[Generation] = wait_all([generation])[0]  # one per policy rank
        responses = [r for rank in generated for r in rank.responses]
        # Old log-probs recorded while sampling (rollout.old_logprobs), else None: the forward phase computes them.
        sampled_logp = (None if generated[0].logprobs is None
                        else [lp for rank in generated for lp in rank.logprobs])
        t_generated = time.perf_counter()
        rollout = build_rollout(prompt_ids, responses, self.tokenizer.pad_token_id)
        texts = self._texts(prompts, responses)

        old_logp, ref_logp, values, raw = self._forward_phase(rollout, texts, policy_logprobs=sampled_logp is None)
        if sampled_logp is not None:
            old_logp = pad_rows(sampled_logp, rollout.responses.shape[1])
        t_scored = time.perf_counter()
        exp = rollout.with_fields(old_logp=old_logp, ref_logp=ref_logp, values=values)
        exp, metrics = score_rollout(exp, raw, cfg, self.kl.value, self.reward_stats)

        critic_update = g["critic"].call_sharded("train", exp.shards(g["critic"].world_size), it)
        if it >= cfg.algo.critic_warmup_iterations:
            policy = wait_all([actor.call_sharded("train", exp.shards(actor.world_size), it, self.kl.value)])[0]
            metrics.update({f"policy/{k}": v for k, v in policy[0].items()})
        # The next rollouts need only the updated policy: they are sampled while the critic finishes, whose new
        # weights are first read when they are scored. The same computation, with less idle time.
        if cfg.rollout.overlap_critic_update and it + 1 < cfg.train.iterations and not stopping():
            self._next_generation = {it + 1: self._start_generation(it + 1)}
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
            self._log_samples(it + 1, texts, raw, exp)
        return metrics

    def _forward_phase(self, rollout: Experience, texts: dict, policy_logprobs: bool):
        """Policy log-probs (unless sampling recorded them), reference log-probs, critic values and reward
        scores, all groups at once; the policy's are None when not asked for."""
        g = self.groups
        calls = [
            g["reference"].call_sharded("log_probs", rollout.shards(g["reference"].world_size)),
            g["critic"].call_sharded("values", rollout.shards(g["critic"].world_size)),
            self._scores_call(rollout, texts),
        ]
        if policy_logprobs:
            calls.append(g["actor"].call_sharded("log_probs", rollout.shards(g["actor"].world_size)))
        ref_parts, value_parts, score_parts, *policy_parts = wait_all(calls)
        width = rollout.responses.shape[1]

        def cat(ranks: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([pad_right(p, width) for p in ranks])

        logp = cat(policy_parts[0]) if policy_parts else None
        return logp, cat(ref_parts), cat(value_parts), torch.cat(score_parts)

    def _scores_call(self, rollout: Experience, texts: dict):
        reward = self.groups["reward"]
        n = reward.world_size
        text_shards = [dict(zip(texts, vals)) for vals in zip(*(split_evenly(texts[k], n) for k in texts))]
        return reward.call_per_rank("scores", list(zip(rollout.shards(n), text_shards)))

    def _texts(self, prompts: list, responses: list[list[int]]) -> dict:
        dec = self.tokenizer.batch_decode
        return {"prompts": dec([p.prompt_ids for p in prompts], skip_special_tokens=True),
                "responses": dec(responses, skip_special_tokens=True),
                "answers": [p.answer for p in prompts]}

    def _log_samples(self, step: int, texts: dict, raw: torch.Tensor, exp: Experience, n: int = 8) -> None:
        rows = [[texts["prompts"][i], texts["responses"][i], float(raw[i]), float(exp.scores[i])]
                for i in range(min(n, len(exp)))]
        with open(self.run_dir / "samples.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, "prompt": r[0], "response": r[1], "score_raw": r[2],
                                    "score": r[3]}) + "\n")
        self.logger.log_table(step, "samples", ["prompt", "response", "score_raw", "score"], rows)

    # -------------------------------------------------------------- evaluation

    def evaluate(self, it: int) -> dict:
        """The held-out prompts answered greedily (exact match per family and split, and the mean reward
        score, raw as the reward model or function gives it) and sampled as in rollouts (the mean reward
        score of the policy's distribution, and how often a sample is exactly right)."""
        from trainer.evaluate import exact_match_metrics

        if not self.eval_prompts:
            return {}
        n = len(self.eval_prompts)
        texts, raw, rollout = self._answer_and_score(self.eval_prompts, it, greedy=True)
        metrics, _ = exact_match_metrics(self.eval_prompts, texts["responses"][:n])
        metrics["eval/reward_score"] = float(raw.mean())
        by_split: dict[str, list[float]] = {}
        for p, score in zip(self.eval_prompts, raw.tolist()):
            if p.family_split and p.phrasing:
                by_split.setdefault(f"eval/reward_score/{p.family_split}_families_{p.phrasing}_phrasing", []).append(score)
        metrics.update({k: sum(v) / len(v) for k, v in sorted(by_split.items())})
        metrics["eval/response_length"] = float(rollout.response_mask[:n].sum(1).mean())
        texts, raw, _ = self._answer_and_score(self.eval_prompts, it, greedy=False)
        metrics["eval/reward_score_sampled"] = float(raw.mean())
        metrics["eval/exact_match_sampled"] = exact_match_metrics(self.eval_prompts, texts["responses"][:n])[0][
            "eval/exact_match"]
        return metrics

    def _answer_and_score(self, prompts: list, it: int, greedy: bool) -> tuple[dict, torch.Tensor, Experience]:
        """Responses to `prompts` (padded to split over both groups' ranks) and their raw scores."""
        actor, reward = self.groups["actor"], self.groups["reward"]
        padded = pad_to_multiple(prompts, math.lcm(actor.world_size, reward.world_size))
        ids = [p.prompt_ids for p in padded]
        generated = wait_all([actor.call_sharded("generate", split_evenly(ids, actor.world_size), it, greedy)])[0]
        responses = [r for rank in generated for r in rank.responses]
        rollout = build_rollout(ids, responses, self.tokenizer.pad_token_id)
        texts = self._texts(padded, responses)
        raw = torch.cat(wait_all([self._scores_call(rollout, texts)])[0])[: len(prompts)].float()
        return texts, raw, rollout

    # -------------------------------------------------------------- checkpoints

    def save(self, it: int) -> None:
        from trainer.checkpoint import atomic_write, tag_for

        root = self.run_dir / "checkpoints"
        wait_all([self.groups[r].call("save", str(root), it) for r in ("actor", "critic")])
        state_dir = root / STATE_DIR
        state_dir.mkdir(parents=True, exist_ok=True)
        state = {"iteration": it, "kl": self.kl.state_dict(), "world_sizes":
                 {r: self.groups[r].world_size for r in ROLES}}
        # Written last: a checkpoint counts only once both engines and this file are complete.
        atomic_write(state_dir / f"{tag_for(it)}.json", json.dumps(state, indent=2))
        atomic_write(state_dir / "latest", tag_for(it))

    def resume(self, resume: Optional[str]) -> int:
        """Iterations already done (0 when starting fresh)."""
        if resume is None:
            return 0
        run = self.run_dir if resume == "auto" else Path(resume)
        root = run / "checkpoints" if (run / "checkpoints").exists() else run
        pointer = root / STATE_DIR / "latest"
        if not pointer.exists():
            if resume == "auto":
                return 0
            raise FileNotFoundError(f"resume={resume}: no PPO checkpoint there (looked for {pointer})")
        tag = pointer.read_text().strip()
        state = json.loads((root / STATE_DIR / f"{tag}.json").read_text())
        sizes = {r: self.groups[r].world_size for r in ROLES}
        if state["world_sizes"] != sizes:
            raise ConfigError(f"resume: checkpoint {root / tag} was written with ranks {state['world_sizes']}, "
                              f"this run has {sizes}; ZeRO checkpoints resume on the same layout")
        wait_all([self.groups[r].call("load", str(root), tag) for r in ("actor", "critic")])
        self.kl.load_state_dict(state["kl"])
        print(f"resumed from {root / tag} after iteration {state['iteration']}", flush=True)
        return state["iteration"]
