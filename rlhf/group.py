"""A role's ranks as one object: create the Ray actors on their placement, form their process
group, call a method on every rank, and turn any rank's death, or a call it does not answer in time, into an
error naming it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import ray

# How often a wait wakes to look at its deadlines: a call past them, or a preemption signal, is noticed within this.
POLL_S = 1.0


class RoleFailure(RuntimeError):
    """A rank of a role died, raised or did not answer; the message names the role, rank, node and call."""


class CallTimeout(RoleFailure):
    """A rank did not answer a call within cluster.call_timeout_s: hung, or far slower than it should be."""


class PreemptedInCall(RuntimeError):
    """A preemption signal came and a call in flight did not answer within cluster.preemption_wait_s of it:
    the roles cannot save, so the iteration in flight is lost; the message names the call."""


@dataclass
class WaitLimits:
    """How long the driver waits for a group's calls, in seconds (the cluster.* keys of these names): a call
    while the roles start (the actors' processes, process groups, models loaded), any later call, and any call
    once a preemption has been signalled to `preemption` (the driver's `trainer.preemption.PreemptionFlag`, or
    anything with its `requested_at`)."""

    start_timeout_s: float = 3600.0
    call_timeout_s: float = 1800.0
    preemption_wait_s: float = 240.0
    preemption: Any = None


@dataclass
class PendingCall:
    """A method call in flight on every rank of one group."""

    group: "ActorGroup"
    method: str
    refs: list
    started: float = field(default_factory=time.monotonic)  # its time limit counts from here
    limit: str = "call_timeout_s"  # the WaitLimits field that bounds it


class ActorGroup:
    def __init__(self, role: str, worker_cls: type, world_size: int, placement, cfg, env: Optional[dict] = None,
                 limits: Optional[WaitLimits] = None):
        self.role, self.world_size = role, world_size
        self.limits = limits or limits_of(cfg)
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
        start = "start_timeout_s"  # the first call also waits for the actors' processes to start
        addr, port = wait_all([PendingCall(self, "rendezvous", [self.actors[0].rendezvous.remote()], limit=start)])[0][0]
        wait_all([PendingCall(self, "init_process_group",
                              [a.init_process_group.remote(addr, port) for a in self.actors], limit=start)])
        rows = wait_all([PendingCall(self, "describe", [a.describe.remote() for a in self.actors], limit=start)])[0]
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


def limits_of(cfg, preemption=None) -> WaitLimits:
    """A PPO config's wait limits (cluster.*)."""
    c = cfg.cluster
    return WaitLimits(c.start_timeout_s, c.call_timeout_s, c.preemption_wait_s, preemption)


def wait_all(pending: list[PendingCall]) -> list[list]:
    """Results of several groups' calls (each a list by rank), failing fast: the first rank that
    dies or raises ends the wait with a RoleFailure, since its peers may be blocked in a collective
    that will never complete. A rank that has not answered within its group's call timeout ends it
    with a CallTimeout, and once a preemption signal has come, one that has not answered within the
    preemption wait of it with PreemptedInCall; each names the role, rank, node and call."""
    where = {}
    for i, p in enumerate(pending):
        for rank, ref in enumerate(p.refs):
            where[ref] = (i, rank)
    results = [[None] * len(p.refs) for p in pending]
    remaining = list(where)
    while remaining:
        _check_deadlines(pending, [where[ref] for ref in remaining])
        done, remaining = ray.wait(remaining, num_returns=1, timeout=POLL_S)
        if not done:
            continue
        ref = done[0]
        i, rank = where[ref]
        try:
            results[i][rank] = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as err:
            cause = str(err).strip().splitlines()
            summary = next((line for line in reversed(cause) if line.strip()), type(err).__name__)
            raise RoleFailure(f"{_rank_name(pending[i], rank)} failed in {pending[i].method}: "
                              f"{type(err).__name__}: {summary}") from err
    return results


def _rank_name(p: PendingCall, rank: int) -> str:
    node = p.group.nodes[rank] if rank < len(p.group.nodes) else "?"
    return f"{p.group.role} rank {rank} on node {node}"


def _check_deadlines(pending: list[PendingCall], waiting: list[tuple[int, int]]) -> None:
    """Raise for the first call still `waiting` on (call index, rank) that is past a limit."""
    now = time.monotonic()
    for i, p in enumerate(pending):
        ranks = [rank for j, rank in waiting if j == i]
        if not ranks:
            continue
        limits = p.group.limits
        also = f" (nor did rank{'s' if len(ranks) > 2 else ''} {', '.join(map(str, ranks[1:]))})" if ranks[1:] else ""
        if now - p.started > getattr(limits, p.limit):
            raise CallTimeout(f"{_rank_name(p, ranks[0])} did not answer {p.method} within cluster.{p.limit}="
                              f"{getattr(limits, p.limit):g}s{also}")
        signalled = getattr(limits.preemption, "requested_at", None)
        if signalled is not None and now - signalled > limits.preemption_wait_s:
            raise PreemptedInCall(f"{_rank_name(p, ranks[0])} did not answer {p.method} within "
                                  f"cluster.preemption_wait_s={limits.preemption_wait_s:g}s of the signal{also}")
