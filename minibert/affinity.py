"""CPUs of their own for a forward pass's threads: each of Numba's OpenMP workers pinned to one CPU,
and the thread that runs the pass kept off those CPUs until the pass ends.

Why: on this kind of virtual machine, a worker woken after it had fallen asleep (any pause longer
than its spinning, ``GOMP_SPINCOUNT``) was often queued on the CPU of the thread that
woke it, not on the idle one; that thread then busy-waits at the end of the parallel region for
the worker that is queued behind it, until the scheduler ends its time slice. A two-thread
region doing nothing, after a pause of 3 ms / 10 ms / 0.3 s: 0.86 / 4.6 / 6.0 ms (medians of 15,
one process), and 0.09 / 0.13 / 0.16 ms with the worker and the caller on CPUs of their own.
MiniLM at (1, 16), two threads, this code against the commit before it, medians of 31 passes
of two processes run interleaved (ad hoc): after a 0.3 s pause 6.83 -> 5.65 ms, after a 5 ms
pause 12.20 -> 4.40 ms, back to back 3.87 / 4.01 ms (noise). How often a pass meets the slow wake
depends on what ran before it; ``python -m benchmarks.pool`` and ``--wake`` measure both settings.
ONNX Runtime pins its pool's threads too when it picks their number itself.

How: the first pass a thread runs with n threads runs a job on each thread of its OpenMP team
(:func:`minibert.blaspool.on_team`, the threads Numba's kernels and the pass's BLAS jobs run on);
worker i (i = 1 … n - 1) pins itself to the i-th CPU of the thread's allowed CPUs, ordered one per
physical core first (so workers get cores of their own before SMT siblings). For each outermost
pass (:func:`enter` / :func:`leave`, called by ``minibert.blaspool.shared``), the calling
thread's allowed CPUs become the rest (less the workers' siblings when that leaves any) and are
put back afterwards: its threads, and yours, are unchanged outside a pass. Only the outermost
block in the process does this: a pass that another thread runs at the same time runs unpinned.
Cost: ~9 µs a pass (three system calls); the pinning once per thread and thread count (~3 ms).

Scope: Linux, Numba's OpenMP layer (GNU libgomp), 2 or more threads, no more threads than allowed
CPUs. Off with ``MINIBERT_PIN_THREADS=0``, and when the user binds OpenMP threads
(``OMP_PROC_BIND``, ``OMP_PLACES``, ``GOMP_CPU_AFFINITY``). The trade-off of pinning: a worker can
no longer move off a CPU that another busy program also uses. Measured next to a neighbour busy
half or all of one CPU (``python -m benchmarks.pool --hog``), pinned passes were still the faster
(MiniLM (1, 16) back to back 3.0 vs 9.8 ms, 6.6 vs 22.2); a program pinned to a worker's very CPU
is the case to turn it off for.
"""
from __future__ import annotations

import os
import re
import sys
import threading
from typing import Dict, FrozenSet, List, Optional, Tuple

from .switches import switch

USER_BINDING = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")

# per thread (a thread's OpenMP team is its own, and dies with it): ``teams``, threads -> (the
# thread's allowed CPUs when that team was planned, the CPUs it runs a pass on, or None when the
# team cannot be pinned); ``held``, its CPUs before the pass it is running
_local = threading.local()
_enabled: Optional[bool] = None


def _teams() -> Dict[int, Tuple[FrozenSet[int], Optional[FrozenSet[int]]]]:
    teams = getattr(_local, "teams", None)
    if teams is None:
        teams = _local.teams = {}
    return teams


def enabled() -> bool:
    """``MINIBERT_PIN_THREADS`` (default on), on Linux, unless the user binds OpenMP's threads.
    Read once per process, when minibert is imported (as libgomp reads its variables once)."""
    global _enabled
    if _enabled is None:
        _enabled = (switch("MINIBERT_PIN_THREADS") and sys.platform.startswith("linux")
                    and hasattr(os, "sched_setaffinity") and not any(os.environ.get(v) for v in USER_BINDING))
    return _enabled


def keep_numba_thread_count() -> Optional[str]:
    """Put Numba's thread count in the environment (``NUMBA_NUM_THREADS``, the value Numba chose,
    unless the user set it), when pinning is on; returns the value, or None when nothing was set.

    Why: before it compiles a function, Numba reads its environment again if a ``NUMBA_*``
    variable changed since it last did (minibert's own at import when numba was imported first,
    or one the program sets), and without ``NUMBA_NUM_THREADS`` it counts the calling thread's
    allowed CPUs. During a pinned pass those are narrowed, so the count differs from the pool's
    and Numba raises "Cannot set NUMBA_NUM_THREADS to a different value once the threads have
    been launched": a kernel whose first use (cold cache) came in a pinned pass failed to compile,
    e.g. a float64 model's first pass after a float32 one with numba imported before minibert."""
    if not enabled() or "NUMBA_NUM_THREADS" in os.environ:
        return None
    import numba

    os.environ["NUMBA_NUM_THREADS"] = str(numba.config.NUMBA_NUM_THREADS)
    return os.environ["NUMBA_NUM_THREADS"]


def _siblings(cpu: int) -> List[int]:
    """The logical CPUs of ``cpu``'s physical core (from sysfs; just ``cpu`` if unreadable)."""
    try:
        with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
            text = f.read().strip()
    except OSError:
        return [cpu]
    found = []
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if m:
            lo = int(m.group(1))
            found.extend(range(lo, int(m.group(2) or lo) + 1))
    return sorted(found) or [cpu]


def order(cpus) -> List[int]:
    """``cpus`` one per physical core first (each core's first sibling, by CPU number), then the
    second siblings, and so on."""
    rank = {c: (_siblings(c) + [c]).index(c) for c in cpus}
    return sorted(cpus, key=lambda c: (rank[c], c))


def plan(allowed, n: int) -> Optional[Tuple[List[int], FrozenSet[int]]]:
    """(CPU of worker 1 … n - 1, CPUs of the calling thread during a pass) for a team of ``n``
    threads on ``allowed`` CPUs; None when there are fewer CPUs than threads."""
    cpus = order(allowed)
    if n < 2 or len(cpus) < n:
        return None
    workers = cpus[1:n]
    rest = set(allowed) - set(workers)
    spare = rest - {s for w in workers for s in _siblings(w)}
    return workers, frozenset(spare or rest)


def _pin_workers(n: int, workers: List[int], allowed: FrozenSet[int]) -> bool:
    """Pin thread i of the calling thread's team of ``n`` to ``workers[i - 1]``; True if every
    worker ran its job and was pinned. If one was not, every worker gets ``allowed`` back: a team
    is pinned whole or not at all."""
    from . import blaspool

    done, failed = set(), []

    def pin(cpus):
        def job(i):
            try:
                if i > 0:
                    os.sched_setaffinity(0, cpus(i))  # 0: the thread running this, worker i
                done.add(i)
            except Exception as e:  # noqa: BLE001  (ctypes would only print it)
                failed.append(e)
        return job

    if not blaspool.on_team(n, pin(lambda i: {workers[i - 1]})):
        return False
    if not failed and done == set(range(n)):
        return True
    blaspool.on_team(n, pin(lambda i: allowed))
    return False


def _team(allowed: FrozenSet[int], n: int):
    """(allowed, the calling thread's CPUs during a pass, or None if the team cannot be pinned),
    with the workers pinned; None when Numba's pool has not started yet (ask again next pass)."""
    import numba

    p = plan(allowed, n)
    if p is None:
        return allowed, None
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return None
    if layer != "omp" or not _pin_workers(n, p[0], allowed):
        return allowed, None
    return allowed, p[1]


def enter() -> Optional[FrozenSet[int]]:
    """At the start of an outermost forward pass: pin the calling thread's workers (once) and keep
    the calling thread off their CPUs. Returns the allowed CPUs to give back to :func:`leave`, or
    None when nothing was changed."""
    if not enabled():
        return None
    import numba

    n = numba.get_num_threads()
    if n < 2:
        return None
    try:
        allowed = frozenset(os.sched_getaffinity(0))
        teams = _teams()
        team = teams.get(n)
        if team is None or team[0] != allowed:  # new, or the thread's CPUs changed since
            team = _team(allowed, n)
            if team is not None:
                teams[n] = team
        if team is None or team[1] is None:
            return None
        os.sched_setaffinity(0, team[1])
        _local.held, _local.size = allowed, n
        return allowed
    except OSError:  # a CPU gone offline, a sandbox that forbids it: run unpinned
        return None


def leave(saved: Optional[FrozenSet[int]]) -> None:
    """At the end of the pass :func:`enter` began: give the calling thread its CPUs back."""
    if saved is not None:
        _local.held = _local.size = None
        try:
            os.sched_setaffinity(0, saved)
        except OSError:
            pass


def team_size() -> int:
    """The number of threads of the pass the calling thread is running pinned (between
    :func:`enter` and :func:`leave`), or 0 when it is not running one."""
    return getattr(_local, "size", None) or 0


def _after_fork_in_child():
    """A child forked during a pass: its one thread gets its CPUs back, and its OpenMP pool (new
    threads) is pinned again when it runs a pass."""
    saved = getattr(_local, "held", None)
    _local.held, _local.size, _local.teams = None, None, {}
    if saved is not None:
        try:
            os.sched_setaffinity(0, saved)
        except OSError:
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def pinned() -> Dict[int, Tuple[FrozenSet[int], Optional[FrozenSet[int]]]]:
    """The calling thread's teams planned so far: threads -> (its allowed CPUs then, the CPUs it
    runs a pass on, or None when that team could not be pinned)."""
    return dict(_teams())
