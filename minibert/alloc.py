"""Keep freed activation memory in the process instead of handing it back to the OS at once.

glibc's malloc serves big blocks (above a threshold that grows to at most 32 MB) with fresh
``mmap``s and returns freed memory at the top of the heap to the OS once it exceeds the trim
threshold. A forward pass allocates and frees the same activation sizes layer after layer, so
every layer's arrays came back as new pages, each zeroed by the kernel on first touch: bert-base
at (8, 128) took about 40,000 page faults per forward pass, about 10 % of its time
(``python -m benchmarks.breakdown`` shows the per-op effect). Raising both thresholds once makes
glibc reuse the freed blocks, as PyTorch's caching allocator does for its tensors.

Called when the first model is built. Linux with glibc only (elsewhere it does nothing); set
``MINIBERT_KEEP_FREED_MEMORY=0`` to leave malloc as it was. The cost: up to ``TRIM`` bytes of freed
memory stay mapped in the process after a forward pass.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

from .switches import switch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP = 32 << 20  # glibc's largest allowed mmap threshold on 64-bit
TRIM = 512 << 20

_done = False


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if they were set."""
    global _done
    if _done:
        return True
    if not switch("MINIBERT_KEEP_FREED_MEMORY") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM))
    return _done
