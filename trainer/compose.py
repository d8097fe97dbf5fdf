"""The one way to turn a stage name and Hydra overrides into a config, inside or outside a Hydra run.

- `register_all()` registers every schema (the supervised stages' and PPO's) and every `tf_*` resolver
  the configs use; entry points, launchers, the preview, benchmarks and tests all call it (via `compose`).
- `compose(stage, overrides)` composes `conf/<stage>.yaml` outside a Hydra run: the typed config, or
  with `typed=False` the DictConfig with interpolations unresolved (a launcher checks overrides before
  the exports they point to exist).
- `to_typed(dcfg, overrides)` is the one conversion to the typed dataclass, shared by Hydra entry points
  and `compose`: it applies the rules that depend on what the user typed (a `data.path` on the command
  line replaces the stage's default data; `train.epochs` and `train.max_steps` are not both typed), refuses keys
  no schema declares, and converts once.

Loads Hydra and the config schemas only: no torch, Ray or data pipeline.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import time
from typing import Any, Iterable, Iterator, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from trainer.config import CONF_DIR, ConfigError, register_configs
from trainer.contracts import RUN_ID_ENV


def run_id() -> str:
    """The run directory's id: the one every rank agreed on (trainer.cli), or the start time."""
    return os.environ.get(RUN_ID_ENV) or time.strftime("%Y-%m-%d_%H-%M-%S")


def register_all() -> None:
    """Every schema and resolver, idempotent. Besides the entry points, the modules that define Hydra task
    functions call this on import: a sweep member that a launcher plugin (submitit, Ray) runs in another
    process unpickles its task function, never passes through `trainer.cli.launch`, and still resolves
    `hydra.sweep.dir` (the run id itself comes from Hydra's cache)."""
    from rlhf.config import register_ppo_config

    register_configs()
    register_ppo_config()
    if not OmegaConf.has_resolver("tf_run_id"):
        OmegaConf.register_new_resolver("tf_run_id", run_id, use_cache=True)
    if not OmegaConf.has_resolver("tf_help_groups"):
        OmegaConf.register_new_resolver("tf_help_groups", stage_groups_help)


def stage_groups_help(stage: str) -> str:
    """`--help`'s list of the config groups `conf/<stage>.yaml` composes from, one `group: option, ...` line each,
    as Hydra lists them (which is every group under conf/, the RL roles' in a supervised stage's help too)."""
    defaults = OmegaConf.load(CONF_DIR / f"{stage}.yaml").get("defaults", [])
    groups = set()
    for entry in defaults:
        for key in (entry.keys() if isinstance(entry, DictConfig) else ()):
            group = str(key).removeprefix("override ").removeprefix("optional ").strip("/")
            if (CONF_DIR / group).is_dir():
                groups.add(group)
    return "\n".join(f"{group}: {', '.join(sorted(p.stem for p in (CONF_DIR / group).glob('*.yaml')))}"
                     for group in sorted(groups))


def override_key(override: str) -> str:
    """The config key an override sets: `data.path` for `data.path=x`, `+data.path=x` or `~data.path`."""
    return override.split("=", 1)[0].lstrip("+~")


# Overrides renamed in 0.1 -> 0.2 (the old names work until the next release, with a note): "reward" meant
# the reward stage's loss settings, the PPO reward role and its config group at once.
RENAMED_KEYS = {
    "reward.center_coef": "preference_loss.center_coef",
    "reward.share_prompt": "preference_loss.share_prompt",
    "reward": "reward_source",  # the PPO group choice, reward=model|exact_match; reward.<key> stays the role's
}


# A role's choice from a top-level config group, as users write it (`actor.peft=lora`), and as Hydra names it: the
# roles' configs take the group at their own key (conf/actor/default.yaml: `/peft@peft`).
ROLE_GROUP_CHOICES = {"actor.peft": "peft@actor.peft", "critic.peft": "peft@critic.peft"}


def renamed_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """`overrides` with renamed keys given their new names, and a deprecation note for each; a role's group choice
    (`actor.peft=lora`) in Hydra's spelling."""
    out, notes = [], []
    for o in overrides:
        key = override_key(o)
        prefix = o[: len(o) - len(o.lstrip("+~"))]
        if key in RENAMED_KEYS and "=" in o:
            o = f"{prefix}{RENAMED_KEYS[key]}={o.split('=', 1)[1]}"
            notes.append(f"{key} is renamed {RENAMED_KEYS[key]}; the old name works until the next release")
        elif key in ROLE_GROUP_CHOICES and "=" in o and not prefix:
            o = f"{ROLE_GROUP_CHOICES[key]}={o.split('=', 1)[1]}"
        out.append(o)
    return out, notes


def apply_user_data(dcfg: DictConfig, overrides: list[str]) -> Optional[str]:
    """A `data.path` the user gave replaces the stage's default data (the `data.mixture` that, say,
    conf/instruct.yaml sets), instead of losing silently to it. Both keys given is ambiguous: an error
    naming both. Returns the note to print when something was replaced."""
    keys = {override_key(o) for o in overrides}
    path_given = "data.path" in keys
    mixture_given = any(k == "data.mixture" or k.startswith("data.mixture.") or k.startswith("data.mixture[")
                        for k in keys)
    if path_given and mixture_given:
        raise ConfigError("data.path and data.mixture are both set on the command line: give data.path for one "
                          "dataset or data.mixture for several, not both")
    if "data" not in dcfg or not path_given or not dcfg.data.get("mixture"):
        return None
    replaced = ", ".join(str(m.path) for m in dcfg.data.mixture)
    with open_dict(dcfg):
        dcfg.data.mixture = []
    return f"data.path={dcfg.data.path} replaces the stage's default data.mixture ({replaced})"


def check_run_length(dcfg: DictConfig, overrides: list[str]) -> None:
    """`train.epochs` sets max_steps: a `train.max_steps` typed beside it would lose without a word."""
    if ("train.max_steps" in {override_key(o) for o in overrides}
            and OmegaConf.select(dcfg, "train.epochs", default=None) is not None):
        raise ConfigError("train.max_steps and train.epochs are both set: give one (train.epochs=N makes max_steps "
                          "ceil(N x training sequences / global batch))")


def check_warmup(dcfg: DictConfig, overrides: list[str]) -> None:
    """`optim.warmup_ratio` sets warmup_steps: a `warmup_steps` typed beside it would lose without a word."""
    for typed in {override_key(o) for o in overrides}:
        key, _, name = typed.rpartition(".")  # optim, actor.optim, critic.optim: wherever an optimizer is set
        if name == "warmup_steps" and OmegaConf.select(dcfg, f"{key}.warmup_ratio", default=None) is not None:
            raise ConfigError(f"{key}.warmup_steps and {key}.warmup_ratio are both set: give one "
                              f"({key}.warmup_ratio=R makes warmup_steps ceil(R x the schedule's optimizer steps))")


def unknown_key_message(key: str, known: Iterable[str]) -> str:
    """The one-line error for a setting `key` that its section (whose settings are `known`) lacks."""
    parent, _, name = key.rpartition(".")
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    where = f"{parent} has" if parent else "the config has"
    hint = f"did you mean {parent + '.' if parent else ''}{close[0]}?" if close else f"{where}: {', '.join(known)}"
    return f"{key}: no such setting; {hint}"


def unknown_keys(node: Any, prefix: str = "") -> Iterator[tuple[str, list[str]]]:
    """(key, its section's settings) for every key under `node` that its dataclass schema lacks."""
    if isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from unknown_keys(node._get_node(i), f"{prefix}[{i}].")
    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing():
        return
    schema = OmegaConf.get_type(node)
    known = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    for k in node.keys():
        if known is not None and k not in known:
            yield f"{prefix}{k}", known
        else:
            yield from unknown_keys(node._get_node(k), f"{prefix}{k}.")


def reject_unknown_keys(dcfg: DictConfig) -> None:
    """A key added with `+` (`+train.max_stepz=3`, as Hydra's own error suggests) that no schema declares
    would be dropped without a word by the conversion to dataclasses: it is an error instead."""
    for key, known in unknown_keys(dcfg):
        if key == "hydra" or key.startswith("hydra."):  # Hydra's own settings, kept by `return_hydra_config`
            continue
        raise ConfigError(unknown_key_message(key.replace(".[", "["), known))


def error_line(err: BaseException) -> str:
    """One line naming what is wrong and where, from a config error: ours, OmegaConf's (which add `full_key:` and
    type lines) or Hydra's composition errors (which add the options and the search path); any other error's
    text on one line."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = err.__cause__
    if isinstance(err, OmegaConfBaseException) and err.full_key:  # OmegaConf's own; a resolver's refusal in its words
        return f"{err.full_key}: {_first_line(_our_error_within(err) or err.msg)}"
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.parent_node is not None:
        return unknown_key_message(cause.full_key, cause.parent_node.keys())
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:  # a value of the wrong type
        return f"{cause.full_key}: {_first_line(cause.msg)} ({_first_line(err)})"
    if isinstance(err, MissingConfigException) and err.options:
        return f"{_first_line(err)}; the options are {', '.join(err.options)}"
    return " ".join(str(err).split())


def _our_error_within(err: BaseException) -> Optional[ConfigError]:
    # OmegaConf re-raises a resolver's error wrapped (twice), naming its class in the message.
    while err is not None and not isinstance(err, ConfigError):
        err = err.__cause__ or err.__context__
    return err


def _first_line(text) -> str:
    return str(text).strip().splitlines()[0] if str(text).strip() else ""


def to_typed(dcfg: DictConfig, overrides: list[str]) -> Any:
    """The typed config (TrainingJobConfig or PPOConfig) that `dcfg`, composed with `overrides`, stands for."""
    reject_unknown_keys(dcfg)
    check_run_length(dcfg, overrides)
    check_warmup(dcfg, overrides)
    note = apply_user_data(dcfg, overrides)
    if "algo" in dcfg:  # an RL config: roles the algorithm does not run need no export
        from rlhf.config import leave_out_unused_roles

        leave_out_unused_roles(dcfg)
    if note and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: {note}", file=sys.stderr, flush=True)
    return OmegaConf.to_object(dcfg)


def hydra_overrides() -> list[str]:
    """Inside a Hydra run: the overrides the user gave this job (a sweep member's include its swept values)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def compose(stage: str, overrides: list[str] = (), typed: bool = True, return_hydra_config: bool = False) -> Any:
    """`conf/<stage>.yaml` with `overrides`, outside a Hydra run: the typed config, or with `typed=False`
    the DictConfig, interpolations unresolved. `output_dir` names the Hydra run directory, which exists
    only inside a Hydra run, so it is `.` here unless an override sets it. `return_hydra_config` keeps the
    `hydra` node (untyped only), as inside a run: `hydra.run.dir` is the run directory a launch would get."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_all()
    overrides, notes = renamed_overrides(list(overrides))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        dcfg = hydra_compose(config_name=stage, overrides=overrides, return_hydra_config=return_hydra_config)
    if OmegaConf.is_interpolation(dcfg, "output_dir"):
        dcfg.output_dir = "."
    if not typed:
        reject_unknown_keys(dcfg)
        check_run_length(dcfg, overrides)
        check_warmup(dcfg, overrides)
        apply_user_data(dcfg, overrides)
        return dcfg
    return to_typed(dcfg, overrides)
