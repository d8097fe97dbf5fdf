"""Write `.deepspeed_env` for multi-node runs with `deepspeed --hostfile`.

    python -m launch.deepspeed_env [--out .deepspeed_env]
    deepspeed --hostfile hostfile --module trainer.sft [overrides]

DeepSpeed's pdsh launcher starts the ranks of other nodes over ssh with only a few of
this shell's variables (NCCL_*, PYTHON*, ...); the rest come from `.deepspeed_env` in the
working directory or the home directory, one `KEY=VALUE` per line. This writes the run
variables `launch.job.forwarded_env` picks (W&B project and mode, HF cache, NCCL and
Gloo settings, TUNEFORGE_*) and no secret: the launcher logs every exported value in its
command line, so `WANDB_API_KEY` and tokens must reach the nodes another way (`wandb login`
on each node writes ~/.netrc; or the nodes' own environment).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

from launch.job import forwarded_env
from trainer.contracts import SECRET_KEY


def write_deepspeed_env(path: Path, environ: Optional[dict] = None) -> dict[str, str]:
    """Write the forwarded, non-secret variables to `path` (owner-only); what was written."""
    env = forwarded_env(environ)
    bad = [k for k, v in env.items() if "\n" in v]
    if bad:
        raise ValueError(f"cannot write {', '.join(bad)} to {path}: values hold a newline")
    skipped = sorted(k for k in (os.environ if environ is None else environ) if SECRET_KEY.search(k))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in env.items())
    if skipped:
        print(f"not written (secrets; set them on each node instead): {', '.join(skipped)}", file=sys.stderr)
    return env


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.deepspeed_env", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(".deepspeed_env"))
    a = p.parse_args(argv)
    env = write_deepspeed_env(a.out)
    print(f"wrote {len(env)} variable(s) to {a.out}: {', '.join(env) or '(none)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
