"""Everything minibert does to the process, in one place: the environment the thread pools read
when they load, the thread count, malloc's thresholds, and what a forked child may do.

model.py and kernels/ import nothing from here. :func:`configure` runs once, when minibert is
imported; every model or module call runs inside :func:`running` (``Module.__call__``,
``BertModel.run``). docs/runtime.md lists every environment variable minibert reads or sets.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import sys
import tempfile
import threading
from typing import Dict, List, Optional, Tuple

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
    for name in ("MINIBERT_KEEP_FREED_MEMORY", "MINIBERT_PIN_THREADS", "MINIBERT_BACKGROUND_COMPILE"):
        switch(name)  # a mistyped value fails at import, not in the first call
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
    global _forked_from, _lock, _turns, _state
    if _forked_from is None and _openmp_started():
        _forked_from = os.getppid()
    for fd in _files.values():  # the parent's claim files stay the parent's
        if fd is not None:
            os.close(fd)
    _files.clear()
    # only the forking thread lives on
    _lock, _turns, _state, _busy[0] = threading.Lock(), threading.Lock(), _Depth(), 0


class running:
    """``with running():`` around a call: :func:`enter`; for a thread's outermost call, its turn
    when the threading layer is not thread-safe (see :func:`threadsafe_layer`), and for the
    outermost call in the process, the pass's threads on CPUs of their own (see :func:`_pin`)."""

    __slots__ = ("pinned", "turn")

    def __enter__(self):
        enter()
        self.pinned = None
        if _state.depth == 0:
            self.turn = not threadsafe_layer()
            if self.turn:
                _turns.acquire()
            with _lock:
                outermost = _busy[0] == 0
                _busy[0] += 1
            try:
                self.pinned = _pin() if outermost else False
            except BaseException:
                with _lock:
                    _busy[0] -= 1
                if self.turn:
                    _turns.release()
                raise
        _state.depth += 1

    def __exit__(self, *exc):
        _state.depth -= 1
        if self.pinned is None:
            return
        try:
            if self.pinned:
                before, cpus = self.pinned
                os.sched_setaffinity(0, before)
                _release(cpus)
        finally:
            with _lock:
                _busy[0] -= 1
            if self.turn:
                _turns.release()


# The kernels release the GIL, so threads' passes run at once. Numba's OpenMP and TBB layers take
# that; its workqueue layer (the fallback when neither loads) aborts the process on concurrent use,
# so there each thread's outermost call waits for its turn.
_turns = threading.Lock()
_threadsafe: Optional[bool] = None


def threadsafe_layer() -> bool:
    """Whether Numba's threading layer (started here if no kernel has yet) runs parallel kernels
    from several threads at once."""
    global _threadsafe
    if _threadsafe is None:
        with _turns:
            if _threadsafe is None:
                import numba
                from numba.np.ufunc import parallel

                parallel._launch_threads()
                _threadsafe = numba.threading_layer() != "workqueue"
    return _threadsafe


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


# -- pinning --------------------------------------------------------------------------------------
# On these virtual machines a Numba worker woken after a pause (longer than GOMP_SPINCOUNT) was often
# queued on the CPU of the thread that woke it, which then spun at the end of the region waiting for
# it: MiniLM (1, 16) after 0.3 s idle took 15 ms instead of 4.5. So during a pass each worker runs
# on a CPU of its own and the calling thread on another, CPUs the pass claims with a lock file each
# so that no other process pins onto them meanwhile (it then runs as it is). Off when the user binds
# OpenMP threads, or with MINIBERT_PIN_THREADS=0.
USER_BINDING = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY")
_lock = threading.Lock()
_busy = [0]  # outermost calls running in the process; only one at a time pins
_files: Dict[int, Optional[int]] = {}  # CPU -> fd of its claim file (None: cannot be opened)


class _Team:
    """A thread's OpenMP team of n: its threads' ids (the caller first), the CPUs it may use in
    the order to claim them, and the CPUs its workers are pinned to now (None: not pinned)."""

    __slots__ = ("tids", "order", "pinned")

    def __init__(self, tids, order):
        self.tids, self.order, self.pinned = tids, order, None


class _Depth(threading.local):
    depth = 0  # nested calls (a task head calls BertModel.run) running on this thread

    def __init__(self):
        self.teams: Dict[int, Optional[_Team]] = {}  # n -> this thread's team of n, None: not pinned


_state = _Depth()


def _pin():
    """Claim CPUs for this pass and put the team on them: each worker on one, the caller on
    another. Returns (the caller's CPUs before, the claimed CPUs), or False to run as it is."""
    n, teams = get_num_threads(), _state.teams
    if n not in teams:
        teams[n] = _plan_team(n)
    team = teams[n]
    if team is None:
        return False
    cpus = _acquire(team.order, n)
    try:
        if cpus is None:  # another process has these CPUs: let the workers go where the OS puts them
            if team.pinned is not None:
                team.pinned = None
                for tid in team.tids[1:]:
                    os.sched_setaffinity(tid, team.order)
            return False
        if team.pinned != cpus:
            for tid, cpu in zip(team.tids[1:], cpus[1:]):
                os.sched_setaffinity(tid, {cpu})
            team.pinned = cpus
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cpus[:1])
    except OSError:  # a worker gone (its team was rebuilt): plan it again on the next pass
        del teams[n]
        if cpus is not None:
            _release(cpus)
        return False
    return before, cpus


def _plan_team(n: int) -> Optional[_Team]:
    if (n < 2 or not switch("MINIBERT_PIN_THREADS") or any(os.environ.get(v) for v in USER_BINDING)
            or not hasattr(os, "sched_setaffinity") or not _omp_layer()):
        return None
    order = sorted(os.sched_getaffinity(0), key=_core_first)
    tids = _team_tids(n) if len(order) >= n else None
    return None if tids is None else _Team(tids, order)


def _omp_layer() -> bool:
    try:
        import numba

        _team_tids(1)  # starts the threading layer if no kernel has yet
        return numba.threading_layer() == "omp"
    except (ValueError, ImportError, OSError, AttributeError):
        return False


def _team_tids(n: int) -> Optional[List[int]]:
    """The Linux thread ids of the calling thread's team of ``n`` (index 0: the caller), or None."""
    import numpy as np

    if not hasattr(ctypes.CDLL(None), "gettid"):  # glibc before 2.30, or not glibc
        return None
    from ._tids import record

    out = np.zeros(n, dtype=np.int64)
    record(out)
    tids = [int(t) for t in out]
    if tids[0] != threading.get_native_id() or 0 in tids or len(set(tids)) != n:
        return None  # some thread ran no iteration: leave the team as it is
    return tids


def _acquire(order, n: int) -> Optional[Tuple[int, ...]]:
    """Lock the claim files of the first ``n`` CPUs in ``order`` that no other process holds (a
    CPU's file is ``$TMPDIR/minibert-cpus/N``); None, with nothing held, if there are not n."""
    got = []
    for cpu in order:
        fd = _files.get(cpu, -1)
        if fd == -1:
            fd = _files[cpu] = _open_claim(cpu)
        if fd is None:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another process is running a pass on it
            continue
        got.append(cpu)
        if len(got) == n:
            return tuple(got)
    _release(got)
    return None


def _release(cpus) -> None:
    for cpu in cpus:
        fcntl.flock(_files[cpu], fcntl.LOCK_UN)


def _open_claim(cpu: int) -> Optional[int]:
    folder = os.path.join(tempfile.gettempdir(), "minibert-cpus")
    try:
        os.makedirs(folder, exist_ok=True)
        return os.open(os.path.join(folder, str(cpu)), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return None


def _core_first(cpu: int):
    """Sort key: the first CPU of each physical core before its SMT siblings."""
    try:
        with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
            first = int(f.read().replace("-", ",").split(",")[0])
    except (OSError, ValueError):
        first = cpu
    return (cpu != first, cpu)


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


def get_num_threads() -> int:
    """The threads this thread's kernels run on, as ``torch.get_num_threads()``
    (:func:`thread_pools` has each pool's count)."""
    import numba

    return int(numba.get_num_threads())


def thread_pools() -> dict:
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


def release_freed_memory() -> bool:
    """Give the freed memory malloc keeps for reuse back to the OS (glibc's ``malloc_trim``), as
    after a warm-up whose passes are bigger than the ones that follow; True if it did. Linux with
    glibc only."""
    trim = _glibc("malloc_trim", ctypes.c_size_t) if sys.platform.startswith("linux") else None
    if trim is None:
        return False
    trim(0)
    return True


def _mallopt() -> bool:
    mallopt = _glibc("mallopt", ctypes.c_int, ctypes.c_int)
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, MMAP)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM))


def _glibc(name, *argtypes):
    """The C library's function ``name`` (returning int), or None where it has none (not glibc:
    musl has neither mallopt nor malloc_trim)."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), ctypes.c_int
    return fn


# -- first use: the kernels compile in another process -------------------------------------------
# Compiling the default kernels takes ~11 s, once per machine (Numba caches them on disk). On a cold
# cache a pass runs the NumPy kernels instead (within the parity tolerance, not the same bits; said
# once on stderr) while a detached `python -m minibert.warmup DTYPE` compiles them into the cache
# and leaves a marker there; the first pass after the marker appears loads them.
_ready: Dict[str, bool] = {}  # dtype -> the compiled kernels are in the cache (or compile here)
_warmups: Dict[str, object] = {}  # dtype -> the warm-up process this one started
_compile_here = False


def compile_here() -> None:
    """Compile the default kernels in this process at its first pass, whatever the cache holds
    (a server whose health check waits for them; the warm-up itself)."""
    global _compile_here
    _compile_here = True


def kernels_ready(dtype) -> bool:
    """Whether a pass in ``dtype`` runs the default (Numba) kernels now: True once they are in
    Numba's cache, or if the warm-up ended without leaving its marker (they then compile here),
    or always with ``MINIBERT_BACKGROUND_COMPILE=0``. On the first False, starts the warm-up
    process and says so on stderr."""
    import numpy as np

    name = np.dtype(dtype).name
    if _ready.get(name):
        return True
    background = not _compile_here and switch("MINIBERT_BACKGROUND_COMPILE")
    marker = ready_marker(name) if background else None
    warmup = _warmups.get(name)
    if marker is None or os.path.exists(marker) or (warmup is not None and warmup.poll() is not None):
        _ready[name] = True
        return True
    if warmup is None:
        import subprocess

        _warmups[name] = subprocess.Popen(
            [sys.executable, "-m", "minibert.warmup", name], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        print(f"minibert: compiling the {name} kernels for this machine in the background (once, about 15 s); "
              "until they are ready, passes run the NumPy kernels: the same results within 1e-4, not the "
              "same bits (MINIBERT_BACKGROUND_COMPILE=0 compiles them in this process instead)", file=sys.stderr)
    return False


def ready_marker(dtype: str) -> Optional[str]:
    """The file the warm-up leaves beside the kernels' Numba cache once ``dtype``'s are compiled,
    named for what the cache is keyed on (Numba's version, the CPU target, the kernels' sources);
    None if Numba does not say where its cache is (then kernels compile in the process, as usual)."""
    try:
        import hashlib

        import numba
        from numba.core.registry import cpu_target

        from .kernels import gemm

        folder = gemm._gemm_packed._cache._cache_path
        sources = sorted(os.scandir(os.path.dirname(gemm.__file__)), key=lambda e: e.name)
        stamp = [(e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in sources if e.name.endswith(".py")]
        key = repr((numba.__version__, cpu_target.target_context.codegen().magic_tuple(), dtype, stamp))
        return os.path.join(folder, f"minibert-ready-{dtype}-{hashlib.sha1(key.encode()).hexdigest()[:16]}")
    except Exception:  # noqa: BLE001 - Numba internals moved: fall back to compiling in the process
        return None
