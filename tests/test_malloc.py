"""`trainer.malloc`: every tuneforge process keeps the memory a step frees (glibc), unless the user tuned the
allocator or asked for glibc's own behaviour."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from runs import REPO
from trainer.malloc import why_not_tuned

# A fresh process frees 20 x 8 MiB it wrote, then allocates and writes them again: the page faults of the second
# round (the kernel handing out zeroed pages again) are what the tuning saves.
SECOND_ROUND_FAULTS = """
import ctypes, resource
from trainer.malloc import keep_freed_memory
print(keep_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
def one_round(n=20, size=8 << 20):
    blocks = [libc.malloc(size) for _ in range(n)]
    for b in blocks:
        libc.memset(b, 1, size)
    for b in blocks:
        libc.free(b)
libc.free(libc.malloc(8 << 20))  # glibc's dynamic threshold adapts to the size first
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_round_faults(env: dict) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SECOND_ROUND_FAULTS], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), **env}, check=True).stdout.splitlines()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is glibc's mallopt")
def test_freed_memory_is_reused_without_faulting_it_in_again():
    said, faults = second_round_faults({})
    assert said.startswith("allocator keeps freed memory"), said
    pages = 20 * (8 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert faults < pages // 10, f"{faults} page faults in the second round ({pages} pages written)"
    said, faults = second_round_faults({"TUNEFORGE_GLIBC_MALLOC": "default"})
    assert said == "allocator left as it is: TUNEFORGE_GLIBC_MALLOC=default"
    assert faults > pages // 2, "glibc's own thresholds give the freed memory back (the test would prove nothing)"


def test_a_user_who_tuned_the_allocator_keeps_it():
    assert why_not_tuned({}, "glibc") is None
    assert why_not_tuned({"MALLOC_TRIM_THRESHOLD_": "0"}, "glibc") == "MALLOC_TRIM_THRESHOLD_ is set"
    assert why_not_tuned({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "glibc") == "GLIBC_TUNABLES sets glibc.malloc"
    assert "another allocator" in why_not_tuned({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, "glibc")
    assert why_not_tuned({}, "") == "the C library is not glibc"
