"""What differs between the supervised stages: data, model, loss, evaluation and export.

`run.py` assembles everything the stages share (distributed setup, DeepSpeed engine,
resume, logging, `fit`); it asks `build_stage` for the parts below. SFT and
instruction tuning are one causal-LM stage with different configs; the reward
stage trains a scalar-head model on preference pairs; DPO trains the causal LM
itself on preference pairs, against a reference (docs/dpo.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from trainer.adapters import AdaptersOff, adapters_disabled
from trainer.config import TrainingJobConfig
from trainer.contracts import REFERENCE_LOGPS_FILE
from trainer.data import build_supervised_data, collate
from trainer.engine import DistInfo, build_engine, device, zero3_init_context
from trainer.evaluate import chatter_metrics, eval_loss, exact_match, pairwise_metrics
from trainer.export import export_hf
from trainer.metrics import MetricsLogger
from trainer.model import build_causal_lm, build_reward_model
from trainer.objectives import CausalLMTask, DPOTask, RewardTask, Task, needs_reference
from trainer.preference import build_preference_data, collate_pairs, pair_prompts
from trainer.reference_logps import attach_reference_logps
from trainer.reward_stats import reward_stats
from trainer.sampling import derive_seed


@dataclass
class StageParts:
    train: list[dict]  # rows `collate` turns into a batch
    stats: Any  # DataStats | PreferenceStats: summary(), as_dict()
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    task: Task
    build_model: Callable[[torch.dtype], torch.nn.Module]  # called inside the ZeRO-3 init context
    # (engine, logger) -> evaluate(step) -> metrics; None when the stage has nothing to evaluate on.
    make_evaluate: Optional[Callable[[Any, MetricsLogger], Callable[[int], dict]]]
    export: Callable[[Any, Path], None]  # (engine, out_dir); collective
    # (engine, ds_config, dtype), collective: runs once the engine holds the starting weights, before a
    # checkpoint is loaded into it (DPO's reference pass or frozen reference copy); None when nothing to do.
    prepare: Optional[Callable[[Any, dict, torch.dtype], None]] = None


def build_stage(cfg: TrainingJobConfig, tokenizer, info: DistInfo) -> StageParts:
    if cfg.stage == "reward":
        return _reward_stage(cfg, tokenizer, info)
    if cfg.stage == "dpo":
        return _dpo_stage(cfg, tokenizer, info)
    return _causal_lm_stage(cfg, tokenizer, info)


def _causal_lm_stage(cfg: TrainingJobConfig, tokenizer, info: DistInfo) -> StageParts:
    data = build_supervised_data(cfg.data, tokenizer, seed=cfg.seed)
    task = CausalLMTask()
    zero3 = cfg.deepspeed.stage == 3

    def pad_collate(rows):
        return collate(rows, tokenizer.pad_token_id)

    def make_evaluate(engine, logger: MetricsLogger):
        def evaluate(step: int) -> dict:
            t = cfg.train
            metrics = {}
            if data.eval:
                metrics.update(eval_loss(engine, task, data.eval, pad_collate, t.micro_batch_size, t.eval_max_batches, info))
            if data.eval_prompts and t.eval_generate_samples > 0:
                prompts = data.eval_prompts[: t.eval_generate_samples]
                em, samples = exact_match(engine, tokenizer, prompts, 64, t.eval_max_new_tokens, info, zero3=zero3)
                metrics.update(em)
                logger.log_table(
                    step, "eval/samples", ["prompt", "answer", "generated", "match"],
                    [list(s) for s in samples[: cfg.logger.num_sample_generations]],
                )
            return metrics

        return evaluate

    return StageParts(
        train=data.train,
        stats=data.stats,
        collate=pad_collate,
        task=task,
        build_model=lambda dtype: build_causal_lm(cfg.model, tokenizer, dtype),
        make_evaluate=make_evaluate if (data.eval or data.eval_prompts) else None,
        export=lambda engine, out_dir: export_hf(engine, tokenizer, out_dir, zero3=zero3),
    )


def _reward_stage(cfg: TrainingJobConfig, tokenizer, info: DistInfo) -> StageParts:
    data = build_preference_data(cfg.data, tokenizer, seed=cfg.seed)
    task = RewardTask(cfg.preference_loss.center_coef)

    pack_length = cfg.data.max_length if cfg.data.packing else None

    def pair_collate(rows):
        return collate_pairs(rows, tokenizer.pad_token_id, pack_length=pack_length,
                             share_prompt=cfg.preference_loss.share_prompt)

    def make_evaluate(engine, logger: MetricsLogger):
        def evaluate(step: int) -> dict:
            return pairwise_metrics(engine, data.eval, pair_collate, cfg.train.micro_batch_size, info)

        return evaluate

    def export(engine, out_dir: Path) -> None:
        # PPO normalises rewards with the final model's score statistics: on held-out
        # pairs when there are some, else on (at most 1024) training pairs.
        rows = data.eval or data.train[:1024]
        metrics = pairwise_metrics(engine, rows, pair_collate, cfg.train.micro_batch_size, info)
        export_hf(engine, tokenizer, out_dir, zero3=cfg.deepspeed.stage == 3,
                  extra_files=reward_stats(metrics, len(rows), "eval" if data.eval else "train"))

    return StageParts(
        train=data.train,
        stats=data.stats,
        collate=pair_collate,
        task=task,
        build_model=lambda dtype: build_reward_model(cfg.model, tokenizer, dtype),
        make_evaluate=make_evaluate if data.eval else None,
        export=export,
    )


def _dpo_stage(cfg: TrainingJobConfig, tokenizer, info: DistInfo) -> StageParts:
    data = build_preference_data(cfg.data, tokenizer, seed=cfg.seed)
    task = DPOTask(cfg.dpo)
    zero3 = cfg.deepspeed.stage == 3
    pack_length = cfg.data.max_length if cfg.data.packing else None
    prompts = pair_prompts(data.eval, tokenizer)

    def pair_collate(rows):
        batch = collate_pairs(rows, tokenizer.pad_token_id, pack_length=pack_length,
                              share_prompt=cfg.preference_loss.share_prompt, response_logps=True)
        if "ref_chosen_logp" in rows[0]:  # dpo.reference=cached: attached by `prepare`
            for side in ("chosen", "rejected"):
                batch[f"ref_{side}_logps"] = torch.tensor([r[f"ref_{side}_logp"] for r in rows], dtype=torch.float32)
        return batch

    def build_model(dtype):
        # Seeded apart from whatever ran before, so that the frozen reference (dpo.reference=model), built the
        # same way, starts from the policy's weights even when they are a random init.
        with torch.random.fork_rng(devices=[device()] if device().type == "cuda" else []):
            torch.manual_seed(derive_seed(cfg.seed, "dpo_starting_model"))
            return build_causal_lm(cfg.model, tokenizer, dtype)

    def prepare(engine, ds_config: dict, dtype) -> None:
        if not needs_reference(cfg.dpo):
            return
        # With adapters the reference is the policy's own base, adapters off (peft's disable_adapter): no copy.
        if cfg.dpo.reference == "cached":
            source = cfg.model.name_or_path or (f"random init: model.tiny {asdict(cfg.model.tiny)}, seed {cfg.seed}, "
                                                f"zero stage {cfg.deepspeed.stage}")
            with adapters_disabled(engine.module):
                attach_reference_logps(Path(cfg.output_dir) / REFERENCE_LOGPS_FILE, engine,
                                       {"train": data.train, "eval": data.eval}, pair_collate,
                                       cfg.train.micro_batch_size, info, source)
            return
        if cfg.peft.method != "none":
            task.reference = AdaptersOff(engine)
            return
        with zero3_init_context(ds_config):
            reference = build_model(dtype)
        reference.requires_grad_(False).eval()
        # Under ZeRO-3 an inference engine of its own gathers its partitions (as PPO's frozen roles).
        task.reference = build_engine(reference, cfg.deepspeed, None, ds_config) if zero3 else reference.to(device())

    def make_evaluate(engine, logger: MetricsLogger):
        def evaluate(step: int) -> dict:
            t = cfg.train
            metrics = {}
            if data.eval:
                metrics.update(pairwise_metrics(engine, data.eval, pair_collate, t.micro_batch_size, info,
                                                pair_eval=task.pair_eval))
            if prompts and t.eval_generate_samples > 0:
                some = prompts[: t.eval_generate_samples]
                greedy, greedy_rows = exact_match(engine, tokenizer, some, 64, t.eval_max_new_tokens, info, zero3)
                # Sampled as the policy would answer (temperature 1), with the same seed at every eval.
                sampled, sampled_rows = exact_match(engine, tokenizer, some, 64, t.eval_max_new_tokens, info, zero3,
                                                    sample_seed=derive_seed(cfg.seed, "dpo_eval_sampling"))
                if (cfg.data.eval_path or "").startswith("synthetic:"):
                    sampled.update(chatter_metrics(some, [row[2] for row in sampled_rows]))
                metrics.update(greedy)
                metrics.update({k.replace("eval/", "eval/sampled/", 1): v for k, v in sampled.items()})
                logger.log_table(
                    step, "eval/samples", ["prompt", "answer", "greedy", "sampled"],
                    [[p, a, g, s[2]] for (p, a, g, _), s in
                     zip(greedy_rows[: cfg.logger.num_sample_generations], sampled_rows)],
                )
            return metrics

        return evaluate

    return StageParts(
        train=data.train,
        stats=data.stats,
        collate=pair_collate,
        task=task,
        build_model=build_model,
        make_evaluate=make_evaluate if (data.eval or prompts) else None,
        export=lambda engine, out_dir: export_hf(engine, tokenizer, out_dir, zero3=zero3),
        prepare=prepare,
    )
