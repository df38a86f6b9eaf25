"""One knob for both thread pools: Numba's (the parallel kernels) and the BLAS library's (the
matrix products, through threadpoolctl).

The forward pass alternates between the two — a GEMM, then a kernel, then a GEMM — never running
them at once, so giving both pools the same n threads uses n cores without oversubscribing them.
"""
from __future__ import annotations

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
