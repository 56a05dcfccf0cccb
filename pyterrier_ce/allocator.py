"""Keeps glibc from handing large freed blocks back to the kernel between training steps.

Each training step allocates and frees the same large activation buffers. By default glibc
serves blocks above a (dynamic) threshold with mmap and unmaps them when freed, so every step
pays page faults to map and zero them again: on a 2-core CPU that was about 40% of the training
time, spent in the kernel. Raising the mmap and trim thresholds keeps those pages in the heap
for reuse. A no-op where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 34) -> bool:
    """Raises glibc's mmap and trim thresholds once per process; returns whether it applied."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # Some glibc builds refuse an mmap threshold above 32 MiB: fall back to that.
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) or bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20))
    ok = ok and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    _done = ok
    return ok
