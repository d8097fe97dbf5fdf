"""What every Hydra entry point does before Hydra starts.

- Registers every config schema and `tf_*` resolver (`trainer.compose.register_all`).
- Makes every rank of a distributed run resolve the same run directory: rank 0
  picks the id and broadcasts it (a per-rank `${now:}` would split the run).
- `resume=auto` without a run directory: rank 0 finds the unfinished run to continue
  (`trainer.resume`) and every rank runs in its directory.
- Keeps ranks other than 0 from writing Hydra's files and logs.
- Turns user errors into one line on stderr and exit 2: its own, OmegaConf's, and Hydra's errors in composing
  the config (a key the config lacks, a value of the wrong type, a config group option that does not exist),
  which Hydra would report over several lines with exit 1.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

from trainer.compose import error_line, register_all, renamed_overrides, run_id
from trainer.config import ConfigError
from trainer.contracts import RUN_ID_ENV, USER_ERROR_EXIT_CODE

STALE_BUILD_LOCK_S = 600


def _agree_on_run_id() -> None:
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or RUN_ID_ENV in os.environ:
        return
    import torch.distributed as dist

    from trainer.engine import init_distributed

    init_distributed()
    box = [run_id() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    os.environ[RUN_ID_ENV] = box[0]


def _continue_unfinished_run(config_name: str) -> None:
    """`resume=auto` without a run directory: rank 0 decides which run it continues (or a fresh start, or
    exit 2 when that is ambiguous) before Hydra creates a directory, and every rank follows."""
    from trainer.resume import claim, decide

    os.environ.setdefault(RUN_ID_ENV, run_id())  # a fresh start's directory is known, to name it
    rank = int(os.environ.get("RANK", 0))
    decision = claim(decide(config_name, sys.argv[1:])) if rank == 0 else None
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        import torch.distributed as dist

        box = [decision]
        dist.broadcast_object_list(box, src=0)  # the process group _agree_on_run_id started
        decision = box[0]
    if rank == 0:
        print(f"error: {decision.message}" if decision.exit_code else decision.message,
              file=sys.stderr if decision.exit_code else sys.stdout, flush=True)
    if decision.exit_code:
        raise SystemExit(decision.exit_code)
    if decision.run_dir is not None:
        quote = '"' if "'" in str(decision.run_dir) else "'"
        sys.argv.append(f"hydra.run.dir={quote}{decision.run_dir}{quote}")


def _quiet_non_zero_ranks() -> None:
    if int(os.environ.get("RANK", 0)) != 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def _silence_library_noise() -> None:
    # DeepSpeed calls torch's deprecated collective names on every step; the
    # warning floods stderr and breaks the progress bar without telling users anything.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+`? is deprecated", category=FutureWarning)


def _per_environment_extension_cache() -> None:
    # DeepSpeed JIT-builds its ops (CPU Adam for optimizer offload, say) into torch's shared
    # extension cache under a file lock. Two Python environments on one machine would rebuild
    # them over each other, and a run killed mid-build leaves a lock that hangs every later
    # start, so each environment gets its own cache.
    tag = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions" / f"env-{tag}"))
    _remove_stale_build_locks(Path(os.environ["TORCH_EXTENSIONS_DIR"]))


def _remove_stale_build_locks(cache: Path, max_age_s: float = STALE_BUILD_LOCK_S) -> None:
    # torch's build lock names no owner, so a process killed mid-build leaves one that every
    # later process waits on forever. The op builds in seconds: an old lock has no builder.
    for lock in cache.glob("*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                print(f"removed a stale extension build lock (its build was killed): {lock}", file=sys.stderr)
        except FileNotFoundError:  # another process got there first
            pass


def prepare_process() -> None:
    """What every process that builds DeepSpeed engines needs, entry points and Ray actors alike."""
    _silence_library_noise()
    _per_environment_extension_cache()


def launch(hydra_main: Callable[[], None], config_name: Optional[str] = None) -> None:
    """Run `hydra_main`, the Hydra entry whose primary config is `conf/<config_name>.yaml`."""
    from trainer.local_ray import keep_local_ray_on_loopback
    from trainer.preemption import preemption_flag
    from trainer.resume import remember_command, wants_discovery

    remember_command(sys.argv)  # as typed: the preemption message repeats it
    preemption_flag()  # from here on a preemption warning is recorded, not fatal (trainer/preemption.py)

    # Before anything imports Ray: a sweep on Hydra's Ray launcher starts Ray in this process.
    keep_local_ray_on_loopback(sys.argv[1:])
    sys.argv[1:], notes = renamed_overrides(sys.argv[1:])
    if int(os.environ.get("RANK", 0)) == 0:
        for note in notes:
            print(f"note: {note}", file=sys.stderr, flush=True)
    prepare_process()
    register_all()
    discover = config_name is not None and wants_discovery(sys.argv[1:], os.environ)  # before a run id is set
    _agree_on_run_id()
    if discover:
        _continue_unfinished_run(config_name)
    _quiet_non_zero_ranks()
    _composition_errors_are_user_errors()
    hydra_main()
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        leave_without_native_teardown()


def leave_without_native_teardown() -> None:
    """Exit 0 once Python's exit handlers have run, without the native teardown (for a finished rank)."""
    # A rank of a multi-rank run that had finished and printed `done` still aborted at interpreter exit now and then
    # ("terminate called without an active exception", -6; after trainer.engine's atexit destroy of the process
    # group too), in the C++ teardown that follows Python's, and torchrun then reported the finished run failed.
    # Python's exit handlers run as usual (the process group destroyed, logs flushed, temporary files removed);
    # the native teardown, which has nothing left to write, is skipped.
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _composition_errors_are_user_errors() -> None:
    # Hydra composes the config inside its own `run_and_report`, which prints a composition error over several
    # lines and exits 1 before any of our code runs: wrapping what it runs is the one way in. HYDRA_FULL_ERROR=1
    # keeps Hydra's full report.
    from hydra._internal import utils as hydra_internals
    from hydra.errors import CompactHydraException

    report = hydra_internals.run_and_report
    if getattr(report, "tuneforge", False) or os.environ.get("HYDRA_FULL_ERROR") == "1":
        return

    def run_and_report(func):
        def run():
            try:
                return func()
            except CompactHydraException as err:
                exit_with_user_error(err)
        return report(run)

    run_and_report.tuneforge = True
    hydra_internals.run_and_report = run_and_report


def user_errors() -> tuple[type[BaseException], ...]:
    from omegaconf.errors import InterpolationResolutionError

    from trainer.data import DataError

    # InterpolationResolutionError: a resolver such as tf_require_export refused (its message says why).
    return (ConfigError, DataError, FileNotFoundError, InterpolationResolutionError)


def exit_with_user_error(err: BaseException) -> None:
    print(f"error: {error_line(err)}", file=sys.stderr)
    raise SystemExit(USER_ERROR_EXIT_CODE)
