"""Assemble and run one supervised stage: config -> data -> model -> engine -> fit -> export.

The entry points (`trainer.sft`, `trainer.instruct`, `trainer.reward`, `trainer.dpo`) are this
plus a config name; what differs between them comes from `trainer.stages`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from trainer.adapters import (add_adapters, check_adapter_source, describe_tokens, parameter_summary,
                              trainable_token_ids)
from trainer.checkpoint import (
    CheckpointError,
    check_frozen_from,
    checkpoint_world_size,
    find_resume_dir,
    load_checkpoint,
)
from trainer.cli import exit_with_user_error, prepare_process, user_errors
from trainer.compose import hydra_overrides, register_all, to_typed
from trainer.config import (CONF_DIR, ConfigError, TrainingJobConfig, global_batch_size, resolve_max_steps,
                            resolve_warmup, validate, warmup_note)
from trainer.engine import (
    all_reduce_sum,
    build_deepspeed_config,
    build_engine,
    init_distributed,
    resolve_precision,
    resolve_stage_for_model,
    torch_dtype,
    zero3_init_context,
)
from trainer.contracts import NONFINITE_EXIT_CODE, scrub_secrets
from trainer.loop import FitContext, TrainState, fit
from trainer.step import NonFiniteError
from trainer.metrics import MetricsLogger
from trainer.model import check_model_source, load_tokenizer, positions_warning, resolve_lr_for_model
from trainer.preemption import preemption_flag
from trainer.report import write_report_quietly
from trainer.resume import hold_run_lock, resume_command
from trainer.sampling import seed_everything
from trainer.stages import build_stage
from trainer.sweep import current_member, join_submitit_ranks, objective, tag_logger

register_all()  # see its docstring: sweep members import this module in another process


def run_stage(dcfg: DictConfig) -> Optional[float]:
    """Hydra task function body: returns the final value of `cfg.objective` (what a sweeper such as
    Optuna optimises); exits non-zero on user errors, NaNs and preemption."""
    try:
        code, metrics = _run(dcfg)
    except user_errors() as err:
        exit_with_user_error(err)
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(NONFINITE_EXIT_CODE)
    except CheckpointError as err:  # every rank raises it; one says it
        if dist.get_rank() == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    if code:
        raise SystemExit(code)
    return objective(metrics, dcfg.objective)


def _run(dcfg: DictConfig) -> tuple[int, dict]:
    cfg: TrainingJobConfig = to_typed(dcfg, hydra_overrides())
    info = init_distributed(cfg.train.collective_timeout_s)
    validate(cfg, info.world_size)
    run_dir = Path(cfg.output_dir)
    seed_everything(cfg.seed)

    check_model_source(cfg.model, "model")
    check_adapter_source(cfg.peft)
    tokenizer = load_tokenizer(cfg.model)
    cfg.optim, note = resolve_lr_for_model(cfg.optim, cfg.peft.method, cfg.model, cfg.stage == "reward",
                                           tokenizer=tokenizer)
    if info.is_main and note:
        print(note, flush=True)
    # Everything below sees a number.
    cfg.deepspeed, note = resolve_stage_for_model(cfg.deepspeed, info.world_size, cfg.model, tokenizer,
                                                  scalar_head=cfg.stage == "reward", trained=cfg.peft.method == "none")
    if info.is_main and note:
        print(note, flush=True)
    parts = build_stage(cfg, tokenizer, info)
    if len(parts.train) < cfg.train.micro_batch_size:
        raise ConfigError(
            f"train.micro_batch_size: {cfg.train.micro_batch_size} is larger than the "
            f"{len(parts.train)} training rows"
        )
    cfg.train, note = resolve_max_steps(cfg.train, len(parts.train), global_batch_size(cfg, info.world_size))
    cfg.optim, warmup = resolve_warmup(cfg.optim, cfg.train.max_steps)
    ds_config = build_deepspeed_config(cfg.deepspeed, cfg.train.micro_batch_size, cfg.train.grad_accum,
                                       info.world_size, cfg.optim.max_grad_norm)
    precision = resolve_precision(cfg.deepspeed.precision)
    resume = find_resume_dir(cfg.resume, run_dir)
    if resume is not None and checkpoint_world_size(*resume) != info.world_size:
        ranks = checkpoint_world_size(*resume)
        raise ConfigError(
            f"resume: checkpoint {resume[0] / resume[1]} was written by {ranks} ranks, this run has "
            f"{info.world_size}; ZeRO checkpoints resume on the same world size: rerun with {ranks} ranks "
            f"(torchrun --nproc_per_node={ranks} -m trainer.{cfg.stage} ... on one node)"
        )
    # A checkpoint of an adapted model holds no frozen weights: they come from the model source again on resume.
    frozen_source = (cfg.model.name_or_path or "random init") if cfg.peft.method != "none" else ""
    if resume is not None:
        check_frozen_from(*resume, frozen_source)

    resolved = scrub_secrets(OmegaConf.to_container(dcfg, resolve=True))
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        hold_run_lock(run_dir)  # resume=auto elsewhere leaves a live run alone
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
        (run_dir / "deepspeed_config.json").write_text(json.dumps(scrub_secrets(ds_config), indent=2))
        (run_dir / "data_stats.json").write_text(json.dumps(parts.stats.as_dict(), indent=2))
        print(parts.stats.summary(), flush=True)
        print(note, flush=True)
        if warmup:
            print(warmup, flush=True)
        if warning := warmup_note(cfg.optim, cfg.train.max_steps):
            print(warning, flush=True)
        if warning := positions_warning(cfg.model, tokenizer, longest_sequence(parts.train)):
            print(warning, flush=True)
        source = cfg.model.name_or_path or "tiny random init (model.tiny)"
        requested_stage = " (auto)" if dcfg.deepspeed.stage == "auto" else ""
        print(f"model={source} precision={precision} zero_stage={cfg.deepspeed.stage}{requested_stage} "
              f"world_size={info.world_size} run_dir={run_dir}", flush=True)

    token_ids = trainable_token_ids(cfg.peft, tokenizer, parts.train)
    with zero3_init_context(ds_config):
        model = add_adapters(parts.build_model(torch_dtype(precision)), cfg.peft, token_ids=token_ids)
    if info.is_main:
        if cfg.peft.method != "none" and cfg.peft.init_from is None:
            print(describe_tokens(token_ids, tokenizer, cfg.peft), flush=True)
        print(parameter_summary(model, precision), flush=True)
    total_steps = cfg.optim.decay_steps or cfg.train.max_steps
    engine = build_engine(model, cfg.deepspeed, cfg.optim, ds_config, total_steps)
    if parts.prepare is not None:
        parts.prepare(engine, ds_config, torch_dtype(precision))  # the engine still holds the starting weights

    state = TrainState(world_size=info.world_size, frozen_from=frozen_source)
    if resume is not None:
        client_state = load_checkpoint(engine, *resume)
        state = TrainState.from_client_state(client_state)
        if info.is_main:
            print(f"resumed from {resume[0] / resume[1]} at step {state.step}", flush=True)

    logger_cfg, logged_config = tag_logger(cfg.logger, resolved, current_member())
    logger = MetricsLogger(run_dir, logger_cfg, logged_config, job_type=cfg.stage, enabled=info.is_main)
    stage_evaluate = parts.make_evaluate(engine, logger) if parts.make_evaluate else None
    final_eval: dict = {}

    def evaluate(step: int) -> dict:
        metrics = stage_evaluate(step)
        final_eval.clear()
        final_eval.update(metrics)
        if info.is_main:
            (run_dir / "eval_metrics.json").write_text(json.dumps({"step": step, **metrics}, indent=2))
        return metrics

    ctx = FitContext(cfg=cfg, dist=info, run_dir=run_dir, logger=logger, collate=parts.collate,
                     evaluate=evaluate if stage_evaluate else None)
    try:
        # A warning that came while the model loaded or the data tokenized: nothing trained yet, so nothing new
        # to save (a resumed run's checkpoint is already there).
        if preemption_voted():
            return _preempted(info, f"before training, at step {state.step}", final_eval)
        state = fit(engine, parts.task, parts.train, ctx, state)
        if state.preempted:
            return _preempted(info, f"checkpoint saved at step {state.step} in {run_dir}", final_eval)
        if cfg.train.export and preemption_voted():  # the last step's checkpoint is saved: export on resume
            return _preempted(info, f"before the export, checkpoint saved at step {state.step}", final_eval)
        if cfg.train.export:
            parts.export(engine, run_dir / "hf_model")
        if info.is_main:
            (run_dir / "train_state.json").write_text(json.dumps(state.to_client_state(), indent=2))
            print(f"done: step {state.step}, outputs in {run_dir}", flush=True)
    finally:
        logger.close()
        if info.is_main and cfg.logger.report:
            write_report_quietly(run_dir)  # finished, preempted or failed: the curves so far
        dist.barrier()
    return 0, final_eval


def longest_sequence(rows: list[dict]) -> int:
    """The most positions one sequence of these training rows takes: a packed row's longest example (positions
    restart at each), a preference pair's longer side."""
    def positions(row: dict) -> int:
        if "position_ids" in row:
            return max(row["position_ids"]) + 1
        return max(len(row.get(k, ())) for k in ("input_ids", "chosen_input_ids", "rejected_input_ids"))
    return max(positions(r) for r in rows)


def preemption_voted() -> bool:
    """Collective: whether any rank has had a preemption warning (one rank receiving it is enough)."""
    return all_reduce_sum([float(preemption_flag().requested)])[0] > 0


def _preempted(info, what: str, final_eval: dict) -> tuple[int, dict]:
    word, status = preemption_flag().outcome
    if info.is_main:
        print(f"{word}: {what}; to continue: {resume_command()}", flush=True)
    return status, final_eval


def stage_main(config_name: str):
    """The Hydra entry function of a supervised stage whose primary config is `conf/<config_name>.yaml`."""
    import hydra

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    def main(cfg: DictConfig) -> Optional[float]:
        # A launcher plugin's sweep member starts here, in a process `launch` never prepared.
        prepare_process()
        join_submitit_ranks()
        return run_stage(cfg)

    return main
