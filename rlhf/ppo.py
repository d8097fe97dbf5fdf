"""`python -m rlhf.ppo [overrides]`: PPO with policy, reference, reward and critic as separate Ray
actor groups, orchestrated by this one driver.

One iteration: sample prompts -> the policy generates -> in parallel, policy log-probs, reference
log-probs, critic values and reward scores -> token rewards, KL and advantages (here, in pure
functions over the whole rollout batch) -> critic and policy updates in parallel (the policy's
generation replica is refreshed at the end of its update; the next iteration's generation starts as
soon as the policy is done, while the critic finishes) -> log. The run directory gets
metrics.jsonl, samples.jsonl, placement.txt, checkpoints and before_after.json.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from trainer.local_ray import check_join, keep_local_ray_on_loopback

if __name__ == "__main__":  # before anything below imports Ray
    keep_local_ray_on_loopback(sys.argv[1:])

from rlhf.algorithms import (
    build_kl_controller,
    clip_scores,
    compute_gae,
    explained_variance,
    kl_estimate,
    masked_mean,
    masked_whiten,
    normalize_scores,
    token_level_rewards,
)
from rlhf.config import PPOConfig, validate
from rlhf.experience import Experience, build_rollout, pad_right, pad_rows
from rlhf.group import ActorGroup, PendingCall, RoleFailure, wait_all
from rlhf.placement import (
    PlacementError,
    RoleLayout,
    check_resources,
    create_placements,
    placement_table,
    remove_placements,
)
from trainer.compose import hydra_overrides, register_all, to_typed
from trainer.config import CONF_DIR, ConfigError
from trainer.contracts import PREEMPTED_EXIT_CODE, ROLES
from trainer.sampling import SeededOrder
from trainer.loop import PreemptionFlag
from trainer.sweep import current_member, objective, tag_logger

ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = "driver"


# ---------------------------------------------------------------------------------------------------- pure pieces


def sample_prompts(prompts: list, iteration: int, n: int, seed: int) -> list:
    """The n prompts of an iteration: positions iteration*n .. of the endless seeded order over the prompts
    (one permutation per pass), so the sampler's position is a function of the iteration alone (resume
    needs nothing else)."""
    return [prompts[i] for i in SeededOrder(len(prompts), seed, "prompts").take(iteration * n, n)]


def split_evenly(items: list, n: int) -> list[list]:
    size = len(items) // n
    return [items[r * size:(r + 1) * size] for r in range(n)]


def pad_to_multiple(items: list, n: int) -> list:
    """Repeat the last item so the list splits evenly over n ranks (extra results are dropped)."""
    return items + [items[-1]] * (-len(items) % n)


def score_rollout(exp: Experience, raw_scores: torch.Tensor, cfg: PPOConfig, kl_coef: float,
                  reward_stats: Optional[dict]) -> tuple[Experience, dict]:
    """Scores -> token rewards (with the KL penalty when algo.kl_in=reward) -> GAE advantages and returns."""
    a = cfg.algo
    mask = exp.response_mask
    scores = raw_scores.float()
    if reward_stats is not None:
        scores = normalize_scores(scores, reward_stats["mean"], reward_stats["std"])
    scores = clip_scores(scores, a.reward_clip)
    kl = kl_estimate(exp.old_logp, exp.ref_logp, a.kl_estimator) * mask  # (B, T)
    beta = kl_coef if a.kl_in == "reward" else 0.0
    rewards = token_level_rewards(scores, kl, mask, beta)
    advantages, returns = compute_gae(rewards, exp.values, mask, a.gamma, a.lam)
    if a.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    seq_kl = kl.sum(1)  # (B,) the per-sequence KL the controller and the table report
    lengths = mask.sum(1)
    metrics = {
        "reward/score_raw_mean": float(raw_scores.float().mean()),
        "reward/score_raw_std": float(raw_scores.float().std()) if len(raw_scores) > 1 else 0.0,
        "reward/score_mean": float(scores.mean()),
        "reward/total_mean": float((rewards * mask).sum(1).mean()),
        "kl/seq_mean": float(seq_kl.mean()),
        "kl/token_mean": float(masked_mean(kl, mask)),
        "kl/coef": kl_coef,
        "value/mean": float(masked_mean(exp.values, mask)),
        "value/explained_variance": float(explained_variance(exp.values, returns, mask)),
        "advantage/mean_raw": float(masked_mean(advantages, mask)),
        "return/mean": float(masked_mean(returns, mask)),
        "response/length_mean": float(lengths.mean()),
    }
    return exp.with_fields(scores=scores, rewards=rewards, advantages=advantages, returns=returns), metrics


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


class Driver:
    def __init__(self, cfg: PPOConfig, run_dir: Path, resolved: dict):
        from rlhf.actor import PolicyWorker
        from rlhf.critic import CriticWorker
        from rlhf.reference import ReferenceWorker
        from rlhf.reward import RewardWorker
        from trainer.data import build_prompts
        from trainer.metrics import MetricsLogger
        from trainer.model import load_tokenizer

        self.cfg, self.run_dir = cfg, run_dir
        self.tokenizer = load_tokenizer(cfg.actor.model)
        d = cfg.data
        self.train_prompts = build_prompts(d, self.tokenizer, d.path, d.split, d.format, d.name)
        self.eval_prompts = (build_prompts(d, self.tokenizer, d.eval_path, d.eval_split, d.eval_format)
                             [: cfg.train.eval_prompts] if d.eval_path else [])
        self.reward_stats = load_reward_stats(cfg)
        self.workers = {"actor": PolicyWorker, "critic": CriticWorker, "reference": ReferenceWorker,
                        "reward": RewardWorker}
        self.groups: dict = {}
        self.placements: dict = {}
        self._next_generation: dict[int, tuple[list, PendingCall]] = {}  # iteration -> its prompts and generation
        logger_cfg, logged_config = tag_logger(cfg.logger, resolved, current_member())
        self.logger = MetricsLogger(run_dir, logger_cfg, logged_config, job_type="ppo", enabled=True)
        a = cfg.algo
        self.kl = build_kl_controller(a.kl_controller, a.kl_coef, a.kl_target, a.kl_horizon)

    # -------------------------------------------------------------- setup and teardown

    def start(self, use_gpu: bool) -> None:
        import ray


        layouts = {r: RoleLayout(r, self.cfg.role(r).num_nodes, self.cfg.role(r).devices_per_node) for r in ROLES}
        check_resources(layouts, self.cfg.cluster.colocate, use_gpu, [n for n in ray.nodes() if n.get("Alive")])
        self.placements = create_placements(layouts, self.cfg.cluster.colocate, use_gpu,
                                            self.cfg.cluster.placement_timeout_s)
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "OMP_NUM_THREADS": str(self.cfg.cluster.torch_threads), "TOKENIZERS_PARALLELISM": "false"}
        for role in ROLES:
            self.groups[role] = ActorGroup(role, self.workers[role], layouts[role].num_nodes * layouts[role].devices_per_node,
                                           self.placements[role], self.cfg, env)
        rows = [row for g in self.groups.values() for row in g.start()]
        table = placement_table(rows)
        (self.run_dir / "placement.txt").write_text(table + "\n")
        print(table, flush=True)
        t0 = time.perf_counter()
        wait_all([g.call("setup") for g in self.groups.values()])
        print(f"models ready in {time.perf_counter() - t0:.1f}s", flush=True)

    def stop(self) -> None:
        for g in self.groups.values():
            g.kill()
        if self.placements:
            remove_placements(self.placements)
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
        generated = wait_all([generation])[0]
        responses = [r for rank_out, _, _ in generated for r in rank_out]
        # Old log-probs recorded while sampling (rollout.old_logprobs), else None: the forward phase computes them.
        sampled_logp = None if generated[0][1] is None else [lp for _, rank_lp, _ in generated for lp in rank_lp]
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
            "time/generate_rank_max_s": max(s for _, _, s in generated),
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
        responses = [r for rank_out, _, _ in generated for r in rank_out]
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


def _before_after(before: dict, after: dict) -> tuple[str, dict]:
    keys = [k for k in ("eval/exact_match", "eval/em_split/trained_families_seen_phrasing",
                        "eval/em_split/trained_families_heldout_phrasing", "eval/reward_score",
                        "eval/reward_score/trained_families_seen_phrasing", "eval/reward_score_sampled",
                        "eval/exact_match_sampled",
                        "eval/response_length") if k in before and k in after]
    lines = [f"{'metric':<48} {'start (SFT)':>12} {'PPO':>12}"]
    lines += [f"{k:<48} {before[k]:>12.4f} {after[k]:>12.4f}" for k in keys]
    return "\n".join(lines), {k: {"start": before[k], "ppo": after[k]} for k in keys}


def _start_ray(cfg: PPOConfig) -> tuple[bool, bool]:
    """Join the configured cluster or start a local instance on loopback; returns (started_here, use_gpu)."""
    import ray

    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            check_join(address)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        ray.init(address=address, log_to_driver=True)
        started = False
    else:
        num_cpus = cfg.cluster.num_cpus or max(os.cpu_count() or 1,
                                               sum(cfg.role(r).world_size for r in ROLES) + 1)
        # Ray's servers, and the node address actors report (the roles' rendezvous), stay on loopback
        # because `keep_local_ray_on_loopback` ran before Ray was imported.
        # address="local": a new instance even when another Ray cluster on this machine (an earlier
        # `ray start`) is what a bare ray.init() would join.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=True)
        started = True
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    return started, use_gpu


def run_ppo(dcfg: DictConfig) -> tuple[int, dict]:
    """(exit code, final evaluation)."""
    import ray
    from tqdm import tqdm

    from trainer.metrics import scrub_secrets

    cfg: PPOConfig = to_typed(dcfg, hydra_overrides())
    validate(cfg)
    check_tokenizers(cfg)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = scrub_secrets(OmegaConf.to_container(dcfg, resolve=True))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    torch.manual_seed(cfg.seed)

    started, use_gpu = _start_ray(cfg)
    driver = None
    # Set before any actor starts: a scheduler's SIGTERM/SIGUSR1 then ends the current
    # iteration with a checkpoint instead of killing the run between saves.
    preemption = PreemptionFlag()
    try:
        driver = Driver(cfg, run_dir, resolved)
        print(f"policy={cfg.actor.model.name_or_path or 'tiny random init'} "
              f"reward={cfg.reward.function or cfg.reward.model.name_or_path or 'tiny random init'} "
              f"prompts={len(driver.train_prompts)} eval_prompts={len(driver.eval_prompts)} "
              f"rollout_batch={cfg.rollout_batch} iterations={cfg.train.iterations} run_dir={run_dir}", flush=True)
        driver.start(use_gpu)
        done = driver.resume(cfg.resume)
        t = cfg.train
        before = driver.evaluate(done) if done == 0 else json.loads((run_dir / "eval_start.json").read_text())
        if done == 0:
            (run_dir / "eval_start.json").write_text(json.dumps(before, indent=2))
            driver.logger.log(0, before)
        metrics = {}
        for it in tqdm(range(done, t.iterations), desc="ppo", initial=done, total=t.iterations, dynamic_ncols=True):
            metrics = driver.iteration(it, stopping=lambda: preemption.requested)
            step = it + 1
            if t.eval_every and step % t.eval_every == 0 and step != t.iterations and not preemption.requested:
                metrics.update(driver.evaluate(step))
            driver.logger.log(step, metrics)
            if t.saves_at(step) or preemption.requested:
                driver.save(step)
            tqdm.write(f"iter {step}: score {metrics['reward/score_raw_mean']:.3f} kl {metrics['kl/seq_mean']:.3f} "
                       f"len {metrics['response/length_mean']:.1f} {metrics['time/iteration_s']:.1f}s")
            if preemption.requested and step < t.iterations:
                print(f"preempted: saved iteration {step} in {run_dir / 'checkpoints'}; "
                      f"rerun with resume=auto to continue", flush=True)
                return PREEMPTED_EXIT_CODE, {}
        after = driver.evaluate(t.iterations)
        driver.logger.log(t.iterations, after)
        driver.logger.summary(after)
        table, pairs = _before_after(before, after)
        (run_dir / "before_after.json").write_text(json.dumps(pairs, indent=2))
        (run_dir / "before_after.txt").write_text(table + "\n")
        print(table, flush=True)
        print(f"done: {t.iterations} iterations, outputs in {run_dir}", flush=True)
    finally:
        preemption.restore()
        if driver is not None:
            driver.stop()
        if started:
            ray.shutdown()
    return 0, after


def main() -> None:
    import hydra

    from trainer.cli import exit_with_user_error, launch, prepare_process, user_errors

    @hydra.main(config_path=str(CONF_DIR), config_name="ppo", version_base="1.3")
    def entry(dcfg: DictConfig) -> Optional[float]:
        prepare_process()  # a launcher plugin's sweep member starts here
        try:
            code, final = run_ppo(dcfg)
        except user_errors() + (PlacementError,) as err:
            exit_with_user_error(err)
        except RoleFailure as err:
            print(f"error: {err} (the last complete checkpoint is intact; rerun with resume=auto)", file=sys.stderr)
            raise SystemExit(1)
        if code:
            raise SystemExit(code)
        return objective(final, dcfg.objective)

    launch(entry)


# Sweep members that a launcher plugin runs in another process import this module to unpickle
# `entry`; the config they resolve needs the schema and resolvers.
register_all()

if __name__ == "__main__":
    # Run the importable `rlhf.ppo`, not this `__main__` copy: a launcher plugin (submitit) pickles
    # the task function, and a function of `__main__` cannot be found again in another process.
    import rlhf.ppo

    rlhf.ppo.main()
