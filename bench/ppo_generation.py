"""Rollout generation under ZeRO-3: a plain generation replica vs generating through the engine.

    python -m bench.ppo_generation                         # the PPO default, 12 iterations x 2 repeats
    python -m bench.ppo_generation --iterations 12 --repeats 3 -- actor.devices_per_node=1 actor.deepspeed.stage=3

Each run is `python -m rlhf.ppo` with the same prompts, model, batch and `rollout.max_new_tokens`; only
`rollout.generation` differs (`replica`: a copy of the policy generates with a KV cache and no ZeRO hooks,
refreshed after each update; `zero3`: the ZeRO-3 engine generates, re-gathering every layer per token).
Reported: the median over iterations (after the first) of `time/generate_s` and `time/iteration_s`, then the
median over repeats; the replica's refresh cost (`policy/replica_refresh_s`) is listed too.
Results go to bench/results/ppo_generation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("replica", "zero3")


def one_run(mode: str, iterations: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "rlhf.ppo", f"rollout.generation={mode}", f"train.iterations={iterations}",
               "train.eval_every=0", "train.eval_prompts=0", "train.save_every=0", "train.samples_every=0",
               *overrides, f"hydra.run.dir={tmp}"]
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
        recs = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "time/generate_s" in r][1:]  # the first iteration warms up
    return {key: statistics.median(r[key] for r in recs)
            for key in ("time/generate_s", "time/iteration_s", "policy/replica_refresh_s") if key in recs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ppo_generation.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both modes (after --)")
    args = parser.parse_args()
    runs = {m: [] for m in MODES}
    for r in range(args.repeats):
        for mode in MODES:  # alternate, so load drift hits both alike
            runs[mode].append(one_run(mode, args.iterations, args.overrides))
            print(f"repeat {r} {mode}: {runs[mode][-1]}", flush=True)
    medians = {m: {k: statistics.median(run[k] for run in runs[m]) for k in runs[m][0]} for m in MODES}
    speedup = medians["zero3"]["time/generate_s"] / medians["replica"]["time/generate_s"]
    result = {"iterations": args.iterations, "repeats": args.repeats, "overrides": args.overrides,
              "medians": medians, "generate_speedup_replica_over_zero3": speedup, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for m in MODES:
        print(f"{m:8s} generate {medians[m]['time/generate_s']:.3f} s  iteration {medians[m]['time/iteration_s']:.3f} s")
    print(f"replica generates {speedup:.2f}x faster than zero3 (refresh {medians['replica'].get('policy/replica_refresh_s', 0):.4f} s)")


if __name__ == "__main__":
    main()
