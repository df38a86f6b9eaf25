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
