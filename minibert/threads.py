"""One knob for both thread pools: Numba's (the parallel kernels) and the BLAS library's (the
matrix products, through threadpoolctl).

The forward pass alternates between the two — a GEMM, then a kernel, then a GEMM — never running
them at once, so giving both pools the same n threads uses n cores without oversubscribing them.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

_blas_limiter = None  # the threadpoolctl limiter currently in force, kept so it is not collected


def max_threads() -> int:
    """The most threads Numba can use in this process (NUMBA_NUM_THREADS, fixed at import)."""
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


def set_num_threads(n: Optional[int]) -> int:
    """Use ``n`` threads for Numba kernels and for BLAS; ``None``: every core Numba may use.
    Returns the number set."""
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


SPIN_TIMEOUT = 20  # log2 of the cycles an idle OpenBLAS thread spins: 2^20, about 0.3 ms here


def bound_openblas_spinning(timeout: int = SPIN_TIMEOUT) -> list:
    """Make OpenBLAS's idle threads stop spinning after 2^``timeout`` cycles, in a process whose
    OpenBLAS is already loaded. Returns the paths of the libraries changed.

    Why: after every multithreaded BLAS call OpenBLAS's workers spin for 2^28 cycles (~0.1 s)
    waiting for more work, on the cores the next Numba kernel runs on; a single BLAS call per
    forward pass (the pooler's) keeps a core busy through all of it. Measured, bert-base (1, 16)
    with the small-N GEMM kernel: 59.5 ms per pass with the default spin, 36.4 ms bounded.
    OPENBLAS_THREAD_TIMEOUT sets this, but OpenBLAS reads it only when it loads, i.e. when NumPy
    is imported — before minibert in most scripts. So here the variable is set, OpenBLAS is told
    to read its environment again (``openblas_read_env``) and its thread pool is shut down
    (``blas_thread_shutdown_``, what OpenBLAS itself does in a forked child); the next BLAS call
    starts the pool again with the new timeout. Libraries without these entry points (other BLAS
    vendors, OpenMP builds) are left alone, as is a timeout the user set."""
    if "OPENBLAS_THREAD_TIMEOUT" in os.environ:
        return []
    os.environ["OPENBLAS_THREAD_TIMEOUT"] = str(timeout)
    changed = []
    for path, lib in openblas_pthreads_libraries():
        try:
            read_env, shutdown, current = lib.openblas_read_env, lib.blas_thread_shutdown_, lib.openblas_thread_timeout
        except AttributeError:
            continue
        read_env()
        if current() == timeout:
            shutdown()
            changed.append(path)
    return changed


def openblas_pthreads_libraries() -> list:
    """[(path, ctypes handle)] of the OpenBLAS libraries loaded in this process that run their own
    pthreads pool (threadpoolctl finds them; OpenMP builds are left out)."""
    import ctypes

    from threadpoolctl import threadpool_info

    found = []
    for info in threadpool_info():
        if info.get("internal_api") != "openblas" or info.get("threading_layer") != "pthreads":
            continue
        try:
            found.append((info["filepath"], ctypes.CDLL(info["filepath"])))
        except OSError:
            continue
    return found


# GOMP_SPINCOUNT: busy-wait iterations of an idle Numba worker, about 0.25 ms here. Long enough to
# keep the workers awake between a pass's kernels; 100_000 (~2.5 ms, the earlier value)
# timed the same passes (benchmarks.pool, pool-spin10000.json) but took a core from the program's
# own next BLAS call: a NumPy [768, 768] product right after a MiniLM (1, 16) pass took 7.28 ms
# against 5.11 with 10_000 (benchmarks.pool --after, pool-after.json)
SPIN_COUNT = 10_000


LAYER_PRIORITY = ("omp", "tbb", "workqueue")


def prefer_openmp_layer() -> str:
    """Ask Numba for its OpenMP threading layer first; returns the priority in force.

    Numba picks its layer when the first parallel kernel runs, TBB first if the ``tbb`` package is
    installed. minibert's one thread pool (:mod:`minibert.blaspool`) needs the OpenMP layer, and
    measured on 2 cores with tbb installed, MiniLM (1, 16) back to back took 4.55 ms a pass on TBB
    against 4.08 on OpenMP (mean of the faster half of 20 passes, ad hoc). A layer or priority the user chose (``NUMBA_THREADING_LAYER``,
    ``NUMBA_THREADING_LAYER_PRIORITY``) is kept, and nothing changes once the layer is chosen."""
    if "NUMBA_THREADING_LAYER" in os.environ or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ:
        return "user"
    os.environ["NUMBA_THREADING_LAYER_PRIORITY"] = " ".join(LAYER_PRIORITY)  # read when numba is imported
    numba = sys.modules.get("numba")
    if numba is not None:  # imported before minibert: its config has already read the environment
        numba.config.THREADING_LAYER_PRIORITY = list(LAYER_PRIORITY)
    return os.environ["NUMBA_THREADING_LAYER_PRIORITY"]


def configure_omp_waiting() -> str:
    """Choose how Numba's OpenMP workers wait between parallel regions; returns the setting made.

    Must run before Numba starts its OpenMP pool (libgomp reads the variables when it loads).
    - When OpenBLAS's jobs can run on Numba's pool during a forward pass (:mod:`minibert.blaspool`),
      there is one set of threads, and letting it spin for ``SPIN_COUNT`` iterations (~0.25 ms) keeps
      it awake from one kernel or GEMM to the next: ``GOMP_SPINCOUNT``.
    - Otherwise the BLAS library has threads of its own, and a spinning Numba worker takes the core
      they need (measured on 2 cores: MiniLM (8, 128) 348 ms per pass with spinning, 260 ms without):
      ``OMP_WAIT_POLICY=PASSIVE``.
    A value the user set for either variable is kept, and nothing is changed."""
    from .blaspool import _setters, enabled

    shared = enabled()  # read even when the user chose the wait policy: a mistyped switch fails at import
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return "user"
    import numpy  # noqa: F401  (loads NumPy's BLAS, which _setters looks for; OPENBLAS_THREAD_TIMEOUT is set by now)

    if shared and _setters():
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
        return f"GOMP_SPINCOUNT={SPIN_COUNT}"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "OMP_WAIT_POLICY=PASSIVE"
