"""Adapters with Hugging Face peft (conf/peft/): wrap a model, count what trains, turn adapters off, export.

`add_adapters` is the one place a model gets adapters: every supervised stage calls it on the model it built
(trainer.run), and an RL role can call it on its own with its own `PeftConfig`. peft does the mechanism
(`get_peft_model`, `PeftModel.from_pretrained`, `disable_adapter`, `merge_and_unload`); this module holds the
wiring: which head is trained in full, the checks that name the config key, ZeRO-3's gathered export.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import torch

from trainer.config import ALL_LINEAR, ConfigError, PeftConfig

ADAPTER_NAME = "default"  # peft's name for the one adapter a model gets here


def is_adapted(model) -> bool:
    """Whether `model` is a peft model (a model can only be one once peft has been imported)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def check_adapter_source(p: PeftConfig, key: str = "peft") -> None:
    """`<key>.init_from` must be an adapter directory; called before anything is written or started."""
    if p.method == "none" or p.init_from is None:
        return
    path = Path(p.init_from).expanduser()
    if not (path / "adapter_config.json").is_file():
        what = "no such directory" if not path.exists() else "not an adapter directory (no adapter_config.json)"
        raise ConfigError(f"{key}.init_from={p.init_from}: {what}")


def _has_scalar_head(model) -> bool:
    # AutoModelForSequenceClassification of a decoder: the head is `score` (trainer.objectives.scores_at).
    return isinstance(getattr(model, "score", None), torch.nn.Module)


def _check_modules(model, names: list[str], key: str) -> None:
    """Each name must be a module's name or its last dotted parts, as peft matches them; else one line naming
    `key` and the linear layers the model has."""
    modules = [n for n, _ in model.named_modules() if n]
    missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in modules)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ConfigError(f"{key}: the model has no module {', '.join(map(repr, missing))}; its linear layers are "
                          f"{', '.join(linear)}")


def _check_one_of_a_tied_pair(model, names: list[str], key: str) -> None:
    """peft copies each module in `modules_to_save`; of an input embedding and an output head that share one weight
    it can copy only one (it fails with a KeyError about `weight` otherwise)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embedding is None or head is None or embedding.weight is not head.weight:
        return
    tied = [t for t in names for n, m in model.named_modules()
            if m in (embedding, head) and (n == t or n.endswith("." + t))]
    if len(set(tied)) > 1:
        raise ConfigError(f"{key}: {' and '.join(dict.fromkeys(tied))} share one weight (tied embeddings); peft can "
                          "train a copy of only one of them")


def trainable_token_ids(p: PeftConfig, tokenizer, rows: list[dict], key: str = "peft") -> list[int]:
    """The tokens whose embedding rows train beside the adapters: `p.trainable_tokens`, or with null the tokenizer's
    special tokens (padding aside) that occur in `rows`' token ids (every `*input_ids` column). Frozen embeddings keep
    whatever a token's row held: for a chat template's markers that a base model never saw, its random init."""
    if p.method == "none" or p.init_from is not None:  # an adapter to continue from brings its own
        return []
    if p.trainable_tokens is None:
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} - {tokenizer.pad_token_id}
        seen: set[int] = set()
        for row in rows:
            for column, ids in row.items():
                if column.endswith("input_ids"):
                    seen.update(ids)
        return sorted(special & seen)
    vocab = tokenizer.get_vocab()
    missing = [t for t in p.trainable_tokens if t not in vocab]
    if missing:
        raise ConfigError(f"{key}.trainable_tokens: the tokenizer has no token {', '.join(map(repr, missing))}")
    return sorted({vocab[t] for t in p.trainable_tokens})


def describe_tokens(ids: list[int], tokenizer, p: PeftConfig, key: str = "peft") -> str:
    """The run's line on what `trainable_token_ids` chose: a derived value is printed as what it became."""
    chosen = ", ".join(tokenizer.convert_ids_to_tokens(ids)) if ids else "none"
    how = " (auto: the special tokens in the training data)" if p.trainable_tokens is None else ""
    return f"{key}.trainable_tokens: {chosen}{how}"


def add_adapters(model, p: PeftConfig, key: str = "peft", token_ids: list[int] = ()):
    """`model` with LoRA adapters on `p.target_modules` and every other weight frozen (peft's `get_peft_model`), or
    the adapter in `p.init_from` (`PeftModel.from_pretrained`, trainable); `model` itself for `method: none`.
    The embedding rows of `token_ids` (`trainable_token_ids`) train too, as peft's trainable tokens.

    Call it before the DeepSpeed engine is built, whose optimizer then holds only what has requires_grad. Under
    ZeRO-3 the base is already partitioned; the adapters are created whole and DeepSpeed partitions them when it
    initialises the engine, broadcasting rank 0's values so that every rank starts from the same adapter."""
    if p.method == "none":
        return model
    from peft import LoraConfig, PeftModel, TaskType, get_peft_model

    # With the embeddings frozen, the first block's input needs no gradient, and ZeRO-3 gathering a block as one unit
    # (deepspeed.stage3_gather_per_block) then releases that block's weights too early: backward meets a size-0
    # adapter weight (seen with DeepSpeed 0.19; its post-backward hook waits on the block input's gradient).
    # transformers' fix for the same case under gradient checkpointing: the embeddings' output asks for a gradient.
    model.enable_input_require_grads()
    if p.init_from is not None:
        return PeftModel.from_pretrained(model, str(Path(p.init_from).expanduser()), adapter_name=ADAPTER_NAME,
                                         is_trainable=True)
    scalar_head = _has_scalar_head(model)
    if p.target_modules != [ALL_LINEAR]:
        _check_modules(model, p.target_modules, f"{key}.target_modules")
    # A reward model's (or critic's) head is new and one row wide: it trains in full.
    modules_to_save = p.modules_to_save if p.modules_to_save is not None else (["score"] if scalar_head else None)
    if modules_to_save:
        _check_modules(model, modules_to_save, f"{key}.modules_to_save")
        _check_one_of_a_tied_pair(model, modules_to_save, f"{key}.modules_to_save")
    lora = LoraConfig(
        r=p.r,
        lora_alpha=p.alpha,
        lora_dropout=p.dropout,
        target_modules=ALL_LINEAR if p.target_modules == [ALL_LINEAR] else list(p.target_modules),
        modules_to_save=modules_to_save,
        trainable_token_indices=list(token_ids) or None,
        task_type=TaskType.SEQ_CLS if scalar_head else TaskType.CAUSAL_LM,
    )
    with _trainable_tokens_off_cuda():
        return get_peft_model(model, lora, adapter_name=ADAPTER_NAME)


@contextlib.contextmanager
def _trainable_tokens_off_cuda():
    """peft (0.21) gathers the trained tokens' starting rows under ZeRO-3 into a tensor it puts on `cuda` on every
    rank but the first ("only CUDA is implemented"), so without a GPU `get_peft_model` fails there. Inside, its own
    steps run with the tensor on DeepSpeed's accelerator device instead; with a GPU nothing changes."""
    if torch.cuda.is_available():
        yield
        return
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    from peft.utils.integrations import gather_params_ctx

    def collect(self, weight, rows, embed_dim):  # peft's _collect_token_weights, device aside
        with gather_params_ctx([weight], modifier_rank=None):
            if dist.get_rank() == 0:
                values = weight[rows].clone()
            else:
                values = torch.empty((len(rows), embed_dim), dtype=weight.dtype,
                                     device=get_accelerator().current_device_name())
        dist.broadcast(values, src=0)
        return values

    original = TrainableTokensLayer._collect_token_weights
    TrainableTokensLayer._collect_token_weights = collect
    try:
        yield
    finally:
        TrainableTokensLayer._collect_token_weights = original


def describe_adapters(model) -> str:
    """What the adapters are, for the run's log: targets resolved (all-linear named), rank, scale, full modules."""
    if not is_adapted(model):
        return "peft=none"
    c = model.peft_config[ADAPTER_NAME]
    # all-linear is resolved to every layer's full name by now: name each kind once
    targets = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in c.target_modules}))
    # peft lists more names than the model has (a classifier's usual ones): name the modules it wrapped
    full = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "ModulesToSaveWrapper"})
    full = f", trained in full: {', '.join(full)}" if full else ""
    return f"peft=lora r={c.r} alpha={c.lora_alpha} on {targets}{full}"


def parameter_summary(model: torch.nn.Module, precision: str) -> str:
    """The run's one line on what trains: trained and total parameters, the optimizer state that follows (AdamW's two
    fp32 moments per trained parameter, and in bf16/fp16 an fp32 master copy), the adapters."""
    trainable, total = parameter_counts(model)
    state_mib = trainable * (8 if precision == "fp32" else 12) / 2**20
    return (f"parameters: {trainable:,} trained of {total:,} ({100 * trainable / total:.2f}%), optimizer state "
            f"{state_mib:.1f} MiB; {describe_adapters(model)}")


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, whole even where ZeRO-3 has partitioned them; a tied weight counts once."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None) or p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


@contextlib.contextmanager
def adapters_disabled(model):
    """Inside, `model` (a peft model) computes with its adapters off: the base model it was built on. Nothing to do
    for a model without adapters."""
    if not is_adapted(model):
        yield
        return
    with model.disable_adapter():
        yield


class AdaptersOff:
    """The base model under an adapted engine, called like a model: DPO's (and later RL's) reference for free,
    with no second copy of the weights. Callers run it without gradients."""

    def __init__(self, engine):
        self.engine = engine

    @property
    def module(self):  # the adapted model, as under an engine (trainer.objectives.head_inputs_at finds its head)
        return self.engine.module

    def __call__(self, **inputs):
        module = self.engine.module
        was_training = module.training
        module.eval()  # as a frozen copy would be: no dropout
        try:
            with adapters_disabled(module):
                return self.engine(**inputs)
        finally:
            module.train(was_training)


def copy_merged(model, plain: torch.nn.Module, changed_only: bool = False) -> None:
    """Write `model`'s weights (a peft model, unpartitioned or under ZeRO-3) with its adapters merged into `plain`, a
    model of the base's architecture without adapters (an RL policy's generation replica): each adapted layer gets
    W + (alpha / r) B A (peft's `get_delta_weight`), a module trained in full its trained copy, and with
    `changed_only` nothing else (the frozen weights `plain` already holds never change). The training model is left
    as it is; under ZeRO-3 each module is gathered while it is read, on every rank together."""
    import deepspeed
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    dest = dict(plain.named_parameters())
    base = model.get_base_model()
    done: set[int] = set()  # ids of the trained model's parameters already written

    def gathered(module):
        params = list(module.parameters())
        done.update(id(p) for p in params)
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    with torch.no_grad():
        for name, m in base.named_modules():
            if isinstance(m, LoraLayer):
                with gathered(m):
                    layer = m.get_base_layer()
                    dest[f"{name}.weight"].copy_(layer.weight + m.get_delta_weight(ADAPTER_NAME))
                    if layer.bias is not None:
                        dest[f"{name}.bias"].copy_(layer.bias)
            elif isinstance(m, ModulesToSaveWrapper):
                with gathered(m):
                    for n, p in m.modules_to_save[ADAPTER_NAME].named_parameters():
                        dest[f"{name}.{n}"].copy_(p)
        if changed_only:
            return
        rest = [(n, p) for n, p in base.named_parameters() if id(p) not in done]
        with deepspeed.zero.GatheredParameters([p for _, p in rest], modifier_rank=None):
            for n, p in rest:
                dest[n].copy_(p)


def save_adapter_and_merge(model, state_dict: dict, adapter_dir: Path, tokenizer):
    """Rank 0 of an adapted model's export: write the adapter (what `PeftModel.from_pretrained(base, adapter_dir)`
    loads) and return the merged plain model (`merge_and_unload`) to save as the Hugging Face export.

    `state_dict` holds the whole model's weights on the CPU (consolidated from ZeRO-3 partitions, or the unpartitioned
    module's): they go into a CPU copy of the same architecture with the same adapter, which peft then saves and
    merges, so the training model is left as it is."""
    from peft import get_peft_model

    base = model.get_base_model()
    dtype = next(iter(state_dict.values())).dtype
    cpu_base = type(base)._from_config(copy.deepcopy(base.config), dtype=dtype)
    cpu_base.tie_weights()  # before peft wraps the embeddings (trainable tokens): loading below copies in place
    cpu = get_peft_model(cpu_base, copy.deepcopy(model.peft_config[ADAPTER_NAME]), adapter_name=ADAPTER_NAME)
    missing, unexpected = cpu.load_state_dict(state_dict, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if base.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"adapter export: state dict does not fit the model (missing {sorted(set(missing) - tied)}, "
                           f"unexpected {sorted(unexpected)})")
    # The embeddings are frozen and the base's own: the adapter directory holds only what was trained.
    cpu.save_pretrained(str(adapter_dir), safe_serialization=True, save_embedding_layers=False)
    tokenizer.save_pretrained(str(adapter_dir))
    if not cpu.peft_config[ADAPTER_NAME].base_model_name_or_path:
        print(f"note: {adapter_dir} adapts a random-init base that is saved nowhere else; hf_model/ (merged) holds "
              f"the trained model", flush=True)
    return cpu.merge_and_unload()
