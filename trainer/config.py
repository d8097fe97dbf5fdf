"""Typed configuration schemas for every supervised stage.

The dataclasses here are registered in Hydra's ConfigStore as the schema that
`conf/*.yaml` extends, so an unknown key or a value of the wrong type fails at
start with Hydra's own message. Semantic checks (positive sizes, stage range,
consistent batch sizes) live in `validate()` and raise `ConfigError` naming the
key. Entry points convert the Hydra config once (`OmegaConf.to_object`) and pass
these objects down; nothing deeper reads `cfg.foo.bar` from a DictConfig.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from trainer.contracts import NONFINITE_MODES, PREFERENCE_STAGES, SUPERVISED_STAGES


# The Hydra config tree every entry point composes from.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the key."""


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class TinyModelConfig:
    """Architecture of the random-init Llama used when no checkpoint is given."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 344
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    attention_dropout: float = 0.0  # Llama's one dropout; > 0 makes training draw from the RNG
    # Embedding rows (and output-head columns); null: the tokenizer's size. Larger gives the model a realistic
    # vocabulary's cost (bench: a 32k softmax) while the data still uses the tokenizer's tokens only.
    vocab_size: Optional[int] = None


@dataclass
class ModelConfig:
    # Hub name or local directory; null trains the tiny random-init default.
    name_or_path: Optional[str] = None
    # Tokenizer source; null means name_or_path, or the tokenizer this repo ships.
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    # With sdpa: packed rows attend one sequence at a time where that saves enough (trainer/packed_attention.py);
    # false: transformers' sdpa over each whole row with its block-diagonal mask.
    per_sequence_attention: bool = True
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class DatasetSpec:
    """One member of a data mixture."""

    path: str = MISSING
    weight: float = 1.0
    format: str = "auto"
    split: str = "train"
    name: Optional[str] = None  # dataset config name for Hub datasets


DATA_FORMATS = ("auto", "prompt_completion", "alpaca", "sharegpt", "messages", "text")
# Preference pairs (trainer.reward, trainer.dpo): prompt/chosen/rejected strings; a messages prompt with
# assistant-message answers; or two full conversations sharing a prompt (UltraFeedback layout).
PREFERENCE_FORMATS = ("auto", "preference_text", "preference_messages", "preference_conversations")


@dataclass
class DataConfig:
    # A file (json/jsonl/parquet), a directory, a Hub dataset name, or
    # `synthetic:<variant>` for the suite this repo generates.
    path: str = "synthetic:sft"
    format: str = "auto"
    split: str = "train"
    name: Optional[str] = None
    # Weighted mixture; when non-empty it replaces `path`/`format`.
    mixture: list[DatasetSpec] = field(default_factory=list)
    # Held-out data for eval loss and exact match; null disables eval.
    eval_path: Optional[str] = "synthetic:sft"
    eval_split: str = "eval"
    eval_format: str = "auto"
    max_length: int = 256
    overlong: str = "truncate"  # truncate | drop
    packing: bool = True
    # Jinja chat template overriding the tokenizer's own (null: use the tokenizer's).
    chat_template: Optional[str] = None
    system_prompt: Optional[str] = None
    num_proc: int = 1


@dataclass
class OptimConfig:
    # A number, or auto: `lr_for[<the model's peft.method>]` (adapters want another rate than full training), or
    # `lr_for_large[...]` for a large model (`resolve_lr`; the rate it becomes is printed at start).
    lr: Union[float, int, str] = 3e-3
    lr_for: dict[str, float] = field(default_factory=dict)  # peft.method -> what lr=auto becomes
    # The same for a model of `large_model_params` parameters or more: a pre-trained model, which the rates tuned on
    # the ~1M-parameter embedded default would wreck (empty: lr_for at every size).
    lr_for_large: dict[str, float] = field(default_factory=dict)
    large_model_params: int = 50_000_000
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 30
    # The warmup as a fraction of the schedule (decay_steps, else the run's optimizer steps), as Transformers'
    # warmup_ratio: set, it makes warmup_steps ceil(ratio x steps) once the run's length is known (printed at start).
    warmup_ratio: Optional[float] = None
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    # Length of the warmup+cosine schedule; null means the run's optimizer steps (train.max_steps; in RL, every
    # iteration's updates). Set it to extend a finished run (resume with more steps) on the same schedule.
    decay_steps: Optional[int] = None
    max_grad_norm: float = 1.0


@dataclass
class DeepSpeedConfig:
    # 0-3, or auto: ZeRO-3 when there is more than one rank to partition over and the model's training state
    # is larger than auto_partition_above_gb; otherwise stage 0 (2 with optimizer offload, 3 with parameter
    # offload). ZeRO on one rank partitions nothing, and below the threshold partitioning saves memory nobody
    # lacks while its gathers cost a sizeable share of the step (docs/benchmarks.md). `resolve_zero_stage`
    # (below) turns auto into a number once the world size and the model are known.
    stage: Union[int, str] = "auto"
    # The training state is 16 bytes per trained parameter (weights, gradients and Adam's two moments: fp32, or
    # bf16 weights and gradients beside fp32 master weights and moments) and 2-4 per frozen one. 2 GB is a
    # ~125M-parameter model trained in full: a few percent of a GPU's memory, and of this project's CPU machines.
    auto_partition_above_gb: float = 2.0
    offload_optimizer: bool = False
    offload_param: bool = False
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    # Parameters below this many elements stay whole on every rank ("persistent"). DeepSpeed's 100k
    # default saves latency-bound gathers under per-module hooks; with per-block gathering a block's
    # small norms already travel in its one coalesced fetch, while every persistent parameter costs a
    # collective of its own after each optimizer step (one per norm), so 0 is the faster value here
    # (docs/benchmarks.md has the counts and timings); with stage3_gather_per_block=false, 100_000 is
    # likely the better value again (not measured).
    stage3_param_persistence_threshold: int = 0
    # ZeRO-3 gathers each transformer block (the model's `_no_split_modules`) as one unit,
    # the granularity FSDP wraps at, instead of hooking every Linear and norm inside it:
    # fewer, larger all-gathers and less hook overhead. false: DeepSpeed's per-module default.
    stage3_gather_per_block: bool = True
    # ZeRO-3's Linear wrapper (DeepSpeed's default): with it, backward does not keep every layer's gathered
    # weights alive. Building a ZeRO-3 model installs it as torch.nn.functional.linear for the whole
    # process; `trainer.engine.torch_linear` takes torch's own op back where no gradient is taken.
    memory_efficient_linear: bool = True
    # auto picks bf16 where the accelerator supports it, fp32 otherwise.
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    # Raw keys merged last into the generated DeepSpeed JSON (expert escape hatch).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LoggerConfig:
    backend: str = "none"  # wandb | none
    project: str = "tuneforge"
    entity: Optional[str] = None
    group: Optional[str] = None
    run_name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    # auto: as WANDB_MODE says when it is set, else online when WANDB_API_KEY is set and offline (with a note)
    # otherwise; never prompts.
    mode: str = "auto"  # auto | online | offline
    log_every: int = 10
    num_sample_generations: int = 8
    # report.html and plots/ in the run directory when it ends, is preempted or fails (trainer.report).
    report: bool = True


@dataclass
class TrainConfig:
    max_steps: int = 800
    # Passes over the training sequences instead: max_steps becomes ceil(epochs x sequences / global batch), printed.
    epochs: Optional[float] = None
    micro_batch_size: int = 16
    grad_accum: int = 1
    eval_every: int = 400
    # Also evaluate the starting model, before the first step (logged as step 0; not when resuming).
    eval_at_start: bool = False
    eval_max_batches: int = 8  # held-out loss batches per eval
    eval_generate_samples: int = 1000  # prompts scored for exact match (first N of the eval set)
    eval_max_new_tokens: int = 32
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    nonfinite: str = "skip"  # skip | stop
    max_nonfinite_skips: int = 10
    export: bool = True  # write a Hugging Face directory at the end
    # A rank waiting in a collective (all-reduce, barrier, ZeRO's gathers) for a peer that never comes gives up
    # after this many seconds with an error instead of hanging; every process group of the run, DeepSpeed's
    # included. Generous: it must outlast rank 0's longest lone work while the others wait (a checkpoint or
    # export written to slow storage), and a false alarm costs the work since the last checkpoint.
    collective_timeout_s: float = 1800.0


@dataclass
class PreferenceLossConfig:
    # Weight of mean((r_chosen + r_rejected)^2), TRL's `center_rewards_coefficient`:
    # keeps scores centred on 0 so PPO can use them without a learned offset. 0 disables.
    center_coef: float = 0.0
    # With data.packing: lay each pair out once as [shared prompt | chosen tail | rejected tail]
    # under a mask that hides the tails from each other, so the prompt is computed once. Scores
    # are those of each sequence on its own (tested). Needs attention that takes a 4D mask
    # (sdpa, eager), not flash_attention_2.
    share_prompt: bool = True


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "simpo")
DPO_REFERENCES = ("cached", "model")


@dataclass
class DPOConfig:
    """The DPO stage's objective (docs/dpo.md); the losses follow TRL's definitions (trainer.objectives)."""

    # How far the policy may move from the reference: a response's implicit reward is
    # beta * (log pi(y|x) - log pi_ref(y|x)). IPO's regulariser tau; SimPO's reward scale.
    beta: float = 0.1
    # sigmoid (DPO) | ipo (per-token log-ratios, squared) | hinge (SLiC) | simpo (length-averaged
    # log-probs against a target margin, no reference model).
    loss: str = "sigmoid"
    # cDPO: the assumed probability that a pair's preference label is flipped, in [0, 0.5); sigmoid only.
    label_smoothing: float = 0.0
    # SimPO's target reward margin gamma (loss=simpo only).
    simpo_gamma: float = 0.5
    # cached: one pass with the starting model (the reference: the policy starts from the same weights)
    # before training writes every pair's reference log-probs to the run directory, and training holds no
    # reference model. model: a frozen copy of the starting model scores each batch. simpo needs neither.
    reference: str = "cached"


PEFT_METHODS = ("none", "lora")
# peft's shorthand for every Linear layer of the model except its output head (lm_head, a scalar `score`).
ALL_LINEAR = "all-linear"


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning with Hugging Face peft (docs/lora.md): `method: lora` freezes the model and
    trains low-rank adapters on `target_modules`, plus whatever `modules_to_save` names in full."""

    method: str = "none"  # none | lora
    r: int = 8  # adapter rank
    alpha: float = 16.0  # the adapter's update is scaled by alpha / r
    dropout: float = 0.0  # on the adapter's input, in [0, 1)
    # Module names (or name suffixes) to adapt; [all-linear]: every Linear layer of the blocks (not the output head).
    target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])
    # Modules trained in full beside the adapters; null: the scalar head (`score`) of a reward model, nothing for a
    # causal LM.
    modules_to_save: Optional[list[str]] = None
    # Token embeddings trained beside the adapters (peft's trainable_token_indices; with tied embeddings the output
    # head's rows are the same rows). null (auto): the tokenizer's special tokens that occur in the stage's training
    # data, such as a chat template's role markers, which a base model may never have trained and which frozen
    # embeddings would leave as they are; [] for none; or a list of token strings.
    trainable_tokens: Optional[list[str]] = None
    # An adapter directory (adapter_config.json, written by peft's save_pretrained here or elsewhere) to start from
    # instead of a fresh adapter; its own r, alpha, targets and trained tokens then apply.
    init_from: Optional[str] = None


@dataclass
class TrainingJobConfig:
    """Root schema of every supervised stage (sft, instruct, reward, dpo)."""

    stage: str = "sft"
    seed: int = 1234
    # auto: continue from the latest complete checkpoint in output_dir, if any.
    # A directory: continue from that checkpoint directory. null: start fresh.
    resume: Optional[str] = None
    output_dir: str = "."
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # The reward stage's Bradley-Terry loss (center_coef: stage=reward only; share_prompt: reward and dpo).
    preference_loss: PreferenceLossConfig = field(default_factory=PreferenceLossConfig)
    # The DPO stage's objective (stage=dpo only).
    dpo: DPOConfig = field(default_factory=DPOConfig)
    # Adapters (peft=lora) or full training (peft=none).
    peft: PeftConfig = field(default_factory=PeftConfig)
    # The final metric the entry function returns: what a sweeper (hydra/sweeper=optuna) optimises.
    objective: str = "eval/loss"


def validate(cfg: TrainingJobConfig, world_size: int = 1) -> None:
    """Semantic checks Hydra's type checks cannot express; raise ConfigError naming the key."""
    t, o, d, ds = cfg.train, cfg.optim, cfg.data, cfg.deepspeed
    validate_model(cfg.model)
    _require(cfg.stage in SUPERVISED_STAGES, "stage", f"must be one of {'|'.join(SUPERVISED_STAGES)}, got {cfg.stage!r}")
    formats = PREFERENCE_FORMATS if cfg.stage in PREFERENCE_STAGES else DATA_FORMATS
    _require(t.max_steps > 0, "train.max_steps", f"must be > 0, got {t.max_steps}")
    _require(t.epochs is None or t.epochs > 0, "train.epochs", f"must be > 0 (or null), got {t.epochs}")
    _require(t.micro_batch_size > 0, "train.micro_batch_size", f"must be > 0, got {t.micro_batch_size}")
    _require(t.grad_accum > 0, "train.grad_accum", f"must be > 0, got {t.grad_accum}")
    _require(t.eval_every >= 0, "train.eval_every", f"must be >= 0, got {t.eval_every}")
    _require(t.save_every >= 0, "train.save_every", f"must be >= 0, got {t.save_every}")
    _require(t.keep_last >= 1, "train.keep_last", f"must be >= 1, got {t.keep_last}")
    _require(t.collective_timeout_s > 0, "train.collective_timeout_s", f"must be > 0 seconds, got {t.collective_timeout_s}")
    _require(t.nonfinite in NONFINITE_MODES, "train.nonfinite", f"must be skip|stop, got {t.nonfinite!r}")
    validate_optim(o)
    validate_data_source(d)
    _require(d.max_length > 0, "data.max_length", f"must be > 0, got {d.max_length}")
    _require(d.overlong in ("truncate", "drop"), "data.overlong", f"must be truncate|drop, got {d.overlong!r}")
    _require(d.format in formats, "data.format", f"must be one of {'|'.join(formats)}, got {d.format!r}")
    _require(d.eval_format in formats, "data.eval_format", f"must be one of {'|'.join(formats)}, got {d.eval_format!r}")
    for i, m in enumerate(d.mixture):
        _require(m.weight > 0, f"data.mixture[{i}].weight", f"must be > 0, got {m.weight}")
        _require(m.format in formats, f"data.mixture[{i}].format", f"must be one of {'|'.join(formats)}, got {m.format!r}")
    validate_deepspeed(ds)
    _require(cfg.logger.backend in ("wandb", "none"), "logger", f"must be wandb|none, got {cfg.logger.backend!r}")
    _require(cfg.logger.mode in ("auto", "online", "offline"), "logger.mode", f"must be auto|online|offline, got {cfg.logger.mode!r}")
    _require(cfg.logger.log_every > 0, "logger.log_every", f"must be > 0, got {cfg.logger.log_every}")
    _require(world_size >= 1, "world_size", f"must be >= 1, got {world_size}")
    _require(cfg.preference_loss.center_coef >= 0, "preference_loss.center_coef",
             f"must be >= 0, got {cfg.preference_loss.center_coef}")
    if cfg.stage in PREFERENCE_STAGES:
        _require(not d.mixture, "data.mixture", f"is not supported by the {cfg.stage} stage; use data.path")
        share = cfg.preference_loss.share_prompt
        _require(not share or d.packing, "preference_loss.share_prompt",
                 "needs data.packing=true (or set preference_loss.share_prompt=false)")
        _require(not (share and cfg.model.attn_implementation not in ("sdpa", "eager")),
                 "preference_loss.share_prompt", f"needs model.attn_implementation=sdpa|eager (a 4D attention mask), "
                 f"got {cfg.model.attn_implementation!r}; set preference_loss.share_prompt=false")
    if cfg.stage == "dpo":
        validate_dpo(cfg.dpo)
    validate_peft(cfg.peft)


def validate_peft(p: PeftConfig, key: str = "peft") -> None:
    """The values alone; target modules the model lacks are caught once it is built (trainer.adapters)."""
    _require(p.method in PEFT_METHODS, f"{key}.method", f"must be one of {'|'.join(PEFT_METHODS)}, got {p.method!r}")
    if p.method == "none":
        return
    _require(p.r > 0, f"{key}.r", f"must be > 0, got {p.r}")
    _require(p.alpha > 0, f"{key}.alpha", f"must be > 0, got {p.alpha}")
    _require(0.0 <= p.dropout < 1.0, f"{key}.dropout", f"must be in [0, 1), got {p.dropout}")
    _require(bool(p.target_modules) and all(m.strip() for m in p.target_modules), f"{key}.target_modules",
             f"must name at least one module (or [{ALL_LINEAR}]), got {p.target_modules}")
    _require(ALL_LINEAR not in p.target_modules or len(p.target_modules) == 1, f"{key}.target_modules",
             f"{ALL_LINEAR} already means every linear layer; give it alone, got {p.target_modules}")


def validate_dpo(p: DPOConfig, key: str = "dpo") -> None:
    _require(p.beta > 0, f"{key}.beta", f"must be > 0, got {p.beta}")
    _require(p.loss in DPO_LOSSES, f"{key}.loss", f"must be one of {'|'.join(DPO_LOSSES)}, got {p.loss!r}")
    _require(0.0 <= p.label_smoothing < 0.5, f"{key}.label_smoothing", f"must be in [0, 0.5), got {p.label_smoothing}")
    _require(p.label_smoothing == 0.0 or p.loss == "sigmoid", f"{key}.label_smoothing",
             f"is cDPO's and needs {key}.loss=sigmoid, got {key}.loss={p.loss}")
    _require(p.simpo_gamma >= 0, f"{key}.simpo_gamma", f"must be >= 0, got {p.simpo_gamma}")
    _require(p.reference in DPO_REFERENCES, f"{key}.reference",
             f"must be one of {'|'.join(DPO_REFERENCES)}, got {p.reference!r}")


def resolve_lr(o: OptimConfig, peft_method: str, key: str = "optim", parameters: Optional[int] = None) -> OptimConfig:
    """`o` with `lr: auto` turned into `lr_for[peft_method]` (adapters on a frozen model train at a higher rate than
    the whole model does: docs/lora.md measures both), or `lr_for_large[peft_method]` for a model of `parameters`
    at or above `large_model_params`. An explicit lr is kept as it is."""
    if o.lr != "auto":
        return o
    table = _lr_table(o, parameters)
    _require(peft_method in getattr(o, table), f"{key}.lr", f"is auto and {key}.{table} has no rate for "
             f"peft.method={peft_method}; set {key}.lr or {key}.{table}.{peft_method}")
    return replace(o, lr=getattr(o, table)[peft_method])


def lr_note(o: OptimConfig, peft_method: str, key: str = "optim", parameters: Optional[int] = None) -> Optional[str]:
    """The start-up line that says what `lr: auto` became and why (None for an explicit lr)."""
    if o.lr != "auto":
        return None
    lr, table = resolve_lr(o, peft_method, key, parameters).lr, _lr_table(o, parameters)
    size = ""
    if parameters is not None:
        side = "at least" if table == "lr_for_large" else "under"
        size = f"{parameters:,} parameters, {side} {key}.large_model_params={o.large_model_params:,}; "
    return f"{key}.lr: auto -> {lr:g} (peft.method={peft_method}, {size}from {key}.{table})"


def _lr_table(o: OptimConfig, parameters: Optional[int]) -> str:
    large = o.lr_for_large and parameters is not None and parameters >= o.large_model_params
    return "lr_for_large" if large else "lr_for"


def needs_parameter_count(o: OptimConfig) -> bool:
    """Whether what `lr: auto` becomes depends on the model's size (so the run counts its parameters first)."""
    return o.lr == "auto" and bool(o.lr_for_large)


def resolve_zero_stage(ds: DeepSpeedConfig, world_size: int, state_bytes: Optional[int] = None) -> DeepSpeedConfig:
    """`ds` with `stage: auto` turned into a number for a world of `world_size` ranks training a model whose
    unpartitioned training state is `state_bytes` (`training_state_bytes`; None: unknown): ZeRO-3 over several
    ranks when the state is larger than `auto_partition_above_gb` or unknown; otherwise, and always on one rank
    where ZeRO has nothing to partition, the lowest stage that still does what was asked (3 for parameter
    offload, 2 for optimizer offload, else 0). An explicit stage is kept as it is. The result depends only on
    the config, the world size and the model, so a resumed run (same config and world size) gets the stage
    its checkpoint was written with."""
    if ds.stage != "auto":
        return ds
    large = state_bytes is None or state_bytes > ds.auto_partition_above_gb * 1e9
    if (world_size > 1 and large) or ds.offload_param:
        stage = 3
    else:
        stage = 2 if ds.offload_optimizer else 0
    return replace(ds, stage=stage)


def training_state_bytes(parameters: int, trained: bool, precision: str) -> int:
    """Bytes of a model's unpartitioned training state: 16 per parameter trained in full (fp32 weights and
    gradients and Adam's two moments, or bf16 weights and gradients with fp32 master weights and moments); for a
    frozen model, or one training adapters (whose own parameters are a small share), its weights alone."""
    return parameters * (16 if trained else 2 if precision in ("bf16", "fp16") else 4)


def zero_stage_note(ds: DeepSpeedConfig, resolved: DeepSpeedConfig, world_size: int, state_bytes: Optional[int],
                    key: str = "deepspeed") -> Optional[str]:
    """The line that says what `stage: auto` became and why (None for an explicit stage)."""
    if ds.stage != "auto":
        return None
    size = "" if state_bytes is None else f"training state {state_bytes / 1e9:.2f} GB, "
    return (f"{key}.stage: auto -> {resolved.stage} ({size}{world_size} rank{'s' if world_size > 1 else ''}; "
            f"ZeRO-3 when several ranks train a state over {ds.auto_partition_above_gb:g} GB, "
            f"{key}.auto_partition_above_gb)")


def validate_data_source(d: DataConfig) -> None:
    """A data.path given empty (`data.path=` on the command line) would load the working directory as data."""
    _require(bool(d.mixture) or bool((d.path or "").strip()), "data.path",
             "is empty: give a .jsonl/.json/.parquet file, a directory of them, a Hub dataset name or "
             "synthetic:<sft|chat|sharegpt|alpaca|preference>")


def validate_optim(o: OptimConfig, key: str = "optim") -> None:
    _require(o.lr == "auto" or (isinstance(o.lr, (int, float)) and o.lr > 0), f"{key}.lr",
             f"must be > 0 or auto, got {o.lr!r}")
    for table in ("lr_for", "lr_for_large"):
        for method, lr in getattr(o, table).items():
            _require(method in PEFT_METHODS, f"{key}.{table}", f"keys must be among {'|'.join(PEFT_METHODS)}, "
                     f"got {method!r}")
            _require(lr > 0, f"{key}.{table}.{method}", f"must be > 0, got {lr}")
    _require(o.large_model_params > 0, f"{key}.large_model_params", f"must be > 0, got {o.large_model_params}")
    _require(o.warmup_steps >= 0, f"{key}.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    _require(o.warmup_ratio is None or 0.0 <= o.warmup_ratio < 1.0, f"{key}.warmup_ratio",
             f"must be in [0, 1) or null, got {o.warmup_ratio}")
    _require(o.decay_steps is None or o.decay_steps > 0, f"{key}.decay_steps", f"must be > 0 or null, got {o.decay_steps}")
    _require(0.0 <= o.min_lr_ratio <= 1.0, f"{key}.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    _require(o.max_grad_norm >= 0, f"{key}.max_grad_norm", f"must be >= 0 (0 disables), got {o.max_grad_norm}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"{key}.betas",
             f"must be two values in [0, 1), got {o.betas}")


def validate_deepspeed(ds: DeepSpeedConfig, key: str = "deepspeed") -> None:
    _require(ds.stage in (0, 1, 2, 3, "auto"), f"{key}.stage", f"must be 0, 1, 2, 3 or auto, got {ds.stage}")
    _require(ds.auto_partition_above_gb >= 0, f"{key}.auto_partition_above_gb",
             f"must be >= 0 (0: ZeRO-3 on every world of several ranks), got {ds.auto_partition_above_gb}")
    _require(ds.precision in ("auto", "bf16", "fp16", "fp32"), f"{key}.precision",
             f"must be auto|bf16|fp16|fp32, got {ds.precision!r}")
    _require(not ds.offload_param or ds.stage in (3, "auto"), f"{key}.offload_param",
             f"parameter offload needs {key}.stage=3")
    _require(not ds.offload_optimizer or ds.stage in (1, 2, 3, "auto"), f"{key}.offload_optimizer",
             f"optimizer offload needs {key}.stage >= 1")


def validate_model(m: ModelConfig, key: str = "model") -> None:
    _require(m.attn_implementation in ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"),
             f"{key}.attn_implementation", f"must be sdpa|eager|flash_attention_2|flash_attention_3|flex_attention, "
             f"got {m.attn_implementation!r}")
    _require(0.0 <= m.tiny.attention_dropout < 1.0, f"{key}.tiny.attention_dropout",
             f"must be in [0, 1), got {m.tiny.attention_dropout}")


def global_batch_size(cfg: TrainingJobConfig, world_size: int) -> int:
    return cfg.train.micro_batch_size * cfg.train.grad_accum * world_size


def resolve_max_steps(t: TrainConfig, sequences: int, global_batch: int) -> tuple[TrainConfig, str]:
    """`t` with max_steps from `epochs` where that is set, and the line that says what the run's length is in
    both units (the epochs a step count amounts to depend on the data, which only the run knows)."""
    if t.epochs is None:
        return t, (f"train.max_steps={t.max_steps}: {t.max_steps * global_batch / sequences:.2f} epochs of the "
                   f"{sequences} training sequences (global batch {global_batch}; train.epochs=N sets the length in "
                   f"epochs)")
    steps = math.ceil(t.epochs * sequences / global_batch)
    return replace(t, max_steps=steps), (f"train.max_steps: train.epochs={t.epochs:g} -> {steps} ({sequences} "
                                         f"training sequences, global batch {global_batch})")


def resolve_warmup(o: OptimConfig, steps: int, key: str = "optim") -> tuple[OptimConfig, Optional[str]]:
    """`o` with `warmup_ratio` made `warmup_steps` for a schedule of `steps` optimizer steps (`decay_steps`, where
    set, is the schedule), and the line that says what it became (None without a ratio)."""
    if o.warmup_ratio is None:
        return o, None
    schedule = o.decay_steps or steps
    warmup = math.ceil(o.warmup_ratio * schedule)
    return replace(o, warmup_steps=warmup), (f"{key}.warmup_steps: {key}.warmup_ratio={o.warmup_ratio:g} -> {warmup} "
                                             f"(of the schedule's {schedule} optimizer steps)")


def warmup_note(o: OptimConfig, max_steps: int, key: str = "optim") -> Optional[str]:
    """A warning when the warmup outlasts the run (a short run, or one sized by train.epochs on little data): the rate
    would rise the whole run and never reach the lr asked for."""
    if o.warmup_steps < max_steps:
        return None
    return (f"warning: {key}.warmup_steps={o.warmup_steps} is not shorter than the run's {max_steps} steps: the rate "
            f"rises the whole run and never reaches {key}.lr={o.lr:g}; lower {key}.warmup_steps")


def latest_export(runs_dir: str) -> Optional[str]:
    """The `hf_model` directory of the newest finished run under `runs_dir` (run directories
    are named by start time, so the last in name order), or None when there is none.
    `${tf_latest_export:outputs/sft}` in a config chains a stage onto the previous one."""
    # train_state.json is written after the export completes, so a half-written export never counts.
    runs = sorted(p.parent for p in Path(runs_dir).glob("*/train_state.json") if (p.parent / "hf_model").is_dir())
    return str(runs[-1] / "hf_model") if runs else None


def require_export(runs_dir: str) -> str:
    """`latest_export`, or a ConfigError saying which stage to run first (`${tf_require_export:outputs/sft}`)."""
    path = latest_export(runs_dir)
    if path is None:
        stage = Path(runs_dir).name
        raise ConfigError(f"no finished {stage} run with an exported model under {runs_dir}/: run "
                          f"`python -m trainer.{stage}` first, or set this role's model.name_or_path")
    return path


def register_configs() -> None:
    # Only the root is needed: every group file merges into a typed field of it.
    ConfigStore.instance().store(name="training_job_schema", node=TrainingJobConfig)
    if not OmegaConf.has_resolver("tf_latest_export"):
        OmegaConf.register_new_resolver("tf_latest_export", latest_export, use_cache=True)
    if not OmegaConf.has_resolver("tf_require_export"):
        OmegaConf.register_new_resolver("tf_require_export", require_export, use_cache=True)
