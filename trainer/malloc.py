"""glibc's allocator told to keep the memory a training process frees, for the next step to reuse.

By default glibc serves every allocation over its dynamic threshold (128 KiB at start, at most 32 MiB) with a fresh
`mmap` and gives it back on `free`, and trims freed memory off the top of its heap. A training step allocates and
frees the same activations, gradients and logits every step, so on a CPU each step faulted all of them in again from
pages the kernel zeroes: about a tenth of a medium-size policy update went to page faults (docs/benchmarks.md, "The
allocator keeps what a step frees"). Fixed thresholds keep the freed memory in the heap, where the next step reuses
it; the process's peak memory is what it was.

Light: no torch import (every process calls this first, `trainer.cli.prepare_process`).
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Optional

# mallopt's parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
# Allocations up to this size come from the heap, which keeps them when freed. 32 MiB is the most glibc takes on a
# 64-bit system (HEAP_MAX_SIZE / 2); larger ones stay an mmap each.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = (1 << 31) - 1  # mallopt takes an int: free memory at the heap's top is kept up to 2 GiB
TOP_PAD = 64 << 20  # each extension of the heap asks the kernel for this much extra (address space, not pages)
SETTINGS = {M_MMAP_THRESHOLD: MMAP_THRESHOLD, M_TRIM_THRESHOLD: TRIM_THRESHOLD, M_TOP_PAD: TOP_PAD}
OPT_OUT_ENV = "TUNEFORGE_GLIBC_MALLOC"  # =default: glibc's own dynamic thresholds (what the benches compare with)
# A user who tunes glibc's allocator, or brings another one, keeps what they chose.
USER_TUNING_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def why_not_tuned(env: dict, libc: str) -> Optional[str]:
    """Why this process keeps its allocator as it is (None: tune glibc's). `libc`: `platform.libc_ver()[0]`."""
    if libc != "glibc":
        return f"the C library is {libc or 'not glibc'}"
    if env.get(OPT_OUT_ENV) == "default":
        return f"{OPT_OUT_ENV}=default"
    if set_by := [k for k in USER_TUNING_ENV if k in env]:
        return f"{set_by[0]} is set"
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc"
    if "malloc" in env.get("LD_PRELOAD", ""):
        return f"LD_PRELOAD brings another allocator ({env['LD_PRELOAD']})"
    return None


def keep_freed_memory() -> str:
    """Fix glibc's thresholds for this process (unless `why_not_tuned`); what it did, in words."""
    reason = why_not_tuned(dict(os.environ), platform.libc_ver()[0])
    if reason is not None:
        return f"allocator left as it is: {reason}"
    mallopt = ctypes.CDLL(None).mallopt
    failed = [param for param, value in SETTINGS.items() if mallopt(param, value) != 1]
    if failed:
        return f"allocator partly tuned: glibc refused mallopt({failed[0]}, {SETTINGS[failed[0]]})"
    return f"allocator keeps freed memory (glibc, mmap threshold {MMAP_THRESHOLD >> 20} MiB)"
