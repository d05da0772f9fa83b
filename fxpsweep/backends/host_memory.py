"""Freed host memory kept for reuse (glibc malloc) while a job runs, so that its batches' large tensors are
not page-faulted afresh.

glibc serves a block above its mmap threshold (128 KiB at start, rising to at
most 32 MiB as such blocks are freed) with fresh pages from the kernel and
gives them back when the block is freed, and trims the top of its heap once
more than its trim threshold is free there (128 KiB at start, later twice the
mmap threshold). A CNN's activations are such blocks (one MobileNetV2
register at batch 32: 147 MiB), so every batch faults in and zeroes every
page of every register again, float32 PyTorch as well as the fixed-point
engine. Inside ``freed_memory_kept`` both thresholds are at their largest:
blocks come from the heap, and freed ones stay there for the next batch of
the same shapes, for float32 PyTorch and the engine alike, at the cost of a
larger resident heap (``bench/throughput.py --no-keep-freed-memory`` measures
the difference).

Kept for one job only: a heap that never gives memory back grows with the
different sizes of unrelated work (a test process that then built every
torchvision model in turn was killed out of memory at 24 GiB). On leaving,
the thresholds are set to the values glibc's own rule reaches after large
blocks (32 MiB, 64 MiB) and the free memory goes back to the kernel
(``malloc_trim``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import platform
from collections.abc import Iterator

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGEST = 2**31 - 1  # mallopt takes an int; blocks above 2 GiB are still mapped on their own
MMAP_AFTER, TRIM_AFTER = 32 * 2**20, 64 * 2**20  # glibc's dynamic thresholds once 32 MiB blocks were freed
_depth = 0  # nested uses: only the outermost sets and restores


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None where the C library is another."""
    name = ctypes.util.find_library("c") if platform.libc_ver()[0] == "glibc" else None
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def _thresholds(libc: ctypes.CDLL, mmap: int, trim: int) -> bool:
    return libc.mallopt(M_MMAP_THRESHOLD, mmap) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim) == 1


@contextlib.contextmanager
def freed_memory_kept(enabled: bool = True) -> Iterator[bool]:
    """Inside, glibc malloc keeps freed memory for reuse (see the module docstring); yields whether it
    does (False where ``enabled`` is false, the C library is not glibc, or glibc refused a threshold)."""
    global _depth
    libc = _libc() if enabled else None
    if libc is None:
        yield False
        return
    if _depth == 0 and not _thresholds(libc, LARGEST, LARGEST):
        log.warning("glibc refused the malloc thresholds; large tensors are page-faulted afresh every batch")
        _thresholds(libc, MMAP_AFTER, TRIM_AFTER)
        yield False
        return
    _depth += 1
    try:
        yield True
    finally:
        _depth -= 1
        if _depth == 0:
            _thresholds(libc, MMAP_AFTER, TRIM_AFTER)
            libc.malloc_trim(0)
