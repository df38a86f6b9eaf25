"""Everything minibert does to the process, in one place: the environment the thread pools read
when they load, the thread count, malloc's thresholds, and what a forked child may do.

model.py and kernels/ import nothing from here. :func:`configure` runs once, when minibert is
imported; :func:`enter` runs at the start of every model or module call (``Module.__call__``).
docs/runtime.md lists every environment variable minibert reads or sets.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Optional

# Numba's OpenMP workers busy-wait this many iterations (~0.25 ms here) after a parallel region
# before sleeping: long enough to stay awake from one kernel of a pass to the next, short enough
# not to hold a core when the program goes on with something else.
SPIN_COUNT = 10_000
# OpenBLAS's idle threads spin 2^28 cycles (~0.1 s) after each call by default, on the cores the
# next Numba kernel needs; 2^20 (~0.3 ms). Read when NumPy loads OpenBLAS, so only set if it has not.
OPENBLAS_TIMEOUT = 20
# Numba picks TBB first when the tbb package is installed; its OpenMP layer is the faster here.
LAYER_PRIORITY = "omp tbb workqueue"

ON, OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def switch(name: str, default: bool = True) -> bool:
    """The environment variable ``name`` as a bool; unset or empty: ``default``. A value that is
    neither on nor off is an error, not silently "on"."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in ON:
        return True
    if value in OFF:
        return False
    raise ValueError(f"environment variable {name}={raw!r}; expected 1 or 0 (also true/false, yes/no, on/off)")


def configure() -> None:
    """Set the pools' environment before they load; every value the user set is kept."""
    env = os.environ
    if "numpy" not in sys.modules:
        env.setdefault("OPENBLAS_THREAD_TIMEOUT", str(OPENBLAS_TIMEOUT))
    if "OMP_WAIT_POLICY" not in env:
        env.setdefault("GOMP_SPINCOUNT", str(SPIN_COUNT))
    if "NUMBA_THREADING_LAYER" not in env and "NUMBA_THREADING_LAYER_PRIORITY" not in env:
        env["NUMBA_THREADING_LAYER_PRIORITY"] = LAYER_PRIORITY
        numba = sys.modules.get("numba")
        if numba is not None:  # imported before minibert: its config has read the environment already
            numba.config.THREADING_LAYER_PRIORITY = LAYER_PRIORITY.split()
    switch("MINIBERT_KEEP_FREED_MEMORY")  # a mistyped value fails at import, not in the first call
    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)


# -- fork ------------------------------------------------------------------------------------------
_forked_from: Optional[int] = None  # the parent's pid, when it had started GNU OpenMP's pool


def _openmp_started() -> bool:
    """Whether this process has started Numba's GNU OpenMP pool, which does not survive a fork."""
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    if parallel is None or not getattr(parallel, "_is_initialized", False):
        return False
    try:
        import numba

        if numba.threading_layer() != "omp":
            return False
        from numba.np.ufunc import omppool

        return omppool.openmp_vendor == "GNU"
    except (ValueError, ImportError, AttributeError):
        return False


def _after_fork_in_child() -> None:
    global _forked_from
    if _forked_from is None and _openmp_started():
        _forked_from = os.getppid()


def enter() -> None:
    """At the start of a call: the checks and one-time set-up a forward pass needs."""
    if _forked_from is not None:
        raise RuntimeError(
            f"this process was forked from process {_forked_from} after minibert had run there; the "
            "parallel kernels' thread pool (GNU OpenMP) does not survive a fork, and a kernel here would "
            "kill the process. Start worker processes with 'spawn' or 'forkserver' (multiprocessing."
            "get_context('spawn')), or fork before the first forward pass")
    if _malloc is None:
        keep_freed_memory()


# -- threads ---------------------------------------------------------------------------------------
_blas_limiter = None  # the threadpoolctl limiter in force, kept so it is not collected


def max_threads() -> int:
    """The most threads Numba can use in this process (NUMBA_NUM_THREADS, fixed at import)."""
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def set_num_threads(n: Optional[int]) -> int:
    """Use ``n`` threads for Numba kernels and for BLAS; ``None``: every core Numba may use.
    Numba's count is per calling thread (a new thread starts with all of them). Returns ``n``."""
    global _blas_limiter
    import numba
    from threadpoolctl import threadpool_limits

    top = max_threads()
    if n is None:
        n = top
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"threads={n!r}; expected a positive integer")
    if n > top:
        raise ValueError(f"threads={n} exceeds the {top} threads Numba can use here "
                         "(NUMBA_NUM_THREADS, which defaults to the number of cores)")
    numba.set_num_threads(n)
    _blas_limiter = threadpool_limits(limits=n, user_api="blas")
    return n


def get_num_threads() -> dict:
    """{"numba": n, "blas": [threads of each BLAS library loaded]}."""
    import numba
    from threadpoolctl import threadpool_info

    return {"numba": int(numba.get_num_threads()),
            "blas": [int(i["num_threads"]) for i in threadpool_info() if i.get("user_api") == "blas"]}


# -- memory ----------------------------------------------------------------------------------------
# glibc serves big blocks with fresh mmaps and trims freed memory at the top of the heap, so each
# layer's activations came back as new zeroed pages (~40,000 page faults per bert-base (8, 128)
# pass); raising both thresholds makes it reuse the freed blocks, as PyTorch's caching allocator does.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP = 32 << 20  # glibc's largest allowed mmap threshold on 64-bit
TRIM = 512 << 20
_malloc: Optional[bool] = None  # None: not tried yet; else whether the thresholds are set


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds, once per process (``MINIBERT_KEEP_FREED_MEMORY=0``:
    leave malloc as it is); True if they are set. Linux with glibc only."""
    global _malloc
    if _malloc is None:
        _malloc = _mallopt() if switch("MINIBERT_KEEP_FREED_MEMORY") and sys.platform.startswith("linux") else False
    return _malloc


def _mallopt() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM))
