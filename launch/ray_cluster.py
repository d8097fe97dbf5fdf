"""Helpers for Ray clusters that launch/ forms (inside a SLURM allocation).

    python -m launch.ray_cluster wait --address HOST:PORT --nodes N [--timeout S]

`wait` returns once N nodes are alive, so the PPO driver sizes its placement on the
whole allocation rather than on the nodes that happened to join first.
"""

from __future__ import annotations

import argparse
import sys
import time


def alive_nodes(address: str) -> int:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def wait_for_nodes(address: str, nodes: int, timeout_s: float, poll_s: float = 2.0) -> int:
    """Block until `nodes` Ray nodes are alive at `address`; TimeoutError names how many came."""
    deadline = time.monotonic() + timeout_s
    seen, error = 0, None
    while time.monotonic() < deadline:
        try:
            seen = alive_nodes(address)
            if seen >= nodes:
                return seen
        except (ConnectionError, RuntimeError) as e:  # the head is still starting
            error = e
        time.sleep(poll_s)
    detail = f"; last error: {error}" if error and not seen else ""
    raise TimeoutError(f"Ray cluster at {address}: {seen} of {nodes} nodes alive after {timeout_s:.0f} s{detail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.ray_cluster")
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wait", help="wait until the cluster has N alive nodes")
    w.add_argument("--address", required=True)
    w.add_argument("--nodes", type=int, required=True)
    w.add_argument("--timeout", type=float, default=300)
    a = p.parse_args(argv)
    try:
        seen = wait_for_nodes(a.address, a.nodes, a.timeout)
    except TimeoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"ray cluster at {a.address}: {seen} node(s) alive", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
