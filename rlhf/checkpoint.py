"""The RL run's checkpoint: what it holds, when it counts, what resumes from it.

Layout under `<run_dir>/checkpoints/`:
    actor/, critic/          each trained role's DeepSpeed checkpoints (`trainer.checkpoint`: voted, manifest)
    driver/step_N.json       the driver's state after iteration N (iteration, KL controller, ranks per role)
    driver/latest            the newest committed iteration: written last, so an iteration counts once every
                             role's checkpoint and the driver's state are whole
    driver/inputs.json       the models and reward statistics the first start resolved, reused on every resume

The roles keep every checkpoint they write; old ones are pruned only after the driver has committed a newer
iteration, so a crash between a role's save and the driver's state still leaves the previous iteration whole.
`rlhf.ppo` finds the resume point and pins the inputs before any model is checked or any actor starts.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf, open_dict

from trainer.checkpoint import CheckpointError, atomic_write, check_zero_stage, prune, tag_for, torn
from trainer.config import ConfigError

STATE_DIR = "driver"
INPUTS = "inputs.json"
MODEL_KEYS = ("name_or_path", "tokenizer", "revision")


@dataclass
class ResumePoint:
    """A committed iteration to continue from."""

    root: Path  # the checkpoints directory it lives in (this run's, or another run's with resume=<dir>)
    tag: str
    state: dict  # the driver's state file
    inputs: Optional[dict]  # the pinned inputs (None for runs written before they were recorded)

    @property
    def run_dir(self) -> Path:
        return self.root.parent


def commit(root: Path, iteration: int, state: dict, roles: tuple[str, ...], keep_last: int, inputs: dict) -> None:
    """After every trained role has saved `iteration`: the run's inputs (once), the driver's state, then
    `latest`, then pruning."""
    tag = tag_for(iteration)
    state_dir = root / STATE_DIR
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        if not (state_dir / INPUTS).exists():
            atomic_write(state_dir / INPUTS, json.dumps(inputs, indent=2))
        atomic_write(state_dir / f"{tag}.json", json.dumps(state, indent=2))
        atomic_write(state_dir / "latest", tag)
    except OSError as e:
        latest = state_dir / "latest"
        previous = latest.read_text().strip() if latest.exists() else "no iteration"
        raise CheckpointError(f"iteration {iteration} was not committed: the driver's state could not be "
                              f"written ({type(e).__name__}: {e}); {latest} still names {previous}") from e
    for role in roles:
        prune(root / role, keep_last, keep=tag)
    for old in sorted(state_dir.glob("step_*.json"))[:-keep_last]:
        old.unlink()


def failure_note(run_dir: Path) -> str:
    """What a failed run leaves to resume from, for the end of its error line: the iteration `latest` names, or
    that there is none (the same command then starts over)."""
    pointer = run_dir / "checkpoints" / STATE_DIR / "latest"
    if pointer.exists():
        return f"the last committed iteration, {pointer.read_text().strip()}, is intact; to continue"
    return "no iteration was committed before it; to start again"


def find_resume_point(resume: Optional[str], run_dir: Path, roles: tuple[str, ...]) -> Optional[ResumePoint]:
    """The iteration `resume` names (None: start fresh). auto: this run's newest committed iteration, if any;
    a path: another run directory or its checkpoints directory, which must hold one. An iteration counts when
    the driver's state parses and every role in `roles` has a whole checkpoint of it; when `latest` names one
    that is not, the newest that is, with a warning naming both."""
    if resume is None:
        return None
    if resume == "auto":
        root = run_dir / "checkpoints"
    else:
        given = Path(resume)
        if not given.is_dir():
            raise FileNotFoundError(f"resume={resume}: no such directory")
        root = given / "checkpoints" if (given / "checkpoints").is_dir() else given
    pointer = root / STATE_DIR / "latest"
    if not pointer.exists():
        if resume == "auto":
            return None
        raise FileNotFoundError(f"resume={resume}: no RL checkpoint there (looked for {pointer})")
    named = pointer.read_text().strip()
    candidates = [named] + [p.stem for p in sorted((root / STATE_DIR).glob("step_*.json"), reverse=True)
                            if p.stem != named]
    problem = None
    for tag in candidates:
        why = _not_resumable(root, tag, roles)
        if why is None:
            if tag != named:
                print(f"warning: iteration checkpoint {root / named} cannot resume ({problem}); "
                      f"using the newest one that can, {root / tag}", flush=True)
            inputs_file = root / STATE_DIR / INPUTS
            inputs = json.loads(inputs_file.read_text()) if inputs_file.exists() else None
            return ResumePoint(root, tag, json.loads((root / STATE_DIR / f"{tag}.json").read_text()), inputs)
        problem = problem or why
    raise FileNotFoundError(f"resume={resume}: no iteration checkpoint under {root} can resume ({problem})")


def check_layout(point: ResumePoint, cfg) -> None:
    """ZeRO checkpoints resume on the ranks that wrote them: checked before any model loads."""
    sizes = {r: cfg.role(r).world_size for r in cfg.active_roles}
    if point.state["world_sizes"] != sizes:
        raise ConfigError(f"resume: checkpoint {point.root / point.tag} was written with ranks "
                          f"{point.state['world_sizes']}, this run has {sizes}; ZeRO checkpoints resume on the "
                          f"same layout: set each role's num_nodes/devices_per_node as they were")


def check_stages(point: ResumePoint, cfg) -> None:
    """Each trained role's checkpoint resumes at the ZeRO stage it was written with: checked once the models' sources
    are (`deepspeed.stage=auto` reads their configs), before any model loads."""
    for role in cfg.trained_roles:
        check_zero_stage(point.root / role / point.tag, cfg.zero_stage(role)[0].stage, f"{role}.deepspeed.stage")


def _not_resumable(root: Path, tag: str, roles: tuple[str, ...]) -> Optional[str]:
    try:
        json.loads((root / STATE_DIR / f"{tag}.json").read_text())
    except (OSError, ValueError) as e:
        return f"the driver's state {root / STATE_DIR / tag}.json is unreadable ({type(e).__name__})"
    for role in roles:
        why = torn(root / role / tag)
        if why:
            return f"{role}: {why}"
    return None


def drop_uncommitted(root: Path, point: ResumePoint, roles: tuple[str, ...]) -> None:
    """Role checkpoints newer than the iteration this run resumes from (saved before a crash that came
    before the driver's commit): removed, so the iterations retrained save afresh instead of keeping them."""
    for role in roles:
        for step_dir in (root / role).glob("step_*"):
            if step_dir.name > point.tag:
                shutil.rmtree(step_dir, ignore_errors=True)
    for state in (root / STATE_DIR).glob("step_*.json"):
        if state.stem > point.tag:
            state.unlink()


def resolved_inputs(cfg, reward_stats: Optional[dict]) -> dict:
    """What a run starts from: each running role's model source, and the reward statistics."""
    models = {role: {k: getattr(cfg.role(role).model, k) for k in MODEL_KEYS}
              for role in cfg.active_roles if not (role == "reward" and cfg.reward.functions)}
    return {"models": models, "reward_stats": reward_stats}


def pin_inputs(cfg, dcfg, pinned: dict) -> list[str]:
    """On resume, the model sources the first start resolved replace what this config resolves to now (a
    newer export must not slip into a run mid-way); a source the user set to something else is refused.
    `dcfg` is the composed config before resolution: a value given by an interpolation (`tf_require_export`,
    the policy's path for the reference) was derived, a literal one was written by the user; a pinned value
    replaces it there too, so the config the run records says what it runs. Returns the notes to print."""
    notes = []
    for role, recorded in pinned["models"].items():
        if role not in cfg.active_roles:
            continue
        model = cfg.role(role).model
        for key, then in recorded.items():
            now = getattr(model, key)
            if now == then:
                continue
            where = f"{role}.model.{key}"
            if not _derived(dcfg, f"{role}.model.{key}"):
                raise ConfigError(f"{where}={now}: this run started from {then}; resuming it with another "
                                  f"model is refused (drop the override, or start a new run)")
            setattr(model, key, then)
            with open_dict(dcfg):
                OmegaConf.update(dcfg, where, then, merge=False)
            notes.append(f"{where}: {then}, as at this run's first start (it would now resolve to {now})")
    return notes


def _derived(dcfg, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(dcfg, parent)
    return node is not None and OmegaConf.is_interpolation(node, leaf)
