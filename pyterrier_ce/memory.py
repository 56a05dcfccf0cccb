"""Memory: telling out-of-memory errors apart, freeing what a failed attempt left, and keeping
freed memory for reuse between training steps.

``keep_freed_memory``: each training step allocates and frees the same large activation buffers.
By default glibc serves blocks above a (dynamic) threshold with mmap and unmaps them when freed,
so every step pays page faults to map and zero them again: on a 2-core CPU that was about 40% of
the training time, spent in the kernel. Raising the mmap and trim thresholds keeps those pages in
the heap for reuse. A no-op where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Optional

import torch

# Messages of out-of-memory errors raised as plain RuntimeErrors (older CUDA paths, the CPU allocator).
_OOM_MESSAGES = ("out of memory", "can't allocate memory")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an out-of-memory error of PyTorch (CUDA or CPU allocator)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _OOM_MESSAGES)


def free_memory(device: Optional[torch.device]) -> None:
    """Frees what an out-of-memory error left behind, so that a retry finds the memory."""
    gc.collect()  # tensors held by reference cycles through the error's traceback
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


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
