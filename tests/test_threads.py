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
