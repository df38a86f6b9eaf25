"""When a ``prange`` kernel is worth waking the other threads for.

Every parallel region wakes Numba's workers (asleep after a pause; see minibert.threads.configure_omp_waiting) and
waits for them; on a small array that costs more than it saves (a [16, 384] LayerNorm: 19 µs on
two threads, 7.5 µs on one, measured in a loop). Below ``SERIAL_BELOW`` elements the kernel runs
on the calling thread only. ``numba.set_num_threads`` is per calling thread, so other threads of
the user's program are not affected.
"""
from __future__ import annotations

import numba

SERIAL_BELOW = 1 << 15  # elements


def launch(kernel, size, *args):
    """``kernel(*args)``, on one thread if ``size`` (the elements it touches) is small."""
    if size >= SERIAL_BELOW:
        return kernel(*args)
    n = numba.get_num_threads()
    if n == 1:
        return kernel(*args)
    numba.set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        numba.set_num_threads(n)
