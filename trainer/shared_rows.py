"""Averaging one flat CPU buffer over the ranks of a group that share a host, through shared memory.

gloo all-reduces over loopback TCP, each rank copying the whole buffer through the kernel; on the CPU the copies
and the wait are most of it (its cost and this one's at the compute-bound bench size: docs/benchmarks.md). Here
the ranks' buffers are the rows of one (ranks, N) tensor mapped from a file in /dev/shm that every rank maps and
nobody keeps (it is unlinked once mapped, so a crash leaves nothing behind). Backward writes a rank's gradients
straight into its row; averaging is a barrier, each rank summing its share of the columns over the rows in rank
order and writing the mean into every row, and a barrier. The result is the same in every row, with the same
floating-point sum on every rank.

Used where every rank of the group maps the same file; otherwise `shared_rows` says why not and the caller
all-reduces as before (ranks on several hosts, a /dev/shm too small, a GPU buffer)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist

SHM_DIR = "/dev/shm"


@dataclass
class SharedRows:
    rows: torch.Tensor  # (ranks, N), the same memory in every rank of `group`
    rank: int  # this process's row
    group: object

    @property
    def mine(self) -> torch.Tensor:
        return self.rows[self.rank]  # (N,)

    def average(self) -> None:
        """Every row becomes the mean of the rows. Each rank calls it once its row is written."""
        ranks, n = self.rows.shape
        lo, hi = n * self.rank // ranks, n * (self.rank + 1) // ranks
        share = self.rows[:, lo:hi]  # (ranks, this rank's columns)
        dist.barrier(group=self.group)  # every row written
        mean = share[0]
        for k in range(1, ranks):  # in rank order on every share, so the sum does not depend on who computes it
            mean.add_(share[k])
        mean.div_(ranks)
        for k in range(1, ranks):
            share[k].copy_(mean)
        dist.barrier(group=self.group)  # every share written to every row


def shared_rows(numel: int, dtype: torch.dtype, group) -> Union[SharedRows, str]:
    """A (ranks, numel) tensor of zeros (a new file's) that the group's ranks share, or why there is none.
    Collective: every rank of `group` calls it."""
    rank, ranks = dist.get_rank(group), dist.get_world_size(group)
    nbytes = ranks * numel * torch.empty((), dtype=dtype).element_size()
    offer: list[Optional[str]] = [None, None]  # (path, why not)
    if rank == 0:
        offer = _create(nbytes)
    dist.broadcast_object_list(offer, src=dist.get_global_rank(group, 0), group=group)
    path, why_not = offer
    rows = None
    if path is not None and os.path.isfile(path):  # not there: this rank sees another host's (or container's) /dev/shm
        storage = torch.UntypedStorage.from_file(path, shared=True, nbytes=nbytes)
        rows = torch.empty(0, dtype=dtype).set_(storage, 0, (ranks, numel))
    mapped = torch.tensor([int(rows is not None)])
    dist.all_reduce(mapped, op=dist.ReduceOp.MIN, group=group)  # every rank mapped it, or none uses it
    if rank == 0 and path is not None:
        os.unlink(path)  # after the all-reduce: every rank that could open it has
    if why_not is None and not mapped.item():
        why_not = f"the {ranks} ranks do not share {SHM_DIR} (several hosts)"
    if why_not is not None:
        return why_not
    return SharedRows(rows=rows, rank=rank, group=group)


def _create(nbytes: int) -> list[Optional[str]]:
    """[path, None] for a file of `nbytes` allocated in /dev/shm (allocated, so a full /dev/shm shows here and not
    as a bus error at the first write), or [None, why not]."""
    if not os.path.isdir(SHM_DIR) or not hasattr(os, "posix_fallocate"):
        return [None, f"no {SHM_DIR}"]
    path = os.path.join(SHM_DIR, f"tuneforge-rows-{os.getpid()}-{secrets.token_hex(6)}")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except OSError as err:
        return [None, f"{SHM_DIR} is not writable ({err.strerror})"]
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as err:
        os.unlink(path)
        return [None, f"{SHM_DIR} has no room for {nbytes / 2**30:.2f} GiB ({err.strerror})"]
    finally:
        os.close(fd)
    return [path, None]
