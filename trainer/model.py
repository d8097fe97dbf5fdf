"""Load or build the model and tokenizer every stage trains.

A Hub name or local directory goes through `AutoModelForCausalLM.from_pretrained`
(`AutoModelForSequenceClassification` with one label for reward models); with no
name the tiny random-init Llama of `ModelConfig.tiny` is built around the
tokenizer this repo ships, so the default run needs no network.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, PreTrainedTokenizerBase

from trainer import packed_attention
from trainer.config import ConfigError, ModelConfig, OptimConfig, lr_note, needs_parameter_count, resolve_lr

SHIPPED_TOKENIZER = Path(__file__).parent / "assets" / "tokenizer"


def check_model_source(cfg: ModelConfig, key: str) -> None:
    """Fail with one line naming `<key>.name_or_path` / `<key>.tokenizer` when a source cannot load: a local
    path that does not exist or is not a model (tokenizer) directory, or a Hub name that cannot be fetched
    (with HF_HUB_OFFLINE=1: one not in the local cache). Called before anything is written or started;
    transformers would otherwise fail later with a traceback about repo ids."""
    # Without model.tokenizer the tokenizer comes from name_or_path, so that directory must hold one too.
    tokenizer_key = "tokenizer" if cfg.tokenizer else "name_or_path"
    for field, source, marker in (("name_or_path", cfg.name_or_path, "config.json"),
                                  (tokenizer_key, cfg.tokenizer or cfg.name_or_path, "tokenizer_config.json")):
        if source is None:
            continue
        where = f"{key}.{field}={source}"
        local = Path(source).expanduser()
        if local.exists() or source.startswith((".", "/", "~")) or source.count("/") > 1:
            _check_local_source(local, marker, where)
        elif field == "name_or_path" and marker == "tokenizer_config.json":
            continue  # the same Hub name, checked through its config
        else:
            _check_hub_source(source, cfg, marker, where)


def _check_hub_source(source: str, cfg: ModelConfig, marker: str, where: str) -> None:
    what = "model" if marker == "config.json" else "tokenizer"
    try:  # a config is small and shows whether the name resolves
        load = AutoConfig if what == "model" else AutoTokenizer
        load.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        from huggingface_hub.constants import HF_HUB_OFFLINE

        why = ("it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it"
               if HF_HUB_OFFLINE else str(e).strip().splitlines()[0])
        raise ConfigError(f"{where}: no such local directory, and as a Hub {what} name: {why}") from None


def _check_local_source(path: Path, marker: str, where: str) -> None:
    if not path.exists():
        raise ConfigError(f"{where}: no such directory")
    if not path.is_dir():
        raise ConfigError(f"{where}: is a file; expected a directory holding {marker}")
    if not (path / marker).is_file() and not (marker == "tokenizer_config.json" and (path / "tokenizer.json").is_file()):
        # A stage's run directory holds its export in hf_model/: the likeliest slip.
        hint = f"; did you mean {path / 'hf_model'}?" if (path / "hf_model" / marker).is_file() else ""
        raise ConfigError(f"{where}: not a {'model' if marker == 'config.json' else 'tokenizer'} directory "
                          f"(no {marker}){hint}")


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    source = cfg.tokenizer or cfg.name_or_path or str(SHIPPED_TOKENIZER)
    tok = AutoTokenizer.from_pretrained(source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token_id is None:
        # Padding is always loss-masked, so any existing token is a safe pad.
        tok.pad_token = tok.eos_token
    return tok


def tiny_llama_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    t = cfg.tiny
    if t.vocab_size is not None and t.vocab_size < len(tokenizer):
        raise ConfigError(f"model.tiny.vocab_size: {t.vocab_size} is smaller than the tokenizer's {len(tokenizer)} "
                          "tokens; leave it null for the tokenizer's size")
    return LlamaConfig(
        vocab_size=t.vocab_size or len(tokenizer),
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings,
        rope_theta=t.rope_theta,
        tie_word_embeddings=t.tie_word_embeddings,
        attention_dropout=t.attention_dropout,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation=cfg.attn_implementation,
    )


def build_causal_lm(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype):
    """Build the policy model. Call inside the ZeRO-3 context (see engine.zero3_init_context)
    so large checkpoints are loaded straight into partitions instead of whole on every rank."""
    # Imported here: transformers' modeling code costs seconds of start-up, and processes that only check
    # sources or tokenize (the RL driver, the launchers) never build a model.
    from transformers import AutoModelForCausalLM

    return _build(AutoModelForCausalLM, cfg, tokenizer, dtype, {})


def build_reward_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype):
    """A backbone with a scalar head (`num_labels=1`). Starting from a causal-LM checkpoint
    (an SFT export) keeps the backbone and initialises the head fresh. The score is read at
    the last non-padding token, which the model finds through `config.pad_token_id`."""
    from transformers import AutoModelForSequenceClassification

    model = _build(AutoModelForSequenceClassification, cfg, tokenizer, dtype, {"num_labels": 1})
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _build(auto_class, cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype, extra: dict):
    # Announced on rank 0 with its time: a real model's load can take minutes, with only transformers' own
    # "Loading weights" bar (left on) in between.
    announce = int(os.environ.get("RANK", 0)) == 0
    start = time.perf_counter()
    if cfg.name_or_path is None:
        config = tiny_llama_config(cfg, tokenizer)
        for key, value in extra.items():
            setattr(config, key, value)
        model = auto_class.from_config(config, dtype=dtype)
        what = "tiny random-init model (model.tiny) built"
    else:
        if announce:
            print(f"loading model {cfg.name_or_path} ({auto_class.__name__}, {dtype}) ...", flush=True)
        model = auto_class.from_pretrained(
            cfg.name_or_path,
            revision=cfg.revision,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
            **extra,
        )
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        what = f"model {cfg.name_or_path} loaded"
    how = ""
    if cfg.attn_implementation == "sdpa" and cfg.per_sequence_attention:
        # said either way: a packed row's attention costs T x T under the mask, which a user may not expect
        how = (" (attention: sdpa per packed sequence)" if packed_attention.use_for(model) else
               f" (attention: sdpa, packed rows under one mask: {packed_attention.unsupported(model.config)})")
    if announce:
        print(f"{what} in {time.perf_counter() - start:.1f} s{how}", flush=True)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


_COUNTED: dict[tuple, int] = {}


def count_parameters(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, scalar_head: bool = False) -> int:
    """The model's parameter count, from its architecture config alone (built on the meta device: no weights are
    loaded or allocated). `scalar_head`: a reward model or critic, whose one-output head replaces the LM head.
    Counted once per process and model: the learning rate and the ZeRO stage both ask, and building a large model
    even on the meta device takes seconds."""
    key = (repr(cfg), len(tokenizer), scalar_head)
    if key not in _COUNTED:
        _COUNTED[key] = _count_parameters(cfg, tokenizer, scalar_head)
    return _COUNTED[key]


def _count_parameters(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, scalar_head: bool) -> int:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = model_config_for(cfg, tokenizer)
    if scalar_head:
        config.num_labels = 1
    auto_class = AutoModelForSequenceClassification if scalar_head else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto_class.from_config(config, trust_remote_code=cfg.trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def resolve_lr_for_model(o: OptimConfig, peft_method: str, model: ModelConfig, scalar_head: bool = False,
                         key: str = "optim", tokenizer: Optional[PreTrainedTokenizerBase] = None,
                         ) -> tuple[OptimConfig, Optional[str]]:
    """`o` with `lr: auto` made the rate for this peft method and this model's size (counted only where the rate
    depends on it), and the line that says what it became (None for an explicit lr): what every stage, RL role and
    benchmark trains at."""
    parameters = None
    if needs_parameter_count(o):
        parameters = count_parameters(model, tokenizer or load_tokenizer(model), scalar_head)
    return resolve_lr(o, peft_method, key, parameters), lr_note(o, peft_method, key, parameters)


def positions_warning(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, longest: int) -> Optional[str]:
    """A warning when a sequence of `longest` positions is more than the model was made for (None when it fits, or
    the config names no limit): learned position embeddings fail on it, rotary ones run past their trained context."""
    config = model_config_for(cfg, tokenizer)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not limit or longest <= limit:
        return None
    return (f"warning: the longest training sequence has {longest} positions, more than the model's {limit} "
            f"(max_position_embeddings): a model with learned position embeddings fails on it, a rotary one runs "
            f"past its trained context; set data.max_length={limit} or shorten the examples")


def model_config_for(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase):
    """The architecture config without loading weights (for FLOP counts and checks)."""
    if cfg.name_or_path is None:
        return tiny_llama_config(cfg, tokenizer)
    return AutoConfig.from_pretrained(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
