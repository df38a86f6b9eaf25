"""The threads knob sets Numba's pool and the BLAS pool together; results do not depend on it."""
from __future__ import annotations

import numpy as np
import pytest

import minibert
from test_cli import run


@pytest.fixture
def restore_threads():
    yield
    minibert.set_num_threads(None)


def test_set_num_threads_sets_both_pools(restore_threads):
    assert minibert.set_num_threads(1) == 1
    got = minibert.get_num_threads()
    assert got["numba"] == 1 and got["blas"] and all(n == 1 for n in got["blas"])
    top = minibert.threads.max_threads()
    assert minibert.set_num_threads(None) == top
    assert minibert.get_num_threads()["numba"] == top


def test_results_do_not_depend_on_threads(restore_threads, tiny_dir):
    model = minibert.BertModel.from_pretrained(tiny_dir)
    ids = np.random.default_rng(0).integers(0, 99, size=(3, 17))
    minibert.set_num_threads(1)
    one = model(ids).last_hidden_state
    minibert.set_num_threads(None)
    np.testing.assert_allclose(model(ids).last_hidden_state, one, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n,match", [(0, "threads=0; expected a positive integer"), (2.0, "threads=2.0"),
                                     (10_000, "threads=10000 exceeds the")])
def test_bad_thread_counts(n, match, restore_threads):
    with pytest.raises(ValueError, match=match):
        minibert.set_num_threads(n)


def test_cli_threads_flag(minilm_dir):
    r = run("encode", "--threads", "1", "hello")
    assert r.returncode == 0 and "threads: 1 (Numba and BLAS)" in r.stderr, r.stderr
    r = run("embed", "--threads", "0", "hello")
    assert r.returncode != 0 and "expected a positive integer, got 0" in r.stderr


_SPIN_PROBE = """
import ctypes, os, sys
import numpy as np
a = np.ones((256, 256), np.float32)
a @ a  # OpenBLAS's pool is up, with the timeout it read when NumPy loaded it
import minibert
from threadpoolctl import threadpool_info
libs = [i["filepath"] for i in threadpool_info() if i["internal_api"] == "openblas"]
if not libs or not hasattr(ctypes.CDLL(libs[0]), "openblas_thread_timeout"):
    print("no-openblas")
    sys.exit(0)
a @ a  # the pool starts again after the shutdown
print(ctypes.CDLL(libs[0]).openblas_thread_timeout(), os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
"""


@pytest.mark.parametrize("user_value", [None, "7"])
def test_importing_minibert_after_numpy_bounds_openblas_spinning(user_value):
    """NumPy imported first (as most scripts do): minibert still gets OpenBLAS's idle threads to
    stop spinning after 2^20 cycles, and a timeout the user exported is left as it is."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if user_value:
        env["OPENBLAS_THREAD_TIMEOUT"] = user_value
    r = subprocess.run([sys.executable, "-c", _SPIN_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    if r.stdout.strip() == "no-openblas":
        pytest.skip("NumPy's BLAS here is not OpenBLAS with these entry points")
    expected = user_value or str(minibert.threads.SPIN_TIMEOUT)
    assert r.stdout.split() == [expected, expected]


# --- OpenBLAS's jobs on Numba's pool during a forward pass (minibert.blaspool) ---

def _pool_or_skip():
    from minibert import blaspool

    minibert.set_num_threads(None)  # starts Numba's pool, so its threading layer is known
    if not blaspool.available():
        pytest.skip("Numba's threading layer is not GNU OpenMP or OpenBLAS has no threads callback here")
    return blaspool


def test_blas_jobs_run_on_numba_pool_only_inside_shared(restore_threads):
    blaspool = _pool_or_skip()
    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float64):
        a = rng.standard_normal((512, 384)).astype(dt)  # big enough for OpenBLAS to thread it
        b = rng.standard_normal((1536, 384)).astype(dt)
        native = a @ b.T
        before = blaspool.calls()
        with blaspool.shared():
            with blaspool.shared():  # nests
                inner = a @ b.T
            pooled = a @ b.T
        inside = blaspool.calls() - before
        after = a @ b.T
        assert inside >= 2, f"{dt.__name__}: the callback ran {inside} times for 2 threaded GEMMs"
        assert blaspool.calls() - before == inside, "the callback stayed installed after the block"
        # the same jobs, the same partition: bit for bit
        assert np.array_equal(inner, native) and np.array_equal(pooled, native) and np.array_equal(after, native), \
            f"max abs diff {max(np.abs(x - native).max() for x in (inner, pooled, after))}"


def test_shared_pool_from_several_threads(restore_threads):
    import threading

    blaspool = _pool_or_skip()
    rng = np.random.default_rng(1)
    pairs = [(rng.standard_normal((300, 256), dtype=np.float32), rng.standard_normal((700, 256), dtype=np.float32))
             for _ in range(4)]
    refs = [a @ b.T for a, b in pairs]
    bad = []

    def work(i):
        a, b = pairs[i]
        for _ in range(20):
            with blaspool.shared():
                if not np.array_equal(a @ b.T, refs[i]):
                    bad.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung in a shared-pool GEMM"
    assert not bad, f"wrong products from threads {sorted(set(bad))}"
    assert blaspool._depth == 0


def test_forward_pass_uses_the_shared_pool(restore_threads, minilm_dir, monkeypatch):
    import contextlib

    blaspool = _pool_or_skip()
    model = minibert.BertModel.from_pretrained(minilm_dir)
    for layer in model.encoder.layer:  # a writable weight (assigned) goes to BLAS at 128 rows; a
        dense = layer.intermediate.dense  # loaded, read-only one to the packed kernel (kernels/gemm.py)
        dense.weight = np.array(dense.weight)
    ids = np.random.default_rng(2).integers(1000, 20000, size=(2, 64))  # 128 rows
    before = blaspool.calls()
    shared = model(ids)
    assert blaspool.calls() > before, "no BLAS job of the forward pass ran on Numba's pool"
    monkeypatch.setattr(blaspool, "shared", contextlib.nullcontext)
    own = model(ids)
    for name in ("last_hidden_state", "pooler_output"):
        assert np.array_equal(shared[name], own[name]), \
            f"{name}: max abs diff {np.abs(shared[name] - own[name]).max()}"


_WAIT_PROBE = """
import os, minibert
from minibert import blaspool
minibert.set_num_threads(None)
print(os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_WAIT_POLICY"), blaspool.available())
"""


@pytest.mark.parametrize("env,expected", [
    ({}, [str(minibert.threads.SPIN_COUNT), "None", "True"]),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, ["None", "ACTIVE", "True"]),
    ({"GOMP_SPINCOUNT": "123"}, ["123", "None", "True"]),
    ({"MINIBERT_BLAS_ON_NUMBA_POOL": "0"}, ["None", "PASSIVE", "False"]),
])
def test_how_numba_workers_wait(env, expected):
    """Spin briefly when the BLAS jobs share Numba's pool, sleep at once when they cannot; a
    setting the user made is kept."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items()
            if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "MINIBERT_BLAS_ON_NUMBA_POOL")}
    r = subprocess.run([sys.executable, "-c", _WAIT_PROBE], capture_output=True, text=True, env={**base, **env},
                       timeout=120)
    assert r.returncode == 0, r.stderr
    got = r.stdout.split()
    if got[2] == "False" and expected[2] == "True":
        pytest.skip("Numba's threading layer is not GNU OpenMP or OpenBLAS has no threads callback here")
    assert got == expected


def test_a_child_forked_during_a_forward_pass_gets_openblas_pool_back(restore_threads):
    import os

    blaspool = _pool_or_skip()
    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    a = np.random.default_rng(3).standard_normal((400, 300)).astype(np.float32)
    ref = a @ a.T
    with blaspool.shared():
        pid = os.fork()
        if pid == 0:  # the child: the callback is gone, and BLAS works on OpenBLAS's own threads
            before = blaspool.calls()
            ok = np.array_equal(a @ a.T, ref) and blaspool.calls() == before and blaspool._depth == 0
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("raw,expected", [("", True), ("1", True), ("on", True), (" False ", False), ("0", False)])
def test_env_switches(raw, expected, monkeypatch):
    from minibert.switches import switch

    monkeypatch.setenv("MINIBERT_TEST_SWITCH", raw)
    assert switch("MINIBERT_TEST_SWITCH") is expected


def test_a_mistyped_env_switch_is_an_error():
    import os
    import subprocess
    import sys

    env = {**os.environ, "MINIBERT_BLAS_ON_NUMBA_POOL": "maybe"}
    r = subprocess.run([sys.executable, "-c", "import minibert"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0
    assert "environment variable MINIBERT_BLAS_ON_NUMBA_POOL='maybe'; expected 1 or 0" in r.stderr, r.stderr[-2000:]


_LAYER_PROBE = """
import sys
if sys.argv[1] == "numba-first":
    import numba  # noqa: F401
import minibert
import numba
print(" ".join(numba.config.THREADING_LAYER_PRIORITY))
"""


@pytest.mark.parametrize("env,order,expected", [
    ({}, "minibert-first", "omp tbb workqueue"),
    ({}, "numba-first", "omp tbb workqueue"),
    ({"NUMBA_THREADING_LAYER_PRIORITY": "workqueue omp tbb"}, "minibert-first", "workqueue omp tbb"),
    ({"NUMBA_THREADING_LAYER": "workqueue"}, "minibert-first", "tbb omp workqueue"),  # Numba's own default
])
def test_numba_is_asked_for_its_openmp_layer_first(env, order, expected):
    """With the tbb package installed Numba would pick TBB, and the one thread pool needs OpenMP;
    minibert puts OpenMP first, also when numba was imported before it, unless the user chose."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_THREADING_LAYER")}
    r = subprocess.run([sys.executable, "-c", _LAYER_PROBE, order], capture_output=True, text=True,
                       env={**base, **env}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == expected


# --- CPUs of their own for the pass's threads (minibert.affinity) ---

def _pinning_or_skip(model, ids):
    import os

    import numba

    from minibert import affinity

    if not affinity.enabled():
        pytest.skip("thread pinning is off here (not Linux, MINIBERT_PIN_THREADS=0 or OpenMP binding set)")
    minibert.set_num_threads(None)
    n = numba.get_num_threads()
    if n < 2 or len(os.sched_getaffinity(0)) < n:
        pytest.skip("fewer than 2 threads, or fewer CPUs than threads")
    model(ids)  # the first pass starts Numba's pool if nothing had
    if numba.threading_layer() != "omp":
        pytest.skip("Numba's threading layer is not GNU OpenMP")
    return n


def _team_cpus(n):  # {thread i of the calling thread's team of n: its allowed CPUs}
    import os

    from minibert import blaspool

    got = {}
    assert blaspool.on_team(n, lambda i: got.__setitem__(i, frozenset(os.sched_getaffinity(0))))
    return got


def test_forward_pass_threads_keep_cpus_of_their_own(restore_threads, tiny_dir):
    import os

    from minibert import affinity, blaspool

    model = minibert.BertModel.from_pretrained(tiny_dir)
    ids = np.random.default_rng(0).integers(0, 99, size=(2, 9))
    n = _pinning_or_skip(model, ids)
    before = frozenset(os.sched_getaffinity(0))
    model(ids)
    assert frozenset(os.sched_getaffinity(0)) == before, "the calling thread did not get its CPUs back"
    allowed, mine = affinity.pinned()[n]
    assert allowed == before and mine, f"team not pinned: {affinity.pinned()}"
    with blaspool.shared():  # what a pass runs under
        inside = frozenset(os.sched_getaffinity(0))
        team = _team_cpus(n)
    workers = [team[i] for i in range(1, n)]
    assert all(len(w) == 1 for w in workers) and len(set(workers)) == n - 1, f"workers' CPUs {workers}"
    taken = frozenset().union(*workers)
    assert inside == mine == team[0] and not inside & taken and inside | taken <= before, \
        f"caller during the pass {sorted(inside)}, workers {sorted(taken)}, allowed {sorted(before)}"
    assert frozenset(os.sched_getaffinity(0)) == before


_PIN_PROBE = """
import os, sys
import numpy as np
import minibert
from minibert import affinity, blaspool
m = minibert.BertModel.from_pretrained(sys.argv[1])
ids = np.arange(18).reshape(2, 9)
minibert.set_num_threads(2)
m(ids)
before = os.sched_getaffinity(0)
with blaspool.shared():
    inside = os.sched_getaffinity(0)
print(affinity.enabled(), inside == before, bool(affinity.pinned()), blaspool.wake_arrivals() > 0)
np.save(sys.argv[2], m(ids).last_hidden_state)
"""


def _pin_probe(tiny_dir, out, env):
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items()
            if k not in ("MINIBERT_PIN_THREADS", "MINIBERT_WAKE_EARLY") and k not in affinity_vars()}
    r = subprocess.run([sys.executable, "-c", _PIN_PROBE, str(tiny_dir), str(out)], capture_output=True, text=True,
                       env={**base, **env}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.split(), np.load(out)


def test_thread_pinning_can_be_switched_off(restore_threads, tiny_dir, tmp_path):
    model = minibert.BertModel.from_pretrained(tiny_dir)
    _pinning_or_skip(model, np.zeros((1, 4), dtype=np.int64))
    said, pinned = _pin_probe(tiny_dir, tmp_path / "on.npy", {})
    # enabled, the caller's CPUs narrowed in a pass, a team planned, its workers woken early
    assert said == ["True", "False", "True", "True"], said
    for env in ({"MINIBERT_PIN_THREADS": "0"}, {"OMP_PROC_BIND": "true"}):
        said, free = _pin_probe(tiny_dir, tmp_path / "off.npy", env)
        assert said == ["False", "True", "False", "False"], (env, said)
        assert np.array_equal(free, pinned), \
            f"{env}: where threads run changed values, max abs diff {np.abs(free - pinned).max()}"
    said, late = _pin_probe(tiny_dir, tmp_path / "late.npy", {"MINIBERT_WAKE_EARLY": "0"})
    assert said == ["True", "False", "True", "False"], said  # pinned, not woken early
    assert np.array_equal(late, pinned), f"max abs diff {np.abs(late - pinned).max()}"


_COMPILE_IN_A_PASS = """
import os, sys
import numba  # before minibert, as a program that uses Numba itself may
import numpy as np
import minibert
from minibert import affinity, blaspool
m = minibert.BertModel.from_pretrained(sys.argv[1])
ids = np.arange(18).reshape(2, 9)
minibert.set_num_threads(2)
m(ids)
m(ids)
# Numba reads its environment again at its next compile when a NUMBA_* variable changed (as
# importing minibert after numba does; here a variable a program may set to quiet Numba)
os.environ["NUMBA_DISABLE_PERFORMANCE_WARNINGS"] = "1"

@numba.njit
def first_use(a):  # compiled on its first call: inside the pass below
    return a.sum()

allowed = os.sched_getaffinity(0)
with blaspool.shared():  # where a kernel's first use on a cold cache compiles it
    narrowed = os.sched_getaffinity(0) < allowed
    print(narrowed, first_use(np.ones(3)))
"""


def test_numba_can_compile_during_a_pinned_pass(restore_threads, tiny_dir):
    import os
    import subprocess
    import sys

    model = minibert.BertModel.from_pretrained(tiny_dir)
    _pinning_or_skip(model, np.zeros((1, 4), dtype=np.int64))
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_NUM_THREADS", "MINIBERT_PIN_THREADS") and k not in affinity_vars()}
    r = subprocess.run([sys.executable, "-c", _COMPILE_IN_A_PASS, str(tiny_dir)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["True", "3.0"], r.stdout  # the caller was narrowed, and the compile worked


def _in_parallel():  # whether the calling thread is inside an OpenMP parallel region of Numba's libgomp
    import ctypes

    from numba.np.ufunc import omppool

    return bool(ctypes.CDLL(omppool.__file__).omp_in_parallel())


def test_workers_are_woken_early_and_arrive_before_the_first_kernel(restore_threads, tiny_dir):
    from minibert import blaspool

    model = minibert.BertModel.from_pretrained(tiny_dir)
    ids = np.random.default_rng(0).integers(0, 99, size=(2, 9))
    n = _pinning_or_skip(model, ids)
    expected = model(ids).last_hidden_state
    seen = []
    k = model._k

    def watched(name, fn):
        def call(*args, **kwargs):
            seen.append((name, _in_parallel()))
            return fn(*args, **kwargs)
        return call

    model._k = {name: watched(name, fn) if callable(fn) else fn for name, fn in k.items()}
    try:
        for mask in (None, np.array([[1] * 9, [1] * 4 + [0] * 5])):  # dense, and packed
            before = blaspool.wake_arrivals()
            got = model(ids, attention_mask=mask).last_hidden_state
            assert blaspool.wake_arrivals() - before == n, "the pass's workers were not woken at its start"
            if mask is None:
                assert np.array_equal(got, expected), f"max abs diff {np.abs(got - expected).max()}"
    finally:
        model._k = k
    assert seen and seen[0][0] == "layernorm", seen[:3]  # the embeddings' LayerNorm is the first kernel
    inside = [name for name, flag in seen if flag]
    assert not inside, f"kernels run while the wake region was open (they run on one thread there): {inside}"
    assert not _in_parallel()


def test_an_error_before_the_first_kernel_ends_the_wake(restore_threads, tiny_dir):
    from minibert import blaspool

    model = minibert.BertModel.from_pretrained(tiny_dir)
    ids = np.random.default_rng(0).integers(0, 99, size=(2, 9))
    n = _pinning_or_skip(model, ids)
    before = blaspool.wake_arrivals()
    with pytest.raises(ValueError, match="input_ids"):
        model(np.full((1, 4), 10 ** 6))  # out of the vocabulary: fails checking the inputs, inside the wake
    assert blaspool.wake_arrivals() - before == n and not _in_parallel(), "the wake region was left open"
    before = blaspool.wake_arrivals()
    model(ids)
    assert blaspool.wake_arrivals() - before == n  # and the next pass wakes them again


@pytest.mark.parametrize("name", ["MINIBERT_PIN_THREADS", "MINIBERT_WAKE_EARLY"])
def test_a_mistyped_pinning_switch_fails_at_import(name):
    import os
    import subprocess
    import sys

    env = {**os.environ, name: "maybe"}
    r = subprocess.run([sys.executable, "-c", "import minibert"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and f"{name}='maybe'; expected 1 or 0" in r.stderr, r.stderr[-2000:]


def test_an_error_entering_a_pass_leaves_the_pool_as_it_was(restore_threads, tiny_dir, monkeypatch):
    from minibert import affinity, blaspool

    model = minibert.BertModel.from_pretrained(tiny_dir)
    ids = np.random.default_rng(7).integers(0, 99, size=(2, 9))
    model(ids)

    def broken():
        raise RuntimeError("broken enter")

    monkeypatch.setattr(affinity, "enter", broken)
    with pytest.raises(RuntimeError, match="broken enter"):
        model(ids)
    assert blaspool._depth == 0
    monkeypatch.undo()
    model(ids)
    assert blaspool._depth == 0


def affinity_vars():
    from minibert import affinity

    return affinity.USER_BINDING


def test_a_caller_with_fewer_cpus_than_threads_is_left_alone(restore_threads, tiny_dir):
    import os

    from minibert import blaspool

    model = minibert.BertModel.from_pretrained(tiny_dir)
    ids = np.random.default_rng(2).integers(0, 99, size=(2, 9))
    _pinning_or_skip(model, ids)
    before = frozenset(os.sched_getaffinity(0))
    one = {min(before)}
    os.sched_setaffinity(0, one)
    try:
        with blaspool.shared():
            assert os.sched_getaffinity(0) == one
        model(ids)
        assert os.sched_getaffinity(0) == one
    finally:
        os.sched_setaffinity(0, before)
    with blaspool.shared():  # and pinned again once the thread has its CPUs back
        assert frozenset(os.sched_getaffinity(0)) < before


def test_passes_from_several_threads_give_every_thread_its_cpus_back(restore_threads, tiny_dir):
    import os
    import threading

    model = minibert.BertModel.from_pretrained(tiny_dir)
    ids = np.random.default_rng(3).integers(0, 99, size=(2, 9))
    _pinning_or_skip(model, ids)
    ref = model(ids).last_hidden_state
    bad = []

    def work():
        mine = os.sched_getaffinity(0)
        for _ in range(10):
            if not np.array_equal(model(ids).last_hidden_state, ref):
                bad.append("values")
        if os.sched_getaffinity(0) != mine:
            bad.append(f"CPUs {os.sched_getaffinity(0)} after, {mine} before")

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    work()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not bad, bad


def test_another_thread_pins_its_own_team(restore_threads, tiny_dir):
    """An OpenMP team belongs to the thread that starts it: a new thread's passes pin its own
    workers (the state is per thread, so a new thread reusing a dead one's ident starts afresh)."""
    import os
    import threading

    from minibert import affinity, blaspool

    model = minibert.BertModel.from_pretrained(tiny_dir)
    ids = np.random.default_rng(5).integers(0, 99, size=(2, 9))
    n = _pinning_or_skip(model, ids)
    got = []

    def work():
        minibert.set_num_threads(n)  # Numba's thread count is per thread
        before = frozenset(os.sched_getaffinity(0))
        model(ids)
        model(ids)
        with blaspool.shared():
            team = _team_cpus(n)
        got.append((affinity.pinned().get(n), before, team))

    for _ in range(2):  # the second thread may get the first one's ident
        t = threading.Thread(target=work)
        t.start()
        t.join(timeout=120)
    assert len(got) == 2
    for plan, before, team in got:
        assert plan is not None and plan[0] == before and plan[1], plan
        workers = [team[i] for i in range(1, n)]
        assert all(len(w) == 1 for w in workers) and team[0] == plan[1] and not team[0] & frozenset().union(*workers)


def test_a_team_that_cannot_be_pinned_whole_runs_unpinned(restore_threads, tiny_dir, monkeypatch):
    """A worker whose pinning fails (a sandbox, a CPU gone offline): no worker stays pinned, the
    caller is not narrowed, and the pass runs. In a new thread, so its team is its own."""
    import os
    import threading

    from minibert import affinity, blaspool

    model = minibert.BertModel.from_pretrained(tiny_dir)
    ids = np.random.default_rng(6).integers(0, 99, size=(2, 9))
    n = _pinning_or_skip(model, ids)
    ref = model(ids).last_hidden_state
    real = os.sched_setaffinity
    first = []

    def flaky(pid, cpus):  # the first single-CPU pin takes effect but reports a failure
        real(pid, cpus)
        if len(cpus) == 1 and not first:
            first.append(cpus)
            raise OSError(22, "Invalid argument")

    got = []

    def work():
        minibert.set_num_threads(n)
        before = frozenset(os.sched_getaffinity(0))
        with monkeypatch.context() as m:  # this thread's first pass plans its team
            m.setattr(os, "sched_setaffinity", flaky)
            out = model(ids).last_hidden_state
        with blaspool.shared():
            inside = frozenset(os.sched_getaffinity(0))
            team = _team_cpus(n)
        got.append((before, inside, team, affinity.pinned().get(n), out))

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=120)
    before, inside, team, plan, out = got[0]
    assert first, "no pin was attempted"
    assert plan == (before, None) and inside == before, (plan, inside)
    assert all(cpus == before for cpus in team.values()), f"a worker stayed pinned: {team}"
    assert np.array_equal(out, ref)


def test_a_child_forked_during_a_pass_gets_its_cpus_back(restore_threads, tiny_dir):
    import os

    from minibert import blaspool

    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    model = minibert.BertModel.from_pretrained(tiny_dir)
    ids = np.random.default_rng(4).integers(0, 99, size=(2, 9))
    _pinning_or_skip(model, ids)
    before = os.sched_getaffinity(0)
    with blaspool.shared():
        assert os.sched_getaffinity(0) < before
        pid = os.fork()
        if pid == 0:
            os._exit(0 if os.sched_getaffinity(0) == before else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0, "the forked child kept the pass's narrowed CPUs"


def test_pinning_plan_gives_workers_cores_of_their_own(monkeypatch):
    from minibert import affinity

    # 4 cores with 2 hardware threads each: CPU c and c + 4 share a core
    monkeypatch.setattr(affinity, "_siblings", lambda c: [c % 4, c % 4 + 4])
    assert affinity.order(range(8)) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert affinity.order([7, 1, 5, 0]) == [0, 1, 5, 7]
    assert affinity.plan(range(8), 4) == ([1, 2, 3], frozenset({0, 4}))  # not on a worker's core
    assert affinity.plan(range(8), 8) == ([1, 2, 3, 4, 5, 6, 7], frozenset({0}))
    assert affinity.plan({0, 1}, 2) == ([1], frozenset({0}))
    assert affinity.plan({0, 4}, 2) == ([4], frozenset({0}))  # one core: off the worker's CPU at least
    assert affinity.plan({3}, 2) is None and affinity.plan(range(8), 1) is None
