"""Freed host memory kept for reuse (glibc malloc), so that a batch's large tensors are not page-faulted afresh.

glibc serves a block above its mmap threshold (128 KiB at start, rising to at
most 32 MiB as such blocks are freed) with fresh pages from the kernel and
gives them back when the block is freed, and trims the top of its heap once
128 KiB or more there is free. A CNN's activations are such blocks (one
MobileNetV2 register at batch 32: 147 MiB), so every batch faults in and
zeroes every page of every register again, float32 PyTorch as well as the
fixed-point engine. ``keep_freed_memory`` sets both thresholds to their
largest: blocks come from the heap, and freed ones stay there for the next
batch. On a 2-core Xeon (``bench/throughput.py --models mobilenet_v2``, with
and without ``--no-keep-freed-memory``; batch 32, 2 threads): float32 123 ->
217 images/s, 8-bit exact 120 -> 198 (``bench/results/throughput-cpu-avx512-vnni.md``),
the resident memory of 12 such batches 1.4 -> 2.1 GiB (ad hoc: what it frees is kept, not
given back). The setting is the process's (every library's allocations);
the job applies it on the CPU unless ``device.keep_freed_memory=false``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGEST = 2**31 - 1  # mallopt takes an int; blocks above 2 GiB are still mapped on their own


@functools.cache  # once per process: the setting holds until it ends
def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse (see the module docstring); whether it took effect
    (False where the C library is not glibc, or glibc refused a threshold)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    mallopt = ctypes.CDLL(name).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(M_MMAP_THRESHOLD, LARGEST) == 1 and mallopt(M_TRIM_THRESHOLD, LARGEST) == 1
    if not applied:
        log.warning("glibc refused the malloc thresholds; large tensors are page-faulted afresh every batch")
    return applied
