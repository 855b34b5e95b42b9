"""glibc malloc settings that keep freed activation memory in the process on CPU.

A CPU forward pass allocates and frees activations of a few MiB per operator (a 2048-token
prefill chunk of the tiny model makes [2048, 1408] float32 temporaries of 11 MiB). PyTorch's CPU
allocator is plain ``malloc``/``free``. With glibc's defaults such blocks are returned to the
kernel when freed (``munmap``, or a heap trim once more than twice the dynamic mmap threshold
is free at the top), so the next operator's output is fresh memory that page-faults on first
touch and is zeroed by the kernel: on the benchmark machine ~2,000 faults (4-7x slower
element-wise operators) per RoPE or SiLU-and-multiply of a 2048-token chunk.

:func:`keep_freed_host_memory` raises ``M_MMAP_THRESHOLD`` (blocks below it come from the heap)
and ``M_TRIM_THRESHOLD`` (free heap memory kept before trimming), the in-process equivalent
of the ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables and of
PyTorch's CPU tuning advice to run with a caching allocator (jemalloc/tcmalloc). It is process
wide: in one process every user of ``malloc`` benefits (the benchmark's baselines too). Cost:
up to ``trim_threshold`` bytes of freed memory stay mapped. ``KUBEINFER_CPU_MALLOC_TUNING=0``
leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

#: Environment variable; "0" leaves glibc's malloc settings alone.
MALLOC_TUNING_ENV = "KUBEINFER_CPU_MALLOC_TUNING"
#: Blocks below this many bytes come from the heap instead of their own mmap.
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Bytes of free memory at the top of the heap kept before it is returned to the kernel.
TRIM_THRESHOLD = 128 * 1024 * 1024

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
_applied = False


def keep_freed_host_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds (once per process).

    Args:
        mmap_threshold: bytes; allocations smaller than this are served from the heap.
        trim_threshold: bytes of free heap kept before trimming.

    Returns:
        True when the settings are in force (now or from an earlier call); False when the C
        library is not glibc (no ``mallopt``), ``mallopt`` refused a value, or
        ``KUBEINFER_CPU_MALLOC_TUNING=0``.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get(MALLOC_TUNING_ENV, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    if ok:
        _applied = True
        log.info("glibc malloc: mmap threshold %d MiB, trim threshold %d MiB (freed activations stay mapped)",
                 mmap_threshold >> 20, trim_threshold >> 20)
    return ok
