"""One thread pool for the whole forward pass: OpenBLAS's jobs run on Numba's OpenMP threads.

Why: a forward pass alternates GEMMs (OpenBLAS's pthreads pool) with Numba kernels (Numba's
OpenMP pool). Two pools cannot both keep their idle threads spinning on two cores — a spinning
Numba thread takes the core OpenBLAS's worker needs, and the other way round — so each pool's
threads fall asleep between calls and every switch has to wake the other pool. On this kind of
virtual machine a wake after an idle pause is slow (the vCPU has halted): bert-base at (1, 16)
took ~60 ms per pass after a 0.3 s pause against ~35 ms back to back. With OpenBLAS's jobs on
Numba's pool there is one set of threads, and it may spin briefly between regions
(``GOMP_SPINCOUNT``, set at import by ``minibert.threads.configure_omp_waiting``): measured, same machine, one process per setting,
(1, 16) after a 0.3 s pause: bert-base 56–63 -> 31–34 ms, MiniLM 10–13 -> 7–8 ms.

How: OpenBLAS (0.3.27 and later, pthreads builds) takes a callback that runs the ``numjobs``
jobs of a threaded BLAS call (``openblas_set_threads_callback_function``). The callback here
opens one OpenMP parallel region of ``numjobs`` threads on the libgomp that Numba's OpenMP
layer uses (``GOMP_parallel``); thread t runs jobs t, t + team size, ... A team always has all
``numjobs`` threads at the top level, which OpenBLAS's level-3 jobs need (they wait on each
other's packed panels). The two functions are a few lines of LLVM IR compiled with llvmlite (a
dependency of Numba) the first time they are needed: no C compiler, no extension module.

Wake: :func:`wake` begins a do-nothing region of the pass's team and returns at once, so the
workers come up while the caller checks and embeds the inputs; :func:`ready` ends it before the
first kernel (BertModel.run, for pinned passes; see the function).

Scope: :func:`shared` installs the callback for the duration of a block and puts OpenBLAS's own
pool back after it, so BLAS calls elsewhere in the program are untouched. Every module's call
(models, task models, heads, layers: ``minibert.modules.Module``) runs inside it. Nothing is installed when Numba's threading layer is not OpenMP (GNU libgomp), when
OpenBLAS lacks the entry point, on non-64-bit or non-Linux platforms, or with
``MINIBERT_BLAS_ON_NUMBA_POOL=0``.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading

from . import affinity as _affinity
from .switches import switch

_lock = threading.Lock()
_code_lock = threading.Lock()
_code = None  # None: not tried yet; (llvmlite engine, {function: address}) or (): no libgomp pool
_depth = 0
_state = None  # None: not tried yet; (callback address, [setter functions], (engine, call counter)) or ()

# the OpenBLAS entry point under the names builds export it: plain, and SciPy's/NumPy's wheels'
# symbol-prefixed builds (64-bit and 32-bit integer interfaces)
SETTER_NAMES = ("openblas_set_threads_callback_function", "scipy_openblas_set_threads_callback_function64_",
                "scipy_openblas_set_threads_callback_function")

_IR = """
%job = type {{ ptr, i64, ptr, i32, i32 }}
@minibert_blas_calls = global i64 0

define void @minibert_blas_worker(ptr %data) {{
entry:
  %tid = call i32 inttoptr (i64 {thread_num} to ptr)()
  %team = call i32 inttoptr (i64 {num_threads} to ptr)()
  %f0 = getelementptr %job, ptr %data, i32 0, i32 0
  %dojob = load ptr, ptr %f0
  %f1 = getelementptr %job, ptr %data, i32 0, i32 1
  %elsize = load i64, ptr %f1
  %f2 = getelementptr %job, ptr %data, i32 0, i32 2
  %base = load ptr, ptr %f2
  %f3 = getelementptr %job, ptr %data, i32 0, i32 3
  %arg = load i32, ptr %f3
  %f4 = getelementptr %job, ptr %data, i32 0, i32 4
  %n = load i32, ptr %f4
  br label %loop
loop:
  %i = phi i32 [ %tid, %entry ], [ %next, %body ]
  %more = icmp slt i32 %i, %n
  br i1 %more, label %body, label %done
body:
  %i64 = sext i32 %i to i64
  %off = mul i64 %i64, %elsize
  %p = getelementptr i8, ptr %base, i64 %off
  call void %dojob(i32 %tid, ptr %p, i32 %arg)
  %next = add i32 %i, %team
  br label %loop
done:
  ret void
}}

define void @minibert_blas_callback(i32 %sync, ptr %dojob, i32 %numjobs, i64 %elsize, ptr %jobdata, i32 %arg) {{
entry:
  %s = alloca %job
  %f0 = getelementptr %job, ptr %s, i32 0, i32 0
  store ptr %dojob, ptr %f0
  %f1 = getelementptr %job, ptr %s, i32 0, i32 1
  store i64 %elsize, ptr %f1
  %f2 = getelementptr %job, ptr %s, i32 0, i32 2
  store ptr %jobdata, ptr %f2
  %f3 = getelementptr %job, ptr %s, i32 0, i32 3
  store i32 %arg, ptr %f3
  %f4 = getelementptr %job, ptr %s, i32 0, i32 4
  store i32 %numjobs, ptr %f4
  %c = atomicrmw add ptr @minibert_blas_calls, i64 1 monotonic
  call void inttoptr (i64 {gomp_parallel} to ptr)(ptr @minibert_blas_worker, ptr %s, i32 %numjobs, i32 0)
  ret void
}}

define void @minibert_team_worker(ptr %fn) {{
entry:
  %tid = call i32 inttoptr (i64 {thread_num} to ptr)()
  call void %fn(i32 %tid)
  ret void
}}

define void @minibert_team_run(ptr %fn, i32 %n) {{
entry:
  call void inttoptr (i64 {gomp_parallel} to ptr)(ptr @minibert_team_worker, ptr %fn, i32 %n, i32 0)
  ret void
}}
"""

# the wake (see :func:`wake`): a region whose threads only count themselves, begun with
# GOMP_parallel_start (the workers are released and the call returns at once) and ended with
# GOMP_parallel_end (waits for them); both are libgomp's original entry points, still exported
_WAKE_IR = """
@minibert_wake_arrivals = global i64 0

define void @minibert_wake_worker(ptr %data) {{
entry:
  %c = atomicrmw add ptr @minibert_wake_arrivals, i64 1 monotonic
  ret void
}}

define void @minibert_wake_begin(i32 %n) {{
entry:
  call void inttoptr (i64 {gomp_parallel_start} to ptr)(ptr @minibert_wake_worker, ptr null, i32 %n)
  ret void
}}

define void @minibert_wake_end() {{
entry:
  call void @minibert_wake_worker(ptr null)
  call void inttoptr (i64 {gomp_parallel_end} to ptr)()
  ret void
}}
"""


def enabled() -> bool:
    """False when switched off (``MINIBERT_BLAS_ON_NUMBA_POOL=0``) or on a platform the callback is
    not written for (it assumes 64-bit Linux: ``size_t`` is 64 bits, libgomp)."""
    return switch("MINIBERT_BLAS_ON_NUMBA_POOL") and sys.platform.startswith("linux") and sys.maxsize > 2 ** 32


def _gomp():
    """ctypes handle that resolves symbols in the OpenMP runtime Numba's pool runs on; False when
    Numba's pool is not GNU OpenMP; None when Numba has not started its pool yet."""
    import numba

    try:
        if numba.threading_layer() != "omp":
            return False
    except ValueError:  # no parallel kernel has run yet: the layer is not chosen
        return None
    from numba.np.ufunc import omppool

    lib = ctypes.CDLL(omppool.__file__)  # dlsym on it searches its dependencies: Numba's libgomp
    try:
        lib.GOMP_parallel, lib.omp_get_thread_num, lib.omp_get_num_threads
    except AttributeError:  # an OpenMP runtime without GNU's entry points
        return False
    return lib


def _setters():
    """ctypes setter functions of the loaded OpenBLAS libraries that take a threads callback."""
    from .threads import openblas_pthreads_libraries

    found = []
    for _, lib in openblas_pthreads_libraries():
        for name in SETTER_NAMES:
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_void_p], None
                found.append(fn)
                break
    return found


def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def _compile():
    """(engine, {function name: address}) of the IR above on the libgomp Numba's pool runs on; ()
    when there is none (or the platform is not 64-bit Linux, which the IR assumes: ``size_t`` is
    64 bits); None when it cannot tell yet (Numba has not started its threads)."""
    if not (sys.platform.startswith("linux") and sys.maxsize > 2 ** 32):
        return ()
    gomp = _gomp()
    if not gomp:
        return None if gomp is None else ()
    import llvmlite.binding as llvm

    ir = _IR.format(thread_num=_address(gomp.omp_get_thread_num), num_threads=_address(gomp.omp_get_num_threads),
                    gomp_parallel=_address(gomp.GOMP_parallel))
    names = ["minibert_blas_callback", "minibert_team_run"]
    try:
        start, end = gomp.GOMP_parallel_start, gomp.GOMP_parallel_end
    except AttributeError:  # not in this libgomp: no wake, the rest works without it
        pass
    else:
        ir += _WAKE_IR.format(gomp_parallel_start=_address(start), gomp_parallel_end=_address(end))
        names += ["minibert_wake_begin", "minibert_wake_end"]
    module = llvm.parse_assembly(ir)
    module.verify()
    machine = llvm.Target.from_default_triple().create_target_machine(opt=2)
    engine = llvm.create_mcjit_compiler(module, machine)
    engine.finalize_object()
    return engine, {n: engine.get_function_address(n) for n in names}


def _compiled():
    global _code
    with _code_lock:
        if _code is None:
            _code = _compile()
        return _code


def _build():
    """(callback address, setters, (engine, call counter)); () when this process cannot share the pool; None when
    it cannot tell yet (Numba has not started its threads)."""
    if not enabled():
        return ()
    code = _compiled()
    if not code:
        return code
    setters = _setters()
    if not setters:
        return ()
    engine, addresses = code
    counter = ctypes.c_int64.from_address(engine.get_global_value_address("minibert_blas_calls"))
    return addresses["minibert_blas_callback"], setters, (engine, counter)


_TEAM_JOB = ctypes.CFUNCTYPE(None, ctypes.c_int)
_TEAM_RUN = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int)


def on_team(n: int, fn) -> bool:
    """Run ``fn(i)`` once on each thread i of an OpenMP team of ``n`` threads started by the
    calling thread (i = 0 is the calling thread): the threads Numba's parallel kernels run on when
    this thread calls them with ``n`` threads (libgomp gives a thread's teams the same pool
    threads, in order). For setting the threads up (:mod:`minibert.affinity`), not for work: ``fn``
    is Python, each call takes the GIL. False, and nothing run, when Numba's pool is not libgomp's
    (or not started yet). An exception in ``fn`` is printed by ctypes, not raised: record it."""
    code = _compiled()
    if not code:
        return False
    job = _TEAM_JOB(fn)
    _TEAM_RUN(code[1]["minibert_team_run"])(ctypes.cast(job, ctypes.c_void_p), int(n))
    return True


_WAKE_BEGIN = ctypes.CFUNCTYPE(None, ctypes.c_int)
_WAKE_END = ctypes.CFUNCTYPE(None)
_waking = threading.local()  # .end: the function that ends this thread's open wake region, or None
_wake_fns = None  # None: not built yet; (begin, end) ctypes functions, or () when libgomp lacks them
# read once, at import (a mistyped value fails there): MINIBERT_WAKE_EARLY=0 turns the wake off
_WAKE_EARLY = switch("MINIBERT_WAKE_EARLY")


def wake() -> bool:
    """Wake the calling thread's workers now, and return at once: begins a parallel region of the
    pass's team whose threads do nothing but count themselves, and leaves it open while the
    caller goes on with the pass's Python set-up (checking inputs, gathering embeddings);
    :func:`ready` ends it before the first kernel. Why: after a pause the workers sleep, and
    waking one takes ~0.3 ms on this kind of virtual machine (``python -m benchmarks.pool
    --wake``), which the first kernel of a pass otherwise waits out; woken here, they come up
    while that Python runs. Only for the thread whose pass is pinned (:func:`minibert.affinity.
    team_size`: outermost block, 2+ threads, libgomp), since a woken worker on the caller's CPU
    would wait for it anyway. Until :func:`ready`, a Numba parallel kernel or threaded BLAS call
    of this thread runs nested, on one thread (the same values, slower): call nothing parallel
    in between. Off with ``MINIBERT_WAKE_EARLY=0``. True if a region was begun."""
    global _wake_fns
    n = _affinity.team_size()
    if n < 2 or not _WAKE_EARLY or getattr(_waking, "end", None) is not None:
        return False
    if _wake_fns is None:
        code = _compiled()
        if not code:
            return False  # (a pinned pass has run a parallel kernel: no None here, but be safe)
        addresses = code[1]
        _wake_fns = (_WAKE_BEGIN(addresses["minibert_wake_begin"]), _WAKE_END(addresses["minibert_wake_end"])) \
            if "minibert_wake_begin" in addresses else ()
    if not _wake_fns:
        return False
    _wake_fns[0](n)
    _waking.end = _wake_fns[1]
    return True


def ready() -> None:
    """End the calling thread's wake region (:func:`wake`), waiting for its workers; nothing if
    none is open. The outermost :func:`shared` block ends one left open."""
    end = getattr(_waking, "end", None)
    if end is not None:
        _waking.end = None
        end()


def wake_arrivals() -> int:
    """How many times a thread has arrived in a wake region in this process (each region counts
    its team size): for tests."""
    code = _code
    if not code:
        return 0
    engine = code[0]
    return int(ctypes.c_int64.from_address(engine.get_global_value_address("minibert_wake_arrivals")).value) \
        if "minibert_wake_begin" in code[1] else 0


def _after_fork_in_child():
    """A child forked while a forward pass ran in another thread would inherit the callback, and
    OpenMP's pool does not survive a fork: give OpenBLAS its own pool back in the child."""
    global _depth, _lock
    _waking.end = None  # (the forking thread's; its region, if any, is the parent's)
    _lock = threading.Lock()  # the parent's may have been held by the thread that is gone
    if _depth and _state:
        for s in _state[1]:
            s(None)
    _depth = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def available() -> bool:
    """Whether BLAS jobs can run on Numba's pool in this process (builds the callback once)."""
    global _state
    with _lock:
        if _state is None:
            _state = _build()
        return bool(_state)  # an unknown answer (None) is built again on the next call


def calls() -> int:
    """How many threaded BLAS calls the callback has run in this process (0 if never built)."""
    return int(_state[2][1].value) if _state else 0


@contextlib.contextmanager
def shared():
    """Within the block, OpenBLAS's threaded calls run on Numba's OpenMP threads (see the module
    docstring), and those threads keep CPUs of their own (:mod:`minibert.affinity`); outside it
    OpenBLAS uses its own pool and the calling thread its own CPUs. Nests, and is safe from
    several threads (only the outermost block changes anything)."""
    global _depth
    state = _state if available() else None  # not available before the first parallel kernel ran: then next time
    with _lock:
        _depth += 1
        outer = _depth == 1
        if outer and state:
            for s in state[1]:
                s(state[0])
    saved = None
    try:
        saved = _affinity.enter() if outer else None
        yield
    finally:
        if outer:
            ready()  # a wake region left open (an error before the first kernel)
        _affinity.leave(saved)
        with _lock:
            _depth -= 1
            if _depth == 0 and _state:
                for s in _state[1]:
                    s(None)


def on_numba_pool(fn):
    """``fn`` run inside :func:`shared` (minibert.modules.Module wraps every module's call in it)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        with shared():
            return fn(*args, **kwargs)
    return call
