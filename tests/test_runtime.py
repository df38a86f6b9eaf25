"""The runtime: thread counts, the pools' environment, calls from many threads, fork and spawn,
and the same bits in every process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import minibert
from conftest import make_checkpoint
from test_cli import run


def _python(code, env=None, timeout=300, cwd=None):
    """Run ``code`` in a fresh Python; (returncode, stdout, stderr). The timeout turns a hang into
    a failure."""
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=timeout, cwd=cwd)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture
def restore_threads():
    yield
    minibert.set_num_threads(None)


def test_set_num_threads_sets_both_pools(restore_threads):
    assert minibert.set_num_threads(1) == 1
    got = minibert.runtime.thread_pools()
    assert got["numba"] == 1 and got["blas"] and all(n == 1 for n in got["blas"])
    assert minibert.get_num_threads() == 1 and isinstance(minibert.get_num_threads(), int)  # as torch's
    top = minibert.runtime.max_threads()
    assert minibert.set_num_threads(None) == top
    assert minibert.get_num_threads() == top


def test_results_do_not_depend_on_threads(restore_threads, tiny_dir):
    model = minibert.BertModel.from_pretrained(tiny_dir)
    ids = np.random.default_rng(0).integers(0, 99, size=(3, 17))
    minibert.set_num_threads(1)
    one = model(ids).last_hidden_state
    minibert.set_num_threads(None)
    np.testing.assert_array_equal(model(ids).last_hidden_state, one)


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


# -- many threads at once ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mid_dirs(tmp_path_factory):
    """A model big enough that its BLAS calls (attentions, the numpy kernels, the MLM decoder) run
    on several threads: hidden 256, intermediate 1024, 2 layers; and its masked-LM twin."""
    cfg = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=4, vocab_size=3000,
               max_position_embeddings=128)
    return (make_checkpoint(tmp_path_factory.mktemp("mid"), **cfg),
            make_checkpoint(tmp_path_factory.mktemp("mid_mlm"), cls_name="BertForMaskedLM", **cfg))


def test_calls_from_many_threads_equal_the_same_calls_alone(mid_dirs):
    """4 threads x 50 calls, mixed: attentions, the numpy kernels, a model with an assigned
    (writable) weight, a masked-LM head, padded and dense batches; every result bit-identical
    to the same call made alone."""
    base, mlm_dir = mid_dirs
    models = {
        "numba": minibert.BertModel.from_pretrained(base),
        "numpy": minibert.BertModel.from_pretrained(base, kernels="numpy"),
        "assigned": minibert.BertModel.from_pretrained(base),
    }
    w = models["assigned"].encoder.layer[0].intermediate.dense.weight
    models["assigned"].encoder.layer[0].intermediate.dense.weight = w * 1.5  # a new, writable array
    mlm = minibert.BertForMaskedLM.from_pretrained(mlm_dir)
    rng = np.random.default_rng(0)
    inputs = []
    for B, T in ((1, 16), (4, 48), (2, 128), (8, 64)):
        ids = rng.integers(1000, 3000, size=(B, T))
        mask = np.ones((B, T), np.int64)
        mask[1:, T // 2:] = 0
        inputs.append((ids, mask))

    def call(kind, i):
        ids, mask = inputs[i]
        if kind == "attentions":
            out = models["numba"](ids, mask, output_attentions=True)
            return [out.last_hidden_state, *out.attentions]
        if kind == "mlm":
            return [mlm(ids, mask).logits]
        out = models[kind](ids, mask)
        return [out.last_hidden_state, out.pooler_output]

    jobs = [(kind, i) for kind in ("numba", "numpy", "assigned", "attentions", "mlm") for i in range(len(inputs))]
    alone = {job: call(*job) for job in jobs}
    wrong, errors = [], []

    def worker(seed):
        order = np.random.default_rng(seed).integers(0, len(jobs), size=50)
        for j in order:
            try:
                got = call(*jobs[j])
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
                return
            for a, b in zip(got, alone[jobs[j]]):
                if not np.array_equal(a, b):
                    wrong.append((jobs[j], float(np.max(np.abs(a - b)))))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "a thread is still running after 600 s (deadlock?)"
    assert not errors, errors[:3]
    assert not wrong, f"{len(wrong)} of 200 results differ from the same call alone, e.g. {wrong[:3]}"


def test_tokenizer_from_many_threads(minilm_dir):
    """Calls with different padding and truncation settings at once each get what they asked for."""
    tok = minibert.BertTokenizer.from_pretrained(minilm_dir)
    texts = ["a short one", "a somewhat longer sentence with more words in it than the first", "x " * 40]
    settings = [dict(), dict(padding=True), dict(padding="max_length", max_length=24, truncation=True),
                dict(truncation=True, max_length=8), dict(padding=True, pad_to_multiple_of=16)]

    def call(s):
        if not s.get("padding"):
            return [tok(t, **s)["input_ids"] for t in texts]
        return [tok(texts, **s)["input_ids"]]

    alone = [call(s) for s in settings]
    wrong, errors = [], []

    def worker(seed):
        for j in np.random.default_rng(seed).integers(0, len(settings), size=60):
            try:
                got = call(settings[j])
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
                return
            if not all(np.array_equal(a, b) for a, b in zip(got, alone[j])):
                wrong.append(settings[j])

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert not wrong, f"{len(wrong)} calls got another call's settings, e.g. {wrong[:3]}"



def test_the_kernels_let_other_threads_run():
    """Every kernel Python calls releases the GIL (``nogil``): threads' passes run at once, and a
    server's web threads run while a batch computes."""
    import inspect

    import numba

    import minibert._tids
    import minibert.kernels as K

    modules = [minibert._tids] + [m for _, m in inspect.getmembers(K, inspect.ismodule)]
    # the cached ones: the helpers inlined into them are never called from Python
    entry = [(m.__name__, name) for m in modules for name, f in vars(m).items()
             if isinstance(f, numba.core.registry.CPUDispatcher) and type(f._cache).__name__ != "NullCache"]
    assert len(entry) >= 10, entry  # the kernels were found
    holding = [e for e in entry if not getattr(sys.modules[e[0]], e[1]).targetoptions.get("nogil")]
    assert not holding, f"kernels that hold the GIL: {holding}"


def test_on_a_threading_layer_that_is_not_thread_safe_threads_take_turns(tiny_dir):
    """Numba's workqueue layer aborts the process on concurrent use; there each thread's outermost
    call waits for its turn, and every result equals the same call alone."""
    code, out, err = _python(f"""
        import threading, numpy as np, minibert
        from minibert import runtime
        model = minibert.BertModel.from_pretrained({str(tiny_dir)!r})
        ids = [np.arange(n * 8).reshape(n, 8) % 99 for n in (1, 2, 4)]
        alone = [model(x).last_hidden_state for x in ids]
        print("threadsafe", runtime.threadsafe_layer())
        wrong = []
        def work(seed):
            for j in np.random.default_rng(seed).integers(0, 3, size=20):
                if not np.array_equal(model(ids[j]).last_hidden_state, alone[j]):
                    wrong.append(j)
        threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        print("wrong", len(wrong))
    """, env={"NUMBA_THREADING_LAYER": "workqueue"})
    assert code == 0, err[-3000:]
    assert "threadsafe False" in out and "wrong 0" in out, out


# -- pinning -------------------------------------------------------------------------------------------
PIN_PROBE = """
    import fcntl, os, sys, numpy as np, minibert
    from minibert import runtime
    model = minibert.BertModel.from_pretrained(sys.argv[1])
    before = os.sched_getaffinity(0)
    model(np.arange(24).reshape(2, 12) % 99)
    team = runtime._state.teams.get(2)
    print("restored", os.sched_getaffinity(0) == before)
    print("pinned", team and team.pinned)
    tids = runtime._team_tids(2) or []
    print("workers", [sorted(os.sched_getaffinity(t)) for t in tids[1:]])
    free = []
    for name in sorted(os.listdir(os.path.join(os.environ["TMPDIR"], "minibert-cpus"))):
        fd = os.open(os.path.join(os.environ["TMPDIR"], "minibert-cpus", name), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            free.append(int(name))
        except OSError:
            pass
    print("free after the pass", free)
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs")
def test_a_pass_pins_its_workers_on_cpus_no_other_process_holds(tiny_dir, tmp_path):
    """A pass claims two CPUs, pins the worker to one and the caller to the other, and gives the
    caller's CPUs and the claims back afterwards; CPUs another process holds are never pinned onto
    (the pass runs as it is); MINIBERT_PIN_THREADS=0 turns it off."""
    import fcntl

    env = {"TMPDIR": str(tmp_path), "NUMBA_NUM_THREADS": "2"}  # a claims folder of this test's own
    probe = textwrap.dedent(PIN_PROBE) + "\n"

    def run_probe(**extra):
        r = subprocess.run([sys.executable, "-c", probe, str(tiny_dir)], capture_output=True, text=True,
                           env={**os.environ, **env, **extra}, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return dict(line.split(" ", 1) if not line.startswith("free") else ("free", line[len("free after the pass "):])
                    for line in r.stdout.splitlines())

    out = run_probe()
    assert out["restored"] == "True", out
    pinned = eval(out["pinned"])
    assert pinned is not None and len(set(pinned)) == 2, out
    assert eval(out["workers"]) == [[pinned[1]]], out  # the worker on the second claimed CPU only
    assert set(eval(out["free"])) >= set(pinned), out  # the claims end with the pass

    held = []  # this process holds every CPU's claim, as a process in the middle of a pass would
    for cpu in os.sched_getaffinity(0):
        fd = os.open(str(tmp_path / "minibert-cpus" / str(cpu)), os.O_RDONLY | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.append(fd)
    try:
        out = run_probe()
        assert out["restored"] == "True" and out["pinned"] == "None", out
    finally:
        for fd in held:
            os.close(fd)
    assert run_probe(MINIBERT_PIN_THREADS="0")["pinned"] == "None"


# -- processes -----------------------------------------------------------------------------------------
def test_fork_after_a_pass_fails_clearly_in_the_child_and_the_parent_goes_on(tiny_dir):
    code, out, err = _python(f"""
        import multiprocessing, os, numpy as np, minibert
        model = minibert.BertModel.from_pretrained({str(tiny_dir)!r})
        ids = np.arange(24).reshape(2, 12) % 99
        ref = model(ids).last_hidden_state
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                model(ids)
                msg = "no error"
            except RuntimeError as e:
                msg = "RuntimeError: " + str(e)
            os.write(w, msg.encode())
            os._exit(0)
        os.close(w)
        _, status = os.waitpid(pid, 0)
        print(os.read(r, 4096).decode())
        print("child exit", os.waitstatus_to_exitcode(status))
        print("parent same", np.array_equal(model(ids).last_hidden_state, ref))
        # multiprocessing's fork context: the child's error comes back to the caller
        def encode(_):
            return model(ids).last_hidden_state
        with multiprocessing.get_context("fork").Pool(1) as pool:
            try:
                pool.map(encode, [0])
                print("pool: no error")
            except RuntimeError as e:
                print("pool: RuntimeError")
    """, timeout=180)
    assert code == 0, err[-3000:]
    assert "RuntimeError: this process was forked" in out and "'spawn' or 'forkserver'" in out, out
    assert "child exit 0" in out and "parent same True" in out and "pool: RuntimeError" in out, out


def test_fork_before_the_first_pass_and_spawn_work(tiny_dir, tmp_path):
    script = tmp_path / "spawned.py"
    script.write_text(textwrap.dedent(f"""
        import multiprocessing, os, numpy as np, minibert
        IDS = np.arange(24).reshape(2, 12) % 99

        def encode(_):
            model = minibert.BertModel.from_pretrained({str(tiny_dir)!r})
            return model(IDS).last_hidden_state

        if __name__ == "__main__":
            with multiprocessing.get_context("fork").Pool(1) as pool:  # nothing has run here yet
                forked = pool.map(encode, [0])[0]
            here = encode(0)
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                spawned = pool.map(encode, [0])[0]
            print(np.array_equal(forked, here), np.array_equal(spawned, here))
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["True", "True"], r.stdout


def test_the_same_bits_when_kernels_compile_and_when_they_load_from_the_cache(tiny_dir, tmp_path):
    """One process compiles every kernel into an empty cache, the next loads them: the outputs are
    bit-identical (float32 and float64, padded and dense)."""
    code = f"""
        import os, numpy as np, minibert
        ids = np.arange(3 * 17).reshape(3, 17) % 99
        mask = np.ones_like(ids); mask[1, 9:] = 0; mask[2, 4:] = 0
        outs = []
        for dtype in ("float32", "float64"):
            model = minibert.BertModel.from_pretrained({str(tiny_dir)!r}, dtype=dtype)
            for m in (None, mask):
                o = model(ids, m, output_hidden_states=True)
                outs += [o.pooler_output, *o.hidden_states]
        np.savez(os.path.join({str(tmp_path)!r}, "out-" + os.environ["RUN"] + ".npz"), *outs)
    """
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    for run_name in ("cold", "cached"):
        code_, _, err = _python(code, env={**env, "RUN": run_name}, timeout=600)
        assert code_ == 0, err[-3000:]
    assert any((tmp_path / "cache").rglob("*.nbi")), "the first process wrote no cache"
    cold, cached = np.load(tmp_path / "out-cold.npz"), np.load(tmp_path / "out-cached.npz")
    diffs = {k: float(np.max(np.abs(cold[k] - cached[k]))) for k in cold.files if not np.array_equal(cold[k], cached[k])}
    assert not diffs, f"outputs differ between a compiling and a cache-loading process: {diffs}"


def test_first_use_runs_the_numpy_kernels_while_the_cache_warms(minilm_dir, tmp_path):
    """On an empty Numba cache a pass runs the NumPy kernels (said on stderr, within the parity
    tolerance) while a detached warm-up compiles the default ones; once its marker is there, a new
    process runs them without a word, compiles none (small and large batches) and gets this
    process's bits."""
    import time

    from conftest import TOL

    code = f"""
        import os, numba, numpy as np, minibert
        from minibert import kernels
        model = minibert.BertModel.from_pretrained({str(minilm_dir)!r})
        x = model([[101, 7592, 2088, 102], [101, 2054, 102, 0]], attention_mask=[[1, 1, 1, 1], [1, 1, 1, 0]])
        np.save(os.path.join({str(tmp_path)!r}, os.environ["RUN"] + ".npy"), x.last_hidden_state)
        model(np.full((2, 150), 2088))  # 300 rows: a layer kernel by kernel (at most 256 in one call)
        compiled = [f"{{m.__name__}}.{{name}}" for m in vars(kernels).values() if type(m) is type(kernels)
                    for name, d in vars(m).items() if isinstance(d, numba.core.dispatcher.Dispatcher)
                    and sum(d.stats.cache_misses.values())]
        print("compiled here:", compiled)
    """
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache"), "MINIBERT_BACKGROUND_COMPILE": "1"}
    rc, _, err = _python(code, env={**env, "RUN": "cold"}, timeout=120)
    assert rc == 0, err[-3000:]
    assert "compiling the float32 kernels for this machine in the background" in err, err[-3000:]
    deadline = time.monotonic() + 300
    while not [p for p in (tmp_path / "cache").rglob("minibert-ready-float32-*") if p.suffix != ".lock"]:
        assert time.monotonic() < deadline, "the warm-up left no marker in 300 s"
        time.sleep(1)
    rc, out, err = _python(code, env={**env, "RUN": "warm"}, timeout=120)
    assert rc == 0 and "minibert:" not in err, err[-3000:]
    assert "compiled here: []" in out, f"kernels the warm-up left to compile: {out[-2000:]}"
    model = minibert.BertModel.from_pretrained(str(minilm_dir))
    here = model([[101, 7592, 2088, 102], [101, 2054, 102, 0]], attention_mask=[[1, 1, 1, 1], [1, 1, 1, 0]])
    cold, warm = np.load(tmp_path / "cold.npy"), np.load(tmp_path / "warm.npy")
    assert np.array_equal(warm, here.last_hidden_state), "the cached kernels gave other bits than this process"
    diff = float(np.abs(cold - warm).max())
    assert diff <= TOL["fp32"], f"NumPy kernels vs the compiled ones: max abs diff {diff:.3e}"
    assert not np.array_equal(cold, warm), "the cold process ran the compiled kernels after all"


def test_a_warm_up_that_fails_leaves_the_kernels_to_compile_in_the_process(minilm_dir, tmp_path):
    """If the warm-up process ends without its marker, the next pass compiles the default kernels
    in the process instead of running the NumPy ones for ever."""
    code = f"""
        import sys, time, numpy as np, minibert
        from minibert import runtime
        model = minibert.BertModel.from_pretrained({str(minilm_dir)!r})
        sys.executable = "/bin/false"  # the warm-up it starts exits at once, leaving no marker
        ids = [[101, 7592, 2088, 102]]
        cold = model(ids).last_hidden_state
        runtime._warmups["float32"].wait(timeout=60)
        np.save({str(tmp_path / "after.npy")!r}, model(ids).last_hidden_state)
        np.save({str(tmp_path / "cold.npy")!r}, cold)
    """
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache"), "MINIBERT_BACKGROUND_COMPILE": "1"}
    rc, _, err = _python(code, env=env, timeout=300)
    assert rc == 0, err[-3000:]
    assert "compiling the float32 kernels" in err, err[-3000:]
    here = minibert.BertModel.from_pretrained(str(minilm_dir))([[101, 7592, 2088, 102]]).last_hidden_state
    after = np.load(tmp_path / "after.npy")
    assert np.array_equal(after, here), f"max abs diff {np.abs(after - here).max():.3e}: not the compiled kernels"
    assert not np.array_equal(np.load(tmp_path / "cold.npy"), here)


def test_warmup_rejects_a_dtype_it_has_no_kernels_for():
    r = subprocess.run([sys.executable, "-m", "minibert.warmup", "float16"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "dtype='float16'; expected float32 or float64" in r.stderr, r.stderr[-2000:]


# -- the environment -----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw,expected", [("", True), ("1", True), ("on", True), (" False ", False), ("0", False)])
def test_env_switches(raw, expected, monkeypatch):
    from minibert.runtime import switch

    monkeypatch.setenv("MINIBERT_TEST_SWITCH", raw)
    assert switch("MINIBERT_TEST_SWITCH") is expected


@pytest.mark.parametrize("name", ["MINIBERT_KEEP_FREED_MEMORY", "MINIBERT_PIN_THREADS", "MINIBERT_BACKGROUND_COMPILE"])
def test_a_mistyped_env_switch_fails_at_import(name):
    code, _, err = _python("import minibert", env={name: "maybe"})
    assert code != 0
    assert f"environment variable {name}='maybe'; expected 1 or 0" in err, err[-2000:]


_ENV_PROBE = """
import sys
if sys.argv[1] == "numba-first":
    import numba  # noqa: F401
import os, minibert, numba
print(" ".join(numba.config.THREADING_LAYER_PRIORITY), os.environ.get("GOMP_SPINCOUNT"),
      os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
"""


@pytest.mark.parametrize("env,order,expected", [
    ({}, "minibert-first", ["omp", "tbb", "workqueue", "10000", "20"]),
    ({}, "numba-first", ["omp", "tbb", "workqueue", "10000", "None"]),  # NumPy loaded OpenBLAS already
    ({"NUMBA_THREADING_LAYER_PRIORITY": "workqueue omp tbb", "GOMP_SPINCOUNT": "7", "OPENBLAS_THREAD_TIMEOUT": "3"},
     "minibert-first", ["workqueue", "omp", "tbb", "7", "3"]),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "minibert-first", ["omp", "tbb", "workqueue", "None", "20"]),
])
def test_the_pools_environment_and_what_the_user_set_is_kept(env, order, expected):
    drop = ("NUMBA_THREADING_LAYER", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT")
    base = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    r = subprocess.run([sys.executable, "-c", _ENV_PROBE, order], capture_output=True, text=True,
                       env={**base, **env}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_freed_memory_gives_back_what_malloc_kept():
    """minibert keeps freed blocks for reuse (keep_freed_memory); after a warm-up bigger than what
    follows, release_freed_memory returns them to the OS (the server calls it after its warm-up)."""
    code, out, err = _python("""
        import numpy as np, minibert
        from minibert import runtime
        def rss():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
        assert runtime.keep_freed_memory()
        blocks = [np.ones(1 << 18, np.float32) for _ in range(64)]  # 64 MB in 1 MB blocks, from malloc's heap
        del blocks
        kept = rss()
        print("released", runtime.release_freed_memory(), kept - rss())
    """)
    assert code == 0, err[-3000:]
    released, mb = out.split()[1:]
    assert released == "True" and int(mb) >= 48, out
