"""`resume=auto` without a run directory: find the run to continue, and the command that continues a run.

Each launch gets a new timestamped run directory (`outputs/<stage>/<run id>`), so the command that was
preempted, rerun with `resume=auto`, would start over in a new one. Before Hydra starts (`trainer.cli.launch`),
`decide` looks under the outputs root (the parent of the run directory this launch would get) for runs of the
same stage that are unfinished (a complete checkpoint, no finished marker) and whose `config.yaml` equals this
launch's config apart from `IGNORED_KEYS`, and picks one:

- none: a fresh start, said in one line (naming the newest unfinished run and the keys it differs in, if any);
- one, or several where the newest (latest checkpoint written last) is also the furthest (highest step): it;
- several where the newest is not the furthest: ambiguous, since either could be the one meant (a run
  restarted by hand from step 0 beside a preempted one that got further, or two runs at once): exit 2 in one
  line naming both and how to choose (`hydra.run.dir=<dir> resume=auto`);
- one that is still running (its process holds the lock `hold_run_lock` takes): exit 2 as well, never a second
  process writing into a running run's directory.

An explicit run directory (`hydra.run.dir=`, `output_dir=`, or a run id a launcher set, as `launch.slurm` does)
keeps `resume=auto` to that directory, as before. Sweeps (`-m`) and Hydra's other flags are left alone.

`resume_command` is the command line that continues this run: what the user typed (the `torchrun` or `deepspeed`
launcher of a multi-rank run, found among this process's parents) with `resume=auto` added or replaced.

Light at import (standard library only); composing the config and reading checkpoints import what they need.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from trainer.contracts import RUN_ID_ENV, USER_ERROR_EXIT_CODE

# Keys that say where a run is written, how often it is checkpointed, how it is recorded or which cluster runs it,
# not what it trains: a run that differs from this launch only in these is the same run (a user may well rerun a
# preempted command asking for more frequent checkpoints, or a hung one with other time limits). A prefix covers
# the keys below it.
IGNORED_KEYS = ("resume", "output_dir", "hydra", "logger", "objective", "train.save_every", "train.keep_last",
                "train.collective_timeout_s", "cluster.address", "cluster.num_cpus", "cluster.start_timeout_s",
                "cluster.call_timeout_s", "cluster.preemption_wait_s")
# Written when a run has finished: by the supervised stages (trainer.run) and by PPO/GRPO (rlhf.ppo).
FINISHED_MARKERS = {"supervised": "train_state.json", "rl": "before_after.json"}
EXPLICIT_DIR_KEYS = ("hydra.run.dir", "output_dir")
SWEEP_KEYS = ("hydra.mode",)  # with `-m`: a sweep's members have their own directories
PPO_STATE_DIR = "driver"  # rlhf.driver.STATE_DIR: checkpoints/driver/latest names the newest complete checkpoint
# In a run directory, locked (flock) by the process that writes the run while it lives; the kernel drops the lock
# however the process ends, so a killed run never looks alive.
RUNNING_LOCK = ".running"


@dataclass(frozen=True)
class Candidate:
    """An unfinished run: its directory, the step (iteration) of its newest complete checkpoint, when that
    checkpoint was committed (seconds since the epoch), the config it ran with, and whether a process still
    runs it."""
    run_dir: Path
    step: int
    saved_at: float
    config: dict = field(compare=False, repr=False)
    running: bool = False


@dataclass(frozen=True)
class Decision:
    """What `resume=auto` does: continue `run_dir`, or start fresh (`run_dir` None); `message` is the one line
    that says so; `exit_code` set when the run must not start (ambiguous, or the run is still running)."""
    run_dir: Optional[Path]
    message: str
    exit_code: Optional[int] = None


# ---------------------------------------------------------------------------------------------------- pure


def override_value(overrides: Sequence[str], key: str) -> Optional[str]:
    """The value the last override of `key` gives (`key=v`, `+key=v`, `++key=v`), else None."""
    value = None
    for o in overrides:
        if "=" in o and o.split("=", 1)[0].lstrip("+~") == key:
            value = o.split("=", 1)[1]
    return value


def wants_discovery(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """True when this launch asks for `resume=auto` and leaves the run directory to Hydra's default: no
    explicit directory, no run id from a launcher, no sweep or other Hydra flag."""
    if override_value(argv, "resume") != "auto" or RUN_ID_ENV in environ:
        return False
    if any(a.startswith("-") for a in argv):
        return False
    return all(override_value(argv, key) is None for key in (*EXPLICIT_DIR_KEYS, *SWEEP_KEYS))


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value}; lists are leaves."""
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, Any] = {}
    for k, v in config.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS)


_MISSING = object()


def config_differences(old: dict, new: dict) -> list[str]:
    """The dotted keys, outside `IGNORED_KEYS`, whose values differ between two resolved configs."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if not _ignored(k) and a.get(k, _MISSING) != b.get(k, _MISSING))


def pick(candidates: Sequence[Candidate], config: dict, stage: str, root: Path, fresh_dir: Path) -> Decision:
    """Which unfinished run `resume=auto` continues (see the module docstring): pure, given the candidates."""
    by_time = sorted(candidates, key=lambda c: (c.saved_at, str(c.run_dir)), reverse=True)
    matching = [c for c in by_time if not config_differences(c.config, config)]
    fresh = f"starting fresh in {fresh_dir}"
    if not by_time:
        return Decision(None, f"resume=auto: no unfinished {stage} run under {root}/; {fresh}")
    if not matching:
        newest = by_time[0]
        keys = config_differences(newest.config, config)
        differs = "differs in " + ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        if len(by_time) == 1:
            return Decision(None, f"resume=auto: the one unfinished {stage} run under {root}/, {newest.run_dir}, has "
                                  f"another config ({differs}); {fresh}")
        return Decision(None, f"resume=auto: none of the {len(by_time)} unfinished {stage} runs under {root}/ has "
                              f"this config (the newest, {newest.run_dir}, {differs}); {fresh}")
    running = [c for c in matching if c.running]
    if running:
        return Decision(None, f"resume=auto: {running[0].run_dir} (step {running[0].step}) has this config and is "
                              f"still running (a process holds its {RUNNING_LOCK}); let it finish or stop it, or "
                              f"start another: hydra.run.dir=<new run dir>", exit_code=USER_ERROR_EXIT_CODE)
    newest = matching[0]
    furthest = max(matching, key=lambda c: c.step)
    if furthest.step > newest.step:
        return Decision(None, f"resume=auto: {len(matching)} unfinished {stage} runs have this config and the newest, "
                              f"{newest.run_dir} (step {newest.step}), is behind {furthest.run_dir} (step "
                              f"{furthest.step}); choose one: hydra.run.dir=<run dir> resume=auto",
                        exit_code=USER_ERROR_EXIT_CODE)
    older = len(matching) - 1
    others = f"; {older} older one{'s' if older > 1 else ''} left alone" if older else ""
    return Decision(newest.run_dir, f"resume=auto: continuing {newest.run_dir} from step {newest.step}, the newest "
                                    f"unfinished {stage} run with this config{others}")


def with_resume_auto(words: Sequence[str]) -> list[str]:
    """`words` with every `resume=` override replaced by `resume=auto`, or `resume=auto` appended."""
    out = ["resume=auto" if w.split("=", 1)[0].lstrip("+~") == "resume" and "=" in w else w for w in words]
    return out if "resume=auto" in out else [*out, "resume=auto"]


# ---------------------------------------------------------------------------------------------------- the run directory


def newest_checkpoint(run_dir: Path, rl: bool) -> Optional[tuple[str, float]]:
    """(tag, time its pointer moved) of the run's newest complete checkpoint, or None."""
    root = run_dir / "checkpoints"
    if rl:
        pointer = root / PPO_STATE_DIR / "latest"
        tag = pointer.read_text().strip() if pointer.is_file() else None
        complete = tag is not None and (root / PPO_STATE_DIR / f"{tag}.json").is_file()
    else:
        from trainer.checkpoint import LATEST, latest_tag

        pointer = root / LATEST
        tag = latest_tag(root)
        complete = tag is not None
    return (tag, pointer.stat().st_mtime) if complete else None


def unfinished_run(run_dir: Path, rl: bool) -> Optional[Candidate]:
    """The run in `run_dir` when it has a complete checkpoint, no finished marker and a readable config."""
    if (run_dir / FINISHED_MARKERS["rl" if rl else "supervised"]).exists():
        return None
    ckpt = newest_checkpoint(run_dir, rl)
    config = read_config(run_dir / "config.yaml") if ckpt else None
    if ckpt is None or config is None:
        return None
    tag, saved_at = ckpt
    step = int(tag.rsplit("_", 1)[-1]) if tag.rsplit("_", 1)[-1].isdigit() else 0
    return Candidate(run_dir, step, saved_at, config, running=is_running(run_dir))


_held_locks: list = []


def hold_run_lock(run_dir: Path) -> bool:
    """Mark `run_dir` as running until this process exits (rank 0 of a supervised run, the RL driver); False
    where another process holds it or the filesystem has no locks. The run goes on either way: an explicit
    directory keeps today's behaviour."""
    import fcntl

    if any(Path(f.name).resolve() == (run_dir / RUNNING_LOCK).resolve() for f in _held_locks):
        return True
    f = open(run_dir / RUNNING_LOCK, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return False
    _held_locks.append(f)  # open until the process exits
    return True


def is_running(run_dir: Path) -> bool:
    """Whether a live process holds `run_dir`'s lock."""
    import fcntl

    try:
        with open(run_dir / RUNNING_LOCK) as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no lock file (a run from before it existed), or no locks on this filesystem
        return False
    return False


def read_config(path: Path) -> Optional[dict]:
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # missing, unreadable or not YAML: not a run this can continue
        return None
    return config if isinstance(config, dict) else None


def scan(root: Path, rl: bool, skip: Optional[Path] = None) -> list[Candidate]:
    """The unfinished runs directly under `root`."""
    if not root.is_dir():
        return []
    found = (unfinished_run(d, rl) for d in sorted(root.iterdir()) if d.is_dir() and d != skip)
    return [c for c in found if c is not None]


def launch_config(config_name: str, overrides: Sequence[str]) -> tuple[dict, Path]:
    """(the resolved config this launch would write to config.yaml, the run directory Hydra would give it)."""
    from omegaconf import OmegaConf, open_dict

    from trainer.compose import compose
    from trainer.contracts import scrub_secrets

    dcfg = compose(config_name, overrides, typed=False, return_hydra_config=True)
    run_dir = Path(str(dcfg.hydra.run.dir))
    with open_dict(dcfg):
        del dcfg["hydra"]
    if "algo" in dcfg:  # as trainer.compose.to_typed does inside the run
        from rlhf.config import leave_out_unused_roles

        leave_out_unused_roles(dcfg)
    resolved = scrub_secrets(OmegaConf.to_container(dcfg, resolve=True))
    # Through YAML and back, as config.yaml is read, so both sides have the same types.
    return OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(resolved))), run_dir


def decide(config_name: str, overrides: Sequence[str]) -> Decision:
    """What `resume=auto` does for this launch. When its config does not compose here, the launch goes on in
    its own directory, saying why (Hydra's run then fails with its own message, or starts fresh)."""
    try:
        config, fresh_dir = launch_config(config_name, overrides)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return Decision(None, f"resume=auto: not looking for a run to continue, this launch's config does not "
                              f"compose ({reason}); resuming only from its own run directory")
    stage = str(config.get("stage", config_name))
    root = fresh_dir.parent
    return pick(scan(root, rl="algo" in config, skip=fresh_dir), config, stage, root, fresh_dir)


def claim(decision: Decision) -> Decision:
    """Lock the run `decision` continues at once (not only when the run writes its config), so that a launch
    deciding at the same moment cannot continue it too; the loser exits 2."""
    if decision.run_dir is None or hold_run_lock(decision.run_dir):
        return decision
    return Decision(None, f"resume=auto: {decision.run_dir} started running from another launch meanwhile; let it "
                          f"finish or stop it, or start another: hydra.run.dir=<new run dir>",
                    exit_code=USER_ERROR_EXIT_CODE)


# ---------------------------------------------------------------------------------------------------- the command


_launch_argv: list[str] = []


def remember_command(argv: Sequence[str]) -> None:
    """Keep the command line as typed, before launch rewrites `sys.argv` (renamed keys, a found run dir)."""
    _launch_argv[:] = argv


def _cmdline(pid: int) -> list[str]:
    try:
        return [w for w in Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0") if w]
    except (OSError, UnicodeDecodeError):
        return []


def _parent(pid: int) -> Optional[int]:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _short(program: str) -> str:
    """`program` as typed: its bare name when that is what PATH finds."""
    name = os.path.basename(program)
    found = shutil.which(name)
    return name if found and os.path.realpath(found) == os.path.realpath(program) else program


LAUNCHERS = ("torchrun", "deepspeed")
LAUNCHER_MODULES = ("torch.distributed.run", "torch.distributed.launch", "launch.torchrun")


def launcher_words(cmdline: Sequence[str]) -> Optional[list[str]]:
    """A process's command line as typed, if it is a multi-rank launcher (`torchrun ...`, `deepspeed ...`,
    `python -m torch.distributed.run ...`, `python -m launch.torchrun ...`), else None."""
    for i, word in enumerate(cmdline[:2]):  # a console script runs as `python /path/torchrun ...`
        if os.path.basename(word) in LAUNCHERS:
            return [_short(word), *cmdline[i + 1:]]
    if len(cmdline) > 2 and cmdline[1] == "-m" and cmdline[2] in LAUNCHER_MODULES:
        return [_short(cmdline[0]), *cmdline[1:]]
    return None


def _launcher_of_this_process() -> Optional[list[str]]:
    pid = os.getpid()
    for _ in range(4):  # torchrun -> rank; deepspeed -> deepspeed.launcher.launch -> rank
        pid = _parent(pid)
        if not pid or pid <= 1:
            return None
        words = launcher_words(_cmdline(pid))
        if words:
            return words
    return None


def resume_command(argv: Optional[Sequence[str]] = None, module: Optional[str] = None) -> str:
    """The shell command that continues this run: the command as typed with `resume=auto`."""
    multi_rank = int(os.environ.get("WORLD_SIZE", 1)) > 1
    launcher = _launcher_of_this_process() if multi_rank else None
    if launcher:
        return shlex.join(with_resume_auto(launcher))
    argv = list(argv or _launch_argv or sys.argv)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    module = module or (spec.name if spec else None)
    program = ["-m", module] if module else [argv[0]]
    if multi_rank:  # no launcher among the parents (no /proc): the launch this run's environment describes
        python = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', os.environ['WORLD_SIZE'])}"]
    else:
        python = [_short(sys.executable)]
    return shlex.join(with_resume_auto([*python, *program, *argv[1:]]))
