"""When a ``prange`` kernel is worth waking the other threads for.

Every parallel region needs Numba's workers. When they sleep between regions
(``OMP_WAIT_POLICY=PASSIVE``, minibert's choice when OpenBLAS keeps a pool of its own: see
minibert.threads.configure_omp_waiting) each region pays for waking them, and on a small array
that costs more than it saves: a [16, 384] LayerNorm took 19 µs on two threads and 7.5 µs on one,
measured in a loop. So below ``SERIAL_BELOW`` elements the kernel then runs on the calling thread
only. When the workers spin between regions (``GOMP_SPINCOUNT``, minibert's choice when the BLAS
jobs share Numba's pool) a region costs ~5 µs on two threads and going serial costs more than it
saves (switching the thread count is itself ~5 µs): [1, 384] LayerNorm 5.2 µs parallel, 9.5 µs
serial; [16, 384] 6.1 against 11.6. Then every input runs on all threads.
``numba.set_num_threads`` is per calling thread, so other threads of the user's program are not
affected.
"""
from __future__ import annotations

import os

import numba

SERIAL_BELOW = 1 << 15  # elements, when the workers sleep between regions


def workers_spin(env=os.environ) -> bool:
    """Whether libgomp's idle workers busy-wait, from the variables it read when it loaded (the
    process environment, which minibert sets before any kernel runs). libgomp spins unless told
    ``OMP_WAIT_POLICY=PASSIVE``; ``GOMP_SPINCOUNT``, when set, overrides the policy."""
    spin = env.get("GOMP_SPINCOUNT")
    if spin is not None:
        spin = spin.strip().lower()
        if spin in ("infinite", "infinity"):
            return True
        try:
            return float(spin.rstrip("kmgt") or 0) > 0
        except ValueError:
            pass  # libgomp ignores a value it cannot parse
    return env.get("OMP_WAIT_POLICY", "").strip().upper() != "PASSIVE"


def serial_below() -> int:
    """Inputs with fewer elements run on one thread: ``SERIAL_BELOW`` if the workers sleep, else 0."""
    global _serial_below
    if _serial_below is None:
        _serial_below = 0 if workers_spin() else SERIAL_BELOW
    return _serial_below


_serial_below = None


def launch(kernel, size, *args):
    """``kernel(*args)``, on one thread if ``size`` (the elements it touches) is small and the
    workers would have to be woken for it."""
    if size >= serial_below():
        return kernel(*args)
    n = numba.get_num_threads()
    if n == 1:
        return kernel(*args)
    numba.set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(n)
