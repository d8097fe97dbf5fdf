"""A role's ranks as one object: create the Ray actors on their placement, form their process
group, call a method on every rank, and turn any rank's death into an error naming it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import ray


class RoleFailure(RuntimeError):
    """A rank of a role died or raised; the message names the role, rank and node."""


@dataclass
class PendingCall:
    """A method call in flight on every rank of one group."""

    group: "ActorGroup"
    method: str
    refs: list


class ActorGroup:
    def __init__(self, role: str, worker_cls: type, world_size: int, placement, cfg, env: Optional[dict] = None):
        self.role, self.world_size = role, world_size
        remote_cls = ray.remote(worker_cls)
        runtime_env = {"env_vars": env} if env else None
        self.actors = [
            remote_cls.options(**placement.actor_options(rank), runtime_env=runtime_env,
                               name=None, max_restarts=0, max_concurrency=1)
            .remote(cfg, role, rank, world_size)
            for rank in range(world_size)
        ]
        self.nodes: list[str] = ["?"] * world_size

    def start(self) -> list[dict]:
        """Form the role's process group (rank 0 picks the rendezvous) and report where each rank runs."""
        addr, port = wait_all([PendingCall(self, "rendezvous", [self.actors[0].rendezvous.remote()])])[0][0]
        wait_all([PendingCall(self, "init_process_group",
                              [a.init_process_group.remote(addr, port) for a in self.actors])])
        rows = wait_all([self.call("describe")])[0]
        self.nodes = [r.get("node_ip", "?") for r in rows]
        return rows

    def call(self, method: str, *args, **kwargs) -> PendingCall:
        """The same arguments on every rank."""
        return PendingCall(self, method, [getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def call_sharded(self, method: str, shards: Sequence[Any], *args, **kwargs) -> PendingCall:
        """Rank r gets shards[r] as its first argument."""
        assert len(shards) == self.world_size, (self.role, len(shards), self.world_size)
        return PendingCall(self, method, [getattr(a, method).remote(s, *args, **kwargs)
                                          for a, s in zip(self.actors, shards)])

    def call_per_rank(self, method: str, args: Sequence[tuple]) -> PendingCall:
        """Rank r is called with the positional arguments args[r]."""
        assert len(args) == self.world_size, (self.role, len(args), self.world_size)
        return PendingCall(self, method, [getattr(a, method).remote(*arg) for a, arg in zip(self.actors, args)])

    def kill(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001  (already dead)
                pass


def wait_all(pending: list[PendingCall]) -> list[list]:
    """Results of several groups' calls (each a list by rank), failing fast: the first rank that
    dies or raises ends the wait with a RoleFailure, since its peers may be blocked in a collective
    that will never complete."""
    where = {}
    for i, p in enumerate(pending):
        for rank, ref in enumerate(p.refs):
            where[ref] = (i, rank)
    results = [[None] * len(p.refs) for p in pending]
    remaining = list(where)
    while remaining:
        done, remaining = ray.wait(remaining, num_returns=1)
        ref = done[0]
        i, rank = where[ref]
        try:
            results[i][rank] = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as err:
            p = pending[i]
            node = p.group.nodes[rank] if rank < len(p.group.nodes) else "?"
            cause = str(err).strip().splitlines()
            summary = next((line for line in reversed(cause) if line.strip()), type(err).__name__)
            raise RoleFailure(f"{p.group.role} rank {rank} on node {node} failed in {p.method}: "
                              f"{type(err).__name__}: {summary}") from err
    return results
