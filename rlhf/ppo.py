"""`python -m rlhf.ppo [overrides]`: PPO with policy, reference, reward and critic as separate Ray
actor groups, orchestrated by one driver (`rlhf/driver.py`; the pure rollout scoring is `rlhf/scoring.py`).

This is the Hydra entry: validate the config, check the tokenizers, join or start Ray, then run the
iterations with evaluation, checkpoints and preemption. The run directory gets config.yaml,
eval_start.json and before_after.json/.txt besides what the driver writes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from trainer.local_ray import check_join, keep_local_ray_on_loopback

if __name__ == "__main__":  # before anything below imports Ray
    keep_local_ray_on_loopback(sys.argv[1:])

from rlhf.config import PPOConfig, validate
from rlhf.checkpoint import check_layout, check_stages, failure_note, find_resume_point, pin_inputs, resolved_inputs
from rlhf.driver import Driver, check_tokenizers, load_reward_stats
from rlhf.group import PreemptedInCall, RoleFailure
from rlhf.placement import PlacementError
from rlhf.reward_functions import check_functions
from rlhf.scoring import before_after
from trainer.adapters import check_adapter_source
from trainer.checkpoint import CheckpointError, check_frozen_from
from trainer.compose import hydra_overrides, register_all, to_typed
from trainer.config import CONF_DIR, ConfigError
from trainer.contracts import ROLES, scrub_secrets
from trainer.preemption import preemption_flag
from trainer.report import write_report_quietly
from trainer.resume import hold_run_lock, resume_command
from trainer.model import check_model_source
from trainer.sweep import objective


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
        # Ray starts one idle worker per CPU for a new instance's first driver; every role's actors carry a
        # runtime_env (Driver.start), which such a worker cannot take, so they would only cost start-up time.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=True, _system_config={"prestart_worker_first_driver": False})
        started = True
    use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    return started, use_gpu


def run_ppo(dcfg: DictConfig) -> tuple[int, dict]:
    """(exit code, final evaluation)."""
    import ray
    from tqdm import tqdm

    from trainer.progress import progress

    cfg: PPOConfig = to_typed(dcfg, hydra_overrides())
    validate(cfg)
    run_dir = Path(cfg.output_dir)
    # Before any model is checked or loaded: what the run resumes from, and the inputs its first start pinned.
    point = find_resume_point(cfg.resume, run_dir, cfg.trained_roles)
    pinned = point is not None and point.inputs is not None
    for note in pin_inputs(cfg, dcfg, point.inputs) if pinned else ():
        print(f"note: {note}", flush=True)
    if point is not None:
        # With adapters a role's checkpoint left the frozen weights out: the same model source must give them again.
        # Checked before the layout, which a LoRA policy changes too (it starts no reference group).
        for role in cfg.trained_roles:
            check_frozen_from(point.root / role, point.tag, cfg.role(role).frozen_source)
        check_layout(point, cfg)
    for role in cfg.active_roles:
        if not (role == "reward" and cfg.reward.functions):  # reward functions load no model
            check_model_source(cfg.role(role).model, f"{role}.model")
    if "reward" in cfg.active_roles and cfg.reward.functions:
        check_functions(cfg.reward.functions)
    resolve_rates(cfg)
    if point is not None:
        check_stages(point, cfg)
    for role in cfg.trained_roles:
        check_adapter_source(cfg.role(role).peft, f"{role}.peft")
    check_tokenizers(cfg)
    inputs = point.inputs if pinned else resolved_inputs(cfg, load_reward_stats(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    hold_run_lock(run_dir)  # resume=auto elsewhere leaves a live run alone
    resolved = scrub_secrets(OmegaConf.to_container(dcfg, resolve=True))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    torch.manual_seed(cfg.seed)

    started, use_gpu = _start_ray(cfg)
    driver = None
    # Set before any actor starts: a scheduler's SIGTERM/SIGUSR1 then ends the current
    # iteration with a checkpoint instead of killing the run between saves.
    preemption = preemption_flag()
    preemption.install()  # ray.init above replaced the SIGTERM handler with one that exits the driver
    saved = point.state["iteration"] if point is not None else 0  # the last committed iteration
    try:
        driver = Driver.start(cfg, run_dir, resolved, use_gpu, inputs, preemption)
        done = driver.resume(point)
        t = cfg.train
        if done == 0:
            before = driver.evaluate(0)
            driver.logger.log(0, before)
        else:  # the evaluation before training, from the run resumed (this one, or another with resume=<dir>)
            before = json.loads((point.run_dir / "eval_start.json").read_text())
        (run_dir / "eval_start.json").write_text(json.dumps(before, indent=2))
        if preemption.requested:  # while the models loaded or the first evaluation ran: nothing new to save
            return _stopped(preemption, f"before iteration {done + 1}")
        metrics = {}
        for it in progress(range(done, t.iterations), desc=cfg.algo.name, initial=done, total=t.iterations,
                           unit="iteration"):
            metrics = driver.iteration(it, stopping=lambda: preemption.requested)
            step = it + 1
            if t.eval_every and step % t.eval_every == 0 and step != t.iterations and not preemption.requested:
                metrics.update(driver.evaluate(step))
            driver.logger.log(step, metrics)
            if t.saves_at(step) or preemption.requested:
                driver.save(step)
                saved = step
            tqdm.write(f"iter {step}: score {metrics['reward/score_raw_mean']:.3f} kl {metrics['kl/seq_mean']:.3f} "
                       f"len {metrics['response/length_mean']:.1f} {metrics['time/iteration_s']:.1f}s")
            if preemption.requested and step < t.iterations:
                return _stopped(preemption, f"saved iteration {step} in {run_dir / 'checkpoints'}")
        after = driver.evaluate(t.iterations)
        driver.logger.log(t.iterations, after)
        driver.logger.summary(after)
        table, pairs = before_after(before, after, cfg.algo.name)
        (run_dir / "before_after.json").write_text(json.dumps(pairs, indent=2))
        (run_dir / "before_after.txt").write_text(table + "\n")
        print(table, flush=True)
        print(f"done: {t.iterations} iterations, outputs in {run_dir}", flush=True)
    except PreemptedInCall as err:
        # A role hung (or too slow for the grace period) when the signal came: it cannot save, so the run ends
        # now, requeued like any preemption, from the last committed iteration.
        kept = (f"the last saved iteration, {saved}, is where it continues" if saved
                else "no iteration was saved yet, so the run starts over")
        return _stopped(preemption, f"{err}; the iteration in flight is not saved, {kept}")
    finally:
        if driver is not None:
            driver.stop()
            if cfg.logger.report:
                write_report_quietly(run_dir)  # finished, preempted or failed: the curves so far
        if started:
            ray.shutdown()
    return 0, after


def resolve_rates(cfg: PPOConfig) -> None:
    """What each trained role's `optim.lr: auto` becomes (by its peft method, and its size where the rate depends
    on it) and its `optim.warmup_ratio` (in optimizer steps), printed and set in `cfg`, so its workers train at the
    numbers said here (or exit 2 here)."""
    from dataclasses import replace

    from trainer.config import resolve_warmup
    from trainer.model import resolve_lr_for_model

    for role in cfg.trained_roles:
        rc = cfg.role(role)
        optim, note = resolve_lr_for_model(rc.optim, rc.peft.method, rc.model, role == "critic", f"{role}.optim")
        optim, warmup = resolve_warmup(optim, cfg.optimizer_steps, f"{role}.optim")
        for line in (note, warmup):
            if line:
                print(line, flush=True)
        setattr(cfg, role, replace(rc, optim=optim))


def _stopped(preemption, what: str) -> tuple[int, dict]:
    word, status = preemption.outcome
    print(f"{word}: {what}; to continue: {resume_command()}", flush=True)
    return status, {}


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
        except (RoleFailure, CheckpointError) as err:
            print(f"error: {err} ({failure_note(Path(dcfg.output_dir))}: {resume_command()})", file=sys.stderr)
            raise SystemExit(1)
        if code:
            raise SystemExit(code)
        return objective(final, dcfg.objective)

    launch(entry, "ppo")


# Sweep members that a launcher plugin runs in another process import this module to unpickle
# `entry`; the config they resolve needs the schema and resolvers.
register_all()

if __name__ == "__main__":
    # Run the importable `rlhf.ppo`, not this `__main__` copy: a launcher plugin (submitit) pickles
    # the task function, and a function of `__main__` cannot be found again in another process.
    import rlhf.ppo

    rlhf.ppo.main()
