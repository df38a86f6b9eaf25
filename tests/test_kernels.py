"""Every registered version of every kernel against its NumPy reference, on odd shapes, masks included."""
from __future__ import annotations

import math

import sys

import numpy as np
from pathlib import Path
import pytest

from conftest import TOL, assert_close
from minibert import kernels
from minibert.kernels import available, get, select

DTYPES = ["float32", "float64"]


def versions(op):
    return [v for v in available(op) if v != "numpy"]


def tol(dtype):
    return TOL["kernel_fp32" if dtype == "float32" else "kernel_fp64"]


def op_versions(*ops):  # (op, version) pairs for parametrize: one test case per version
    return [(op, v) for op in ops for v in versions(op)]


@pytest.mark.parametrize("op,v", op_versions("gelu", "gelu_tanh", "relu", "silu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7, 13), (2, 3, 37), (0, 5), (64, 300)])
def test_activations_match_reference(op, v, dtype, shape):
    x = (np.random.default_rng(0).standard_normal(shape) * 4).astype(dtype)
    ref = get(op, "numpy")(x)
    assert ref.dtype == x.dtype and ref.shape == x.shape
    y = get(op, v)(x)
    assert y.dtype == x.dtype and y.shape == x.shape, f"{op}/{v}"
    assert_close(y, ref, tol(dtype), f"{op}/{v} {dtype} {shape}")


@pytest.mark.parametrize("op,v", op_versions("gelu", "gelu_tanh", "silu"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_activations_over_the_whole_range(op, v, dtype):
    # the vectorized float32 erf/exp clamp and saturate: check far tails, zero, and 8-lane blocks
    x = np.concatenate([np.linspace(-30, 30, 4097), [-1e4, -90, -88, 0.0, 88, 90, 1e4]]).astype(dtype)
    ref = get(op, "numpy")(x)
    y = get(op, v)(x)
    # values reach 1e4, where a float32 ulp is ~1e-3: compare relative to the magnitude
    assert_close(y / np.maximum(1, np.abs(ref)), ref / np.maximum(1, np.abs(ref)), tol(dtype), f"{op}/{v} {dtype}")


def test_activation_references_are_the_textbook_formulas():
    xs = [-5.0, -1.3, -0.2, 0.0, 0.7, 3.1]
    x = np.array(xs)
    gelu = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in xs]
    tanh = [0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))) for v in xs]
    silu = [v / (1 + math.exp(-v)) for v in xs]
    assert_close(get("gelu", "numpy")(x), gelu, TOL["formula_fp64"], "gelu reference")
    assert_close(get("gelu_tanh", "numpy")(x), tanh, TOL["formula_fp64"], "gelu_tanh reference")
    assert_close(get("silu", "numpy")(x), silu, TOL["formula_fp64"], "silu reference")
    np.testing.assert_array_equal(get("relu", "numpy")(x), np.maximum(x, 0))


def test_gelu_forms_differ():
    """The exact and tanh forms are different functions (to ~1e-3): the config's name matters."""
    x = np.linspace(-3, 3, 101)
    assert np.abs(get("gelu", "numpy")(x) - get("gelu_tanh", "numpy")(x)).max() > 1e-4


@pytest.mark.parametrize("v", versions("layernorm"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (2, 3, 30), (4, 768), (0, 8)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layernorm_matches_reference(v, dtype, shape, with_residual):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    r = (rng.standard_normal(shape) * 2).astype(dtype) if with_residual else None
    w = (1 + 0.3 * rng.standard_normal(shape[-1])).astype(dtype)
    b = (0.3 * rng.standard_normal(shape[-1])).astype(dtype)
    for eps in (1e-12, 1e-5):
        ref = get("layernorm", "numpy")(x, r, w, b, eps)
        y = get("layernorm", v)(x, r, w, b, eps)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert_close(y, ref, tol(dtype), f"layernorm/{v} {dtype} {shape} residual={with_residual} eps={eps}")


def test_layernorm_reference_normalises():
    x = np.random.default_rng(2).standard_normal((6, 50)) * 5 + 3
    y = get("layernorm", "numpy")(x, None, np.ones(50), np.zeros(50), 1e-12)
    assert_close(y.mean(-1), np.zeros(6), TOL["formula_fp64"], "mean")
    assert_close(y.std(-1), np.ones(6), TOL["formula_fp64"], "standard deviation")


@pytest.mark.parametrize("v", versions("layernorm"))
def test_layernorm_on_a_non_contiguous_input(v):
    x = np.random.default_rng(3).standard_normal((8, 20)).astype(np.float32)[:, ::2]
    w, b = np.ones(10, np.float32), np.zeros(10, np.float32)
    assert_close(get("layernorm", v)(x, None, w, b, 1e-12), get("layernorm", "numpy")(x, None, w, b, 1e-12),
                 TOL["kernel_fp32"], f"layernorm/{v} strided")


def _mask(rng, B, Tk, dtype):
    m = np.ones((B, Tk))
    for b in range(B):
        m[b, max(0, Tk - 2 * b):] = 0  # row b pads its last 2b keys; a long batch ends in an all-padding row
    return ((1 - m) * np.finfo(dtype).min).astype(dtype)


@pytest.mark.parametrize("v", versions("masked_softmax"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 5), (3, 5, 7, 9), (4, 2, 3, 6), (2, 4, 64, 77)])
@pytest.mark.parametrize("masked", [False, True])
def test_masked_softmax_matches_reference(v, dtype, shape, masked):
    rng = np.random.default_rng(4)
    s = (rng.standard_normal(shape) * 6).astype(dtype)
    mask = _mask(rng, shape[0], shape[3], dtype) if masked else None
    scale = shape[3] ** -0.5
    ref = get("masked_softmax", "numpy")(s, mask, scale)
    assert np.isfinite(ref).all()
    assert_close(ref.sum(-1), np.ones(shape[:3]), tol(dtype), "reference rows sum to 1")
    y = get("masked_softmax", v)(s, mask, scale)
    assert y.dtype == s.dtype and y.shape == s.shape
    assert_close(y, ref, tol(dtype), f"masked_softmax/{v} {dtype} {shape} masked={masked}")


@pytest.mark.parametrize("version", available("masked_softmax"))
def test_masked_softmax_all_padding_row_is_uniform_not_nan(version):
    s = np.random.default_rng(5).standard_normal((1, 2, 3, 4)).astype(np.float32)
    mask = np.full((1, 4), np.finfo(np.float32).min, dtype=np.float32)
    y = get("masked_softmax", version)(s, mask, 0.5)
    assert_close(y, np.full(y.shape, 0.25), TOL["kernel_fp32"], f"masked_softmax/{version} all padding")


@pytest.mark.parametrize("version", available("masked_softmax"))
def test_masked_softmax_gives_padding_zero_weight(version):
    s = np.random.default_rng(6).standard_normal((2, 1, 3, 5)).astype(np.float32)
    mask = np.zeros((2, 5), dtype=np.float32)
    mask[0, 3:] = np.finfo(np.float32).min
    y = get("masked_softmax", version)(s, mask, 1.0)
    assert (y[0, :, :, 3:] == 0).all() and (y[1] > 0).all()


def test_registry_sets_and_errors():
    assert set(select("numpy")) == set(select("numba")) == set(kernels.OPS)
    assert all(fn is get(op, "numpy") for op, fn in select("numpy").items())
    assert all(fn is not get(op, "numpy") for op, fn in select("numba").items())
    with pytest.raises(ValueError, match="kernels='fast' is not a kernel set"):
        select("fast")
    with pytest.raises(KeyError, match="unknown kernel op 'conv'"):
        get("conv", "numpy")
    with pytest.raises(KeyError, match="has no version 'v9'"):
        get("gelu", "v9")
    with pytest.raises(ValueError, match="registered twice"):
        kernels.register("gelu", "numba")(lambda x: x)
    with pytest.raises(ValueError, match="already has a default version"):
        kernels.register("gelu", "test_second_default", default=True)(lambda x: x)
    assert "test_second_default" not in available("gelu")


def test_wheel_installs_kernels_only_as_minibert_kernels(tmp_path):
    """A top-level `kernels` would shadow the PyPI package of that name that transformers imports."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    import minibert.kernels

    assert minibert.kernels.__name__ == "minibert.kernels"
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(root)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("minibert_numpy-*.whl")  # the distribution name; the package is minibert
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"minibert"}, tops
    assert "minibert/kernels/softmax.py" in names


def test_numba_cache_falls_back_when_the_install_and_home_are_read_only(monkeypatch, tmp_path):
    """A read-only install with a read-only home: the JIT cache goes to the temporary directory.
    (As root every directory is writable, so writability is stubbed.)"""
    from minibert.kernels import numba_cache_dir

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home-cache"))
    assert numba_cache_dir(str(tmp_path / "pkg"), writable=lambda p: True) is None
    only_home = numba_cache_dir(str(tmp_path / "pkg"), writable=lambda p: p.startswith(str(tmp_path / "home-cache")))
    assert only_home is None  # Numba's own user-wide fallback works there
    fallback = numba_cache_dir(str(tmp_path / "pkg"), writable=lambda p: False)
    assert fallback and fallback.startswith(__import__("tempfile").gettempdir())
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert numba_cache_dir(str(tmp_path / "pkg"), writable=lambda p: False) is None  # the user's choice stands


def test_kernels_compile_and_cache_from_a_read_only_copy(tmp_path):
    """End to end, in a fresh interpreter: a copy of the package whose kernels folder cannot hold a
    __pycache__ and a home cache that cannot be created (paths through a plain file fail even for
    root). The kernels still run, and their compiled code is cached in the fallback folder."""
    import os
    import shutil
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    site = tmp_path / "site"
    shutil.copytree(os.path.join(root, "minibert"), site / "minibert", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(os.path.join(root, "kernels"), site / "minibert" / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (site / "minibert" / "kernels" / "__pycache__").write_text("a file where the cache folder would go")
    (tmp_path / "blocked").write_text("")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp_path / "blocked" / "cache"), TMPDIR=str(tmp),
               PYTHONDONTWRITEBYTECODE="1")
    code = ("import numpy as np, os; from minibert.kernels import get; import minibert.kernels as k; "
            "assert k.__file__.startswith(os.environ['PYTHONPATH']), k.__file__; "
            "print(get('gelu', 'numba_v2')(np.ones((2, 8), np.float32)).sum()); print(os.environ['NUMBA_CACHE_DIR'])")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=tmp)
    assert r.returncode == 0, r.stderr
    cache_dir = r.stdout.split()[-1]
    assert cache_dir.startswith(str(tmp)), cache_dir
    assert any(p.suffix == ".nbi" for p in Path(cache_dir).rglob("*")), "no Numba index in the fallback folder"


@pytest.mark.parametrize("version", available("masked_softmax"))
def test_masked_softmax_in_place_and_into_out(version):
    rng = np.random.default_rng(8)
    s = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    mask = np.zeros((2, 7), np.float32)
    mask[1, 4:] = np.finfo(np.float32).min
    ref = get("masked_softmax", "numpy")(s, mask, 0.3)
    out = np.empty_like(s)
    assert get("masked_softmax", version)(s, mask, 0.3, out=out) is out
    assert_close(out, ref, TOL["kernel_fp32"], f"masked_softmax/{version} out=")
    inplace = s.copy()
    get("masked_softmax", version)(inplace, mask, 0.3, out=inplace)
    assert_close(inplace, ref, TOL["kernel_fp32"], f"masked_softmax/{version} in place")
    with pytest.raises(ValueError, match="out must be"):
        get("masked_softmax", version)(s, mask, 0.3, out=np.empty((2, 3, 5, 6), np.float32))


def _attention_case(rng, dtype, lengths, n_head, dH, dense_T=None):
    H = n_head * dH
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    qkv = rng.standard_normal((int(starts[-1]), 3 * H)).astype(dtype)
    mask = None
    if dense_T is not None:  # a dense batch: every sequence dense_T rows, padding keys masked
        mask = np.zeros((len(lengths), dense_T), dtype=dtype)
        mask[0, dense_T // 2:] = np.finfo(dtype).min
        mask[-1, :] = np.finfo(dtype).min  # a sequence with no valid key: uniform, never NaN
    return qkv, starts, mask


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", ["packed", "dense-masked", "head32-long", "odd-head", "head64"])
@pytest.mark.parametrize("v", versions("attention"))
def test_attention_matches_reference(v, dtype, case):
    """Packed sequences of mixed lengths (one empty, one of a single token), a dense batch with
    padding and a row with no valid key, long sequences with head size 32, a head size that is
    neither a multiple of 3 nor of 4 (the blocked kernels' tails), and bert-base's head size 64
    at lengths around one and several vectors of keys (numba_outer's column tiles)."""
    rng = np.random.default_rng(9)
    lengths, n_head, dH, dense_T = {"packed": ([5, 0, 17, 1, 9], 4, 16, None),
                                    "dense-masked": ([12, 12, 12], 3, 8, 12),
                                    "head32-long": ([200, 37], 2, 32, None),
                                    "odd-head": ([7, 4, 3, 10], 2, 5, None),
                                    "head64": ([16, 3, 29, 8, 41], 2, 64, None)}[case]
    qkv, starts, mask = _attention_case(rng, dtype, lengths, n_head, dH, dense_T)
    ref = get("attention", "numpy")(qkv, starts, n_head, dH ** -0.5, mask)
    assert np.isfinite(ref).all()
    y = get("attention", v)(qkv, starts, n_head, dH ** -0.5, mask)
    assert y.dtype == qkv.dtype
    assert_close(y, ref, tol(dtype), f"attention/{v} {dtype} {case}")


def test_attention_reference_is_softmax_of_scaled_scores_times_v():
    """The reference against the formula written out for one sequence and one head."""
    rng = np.random.default_rng(10)
    qkv = rng.standard_normal((6, 3 * 4))
    out = get("attention", "numpy")(qkv, np.array([0, 6]), 1, 0.5)
    q, k, v = qkv[:, :4], qkv[:, 4:8], qkv[:, 8:]
    s = q @ k.T * 0.5
    p = np.exp(s - s.max(1, keepdims=True))
    assert_close(out, (p / p.sum(1, keepdims=True)) @ v, TOL["formula_fp64"], "attention reference")


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_row_loops(dtype):
    """fastmath.row_max / exp_sum (vector loops in LLVM IR) at lengths around one and several
    vectors: the exact maximum, exp(x - max) to the kernel tolerance with masked keys exactly 0,
    the sum in lanes_sum's order (bit for bit), a NaN kept."""
    from numba import njit

    from minibert.kernels.fastmath import exp_sum, lanes_sum, row_max

    @njit
    def loops(a):
        m = row_max(a)
        return m, exp_sum(a, m)

    @njit
    def lanes(a):
        return lanes_sum(a, a.dtype.type(0), 0)

    rng = np.random.default_rng(11)
    for n in [1, 3, 7, 8, 9, 15, 16, 31, 32, 33, 40, 64, 77, 128, 512, 515]:
        x = (rng.standard_normal(n) * 5).astype(dtype)
        if n > 1:
            x[rng.integers(n)] = np.finfo(dtype).min  # a masked key
        a = x.copy()
        m, total = loops(a)
        assert m == x.max(), f"n={n}: max {m} vs {x.max()}"
        assert_close(a, np.exp(x.astype(np.float64) - x.max()), tol(dtype), f"exp, n={n}")
        assert n == 1 or a.min() == 0, f"n={n}: a masked key's weight is {a.min()}, not 0"
        assert total == lanes(a), f"n={n}: sum {total!r} vs lanes_sum {lanes(a)!r}"
    x = np.ones(20, dtype=dtype)
    x[13] = np.nan
    assert np.isnan(loops(x.copy())[1]), "a NaN score must reach the sum"
    if dtype == "float32":  # the vector exp over its whole range: within 2 ulp, 0 below e^-87.3
        x = np.append(np.linspace(-87.33, 0, 300_001), [-87.34, -1e30, -np.inf]).astype(np.float32)
        a = x.copy()
        loops(a)
        ref = np.exp(x[:-3].astype(np.float64))
        ulps = np.abs(a[:-3] - ref) / np.spacing(ref.astype(np.float32))
        assert ulps.max() <= 2, f"exp: {ulps.max():.2f} ulp at x = {x[np.argmax(ulps)]}"
        assert (a[-3:] == 0).all(), f"exp below -87.34 must be exactly 0, got {a[-3:]}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 5, 7), (4, 3, 8), (7, 10, 33), (16, 768, 96), (17, 4, 50),
                                   (50, 12, 30), (0, 6, 5), (5, 6, 0), (6, 0, 5), (18, 50, 40), (130, 24, 7)])
@pytest.mark.parametrize("v", versions("gemm"))
def test_gemm_matches_reference(v, dtype, shape):
    """Every version against x·Wᵀ on shapes that leave row and column tails (N % 4, out % 3, out %
    24 and % 12: numba_packed's panels) and on empty ones, with writable and read-only weights; inputs at BERT's scales (weights ~0.02) so a float32 sum of ~800 products
    stays within the kernel tolerance."""
    N, out_f, in_f = shape
    rng = np.random.default_rng(11)
    x = rng.standard_normal((N, in_f)).astype(dtype)
    w = (0.02 * rng.standard_normal((out_f, in_f))).astype(dtype)
    ref = get("gemm", "numpy")(x, w)
    assert_close(ref, x.astype(np.float64) @ w.T.astype(np.float64), tol(dtype), "reference")
    frozen = w.copy()
    frozen.flags.writeable = False  # as from_pretrained loads weights: numba_packed keeps its panels
    for weight, kind in ((w, "writable"), (frozen, "read-only"), (frozen, "read-only, packed before")):
        y = get("gemm", v)(x, weight)
        assert y.dtype == x.dtype and y.shape == (N, out_f)
        assert_close(y, ref, tol(dtype), f"gemm/{v} {dtype} {shape} {kind} weight")


@pytest.mark.parametrize("version", available("gemm"))
def test_gemm_into_out_views_and_odd_inputs(version):
    """out= a column block of a wider array (project_qkv's unfused path), a transposed weight
    and mixed dtypes: the same values as NumPy."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((6, 20)).astype(np.float32)
    w = (0.1 * rng.standard_normal((9, 20))).astype(np.float32)
    f = get("gemm", version)
    wide = np.full((6, 27), 7.0, dtype=np.float32)
    got = f(x, w, out=wide[:, 9:18])
    assert np.shares_memory(got, wide)
    assert_close(wide[:, 9:18], x @ w.T, TOL["kernel_fp32"], f"gemm/{version} into a view")
    assert (wide[:, :9] == 7).all() and (wide[:, 18:] == 7).all()
    wt = np.asfortranarray(w)  # not C-contiguous
    assert_close(f(x, wt), x @ w.T, TOL["kernel_fp32"], f"gemm/{version} F-ordered weight")
    assert_close(f(x[:, ::2], w[:, ::2]), x[:, ::2] @ w[:, ::2].T, TOL["kernel_fp32"], f"gemm/{version} strided")
    y = f(x.astype(np.float64), w)
    assert y.dtype == np.float64
    assert_close(y, x.astype(np.float64) @ w.T.astype(np.float64), TOL["kernel_fp64"], f"gemm/{version} mixed")


@pytest.mark.parametrize("version", versions("gemm"))
def test_gemm_rejects_mismatched_shapes(version):
    f = get("gemm", version)
    x, w = np.ones((4, 5), np.float32), np.ones((3, 6), np.float32)
    with pytest.raises(ValueError, match=r"x \[N, in\] and weight \[out, in\].*\(4, 5\).*\(3, 6\)"):
        f(x, w)
    with pytest.raises(ValueError, match=r"out must have shape \(4, 3\)"):
        f(np.ones((4, 6), np.float32), w, out=np.empty((3, 4), np.float32))


def test_gemm_auto_takes_the_4x3_kernel_for_few_rows_of_a_writable_weight(monkeypatch):
    from minibert.kernels import gemm as G

    called = []
    monkeypatch.setattr(G, "_gemm_4x3", lambda x, w, out: called.append(x.shape[0]) or out.fill(0))
    w = np.ones((6, 5), np.float32)  # writable: read-only weights go to numba_packed (next test)
    G.gemm_auto(np.ones((G.SMALL_N, 5), np.float32), w)
    G.gemm_auto(np.ones((G.SMALL_N + 1, 5), np.float32), w)
    G.gemm_auto(np.ones((3, 5)), w)  # mixed dtypes: BLAS
    assert called == [G.SMALL_N]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_packed_row_blocks(monkeypatch, dtype):
    """Many row blocks (a tiny BLOCK_BYTES), blocks whose rows leave a tile tail, and the padded
    last panel in every block: the same values as the reference."""
    from minibert.kernels import gemm as G

    monkeypatch.setattr(G, "BLOCK_BYTES", 600)
    rng = np.random.default_rng(13)
    x = rng.standard_normal((203, 37)).astype(dtype)
    w = (0.05 * rng.standard_normal((53, 37))).astype(dtype)
    assert 1 < G.block_rows(x) < x.shape[0] and G.block_rows(x) % G.TILE_ROWS == 0
    assert_close(G.gemm_numba_packed(x, w), x @ w.T, tol(dtype), f"gemm/numba_packed {dtype} row blocks")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_packed_few_rows_run_in_chunks_of_k_with_the_bits_of_whole_panels(dtype):
    """A block of up to CHUNKED_ROWS rows runs each panel K_CHUNK steps at a time (every tile
    shape, K not a multiple of the chunk, the padded last panel, each epilogue): the same values
    as the reference, and the same bits as those rows inside a larger block, whose tiles run
    whole panels (each output is the same FMAs in the same order either way)."""
    from minibert.kernels import gemm as G
    from minibert.kernels.activations import ACT_CODES

    rng = np.random.default_rng(14)
    K, N = 3 * G.K_CHUNK + 5, 2 * G.panel_width(dtype) + 7
    w = (0.05 * rng.standard_normal((N, K))).astype(dtype)
    panels = G.pack(w)
    bias, lw, lb = (rng.standard_normal(N).astype(dtype) for _ in range(3))
    big = rng.standard_normal((G.CHUNKED_ROWS + 9, K)).astype(dtype)
    residual = rng.standard_normal((big.shape[0], N)).astype(dtype)
    assert G.block_rows(big) >= big.shape[0], "the larger block must be one block of whole-panel tiles"
    epilogues = {"product": {}, "bias + gelu": dict(bias=bias, act=ACT_CODES["gelu"]),
                 "layernorm": dict(bias=bias, ln=(residual, lw, lb, 1e-12))}
    for name, kw in epilogues.items():
        whole = np.empty((big.shape[0], N), dtype)
        G.gemm_packed(big, panels, whole, **kw)
        for M in range(1, G.CHUNKED_ROWS + 1):
            x = np.ascontiguousarray(big[:M])
            if "ln" in kw:
                kw = dict(kw, ln=(np.ascontiguousarray(residual[:M]), lw, lb, 1e-12))
            y = np.empty((M, N), dtype)
            G.gemm_packed(x, panels, y, **kw)
            if name == "product":
                assert_close(y, x.astype(np.float64) @ w.T.astype(np.float64), tol(dtype), f"{M} rows")
            diff = np.abs(y - whole[:M]).max()
            assert np.array_equal(y, whole[:M]), f"{name}, {M} rows: max abs difference {diff:.3g} from whole panels"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("N,K", [(1, 1), (7, 5), (384, 1536), (2304, 768)])
def test_gemm_packed_panels_start_on_a_cache_line(N, K, dtype):
    # one AVX-512 load per panel row: a panel starting off a 64-byte line splits every load in two
    from minibert.kernels import gemm

    w = np.random.default_rng(0).standard_normal((N, K)).astype(dtype)
    panels = gemm.pack(w)
    NR = gemm.panel_width(dtype)
    assert panels.ctypes.data % 64 == 0, f"panels start {panels.ctypes.data % 64} bytes into a cache line"
    assert panels.flags.c_contiguous and panels.shape == (-(-N // NR), K, NR)
    expect = np.zeros((panels.shape[0] * NR, K), dtype)
    expect[:N] = w
    np.testing.assert_array_equal(panels, expect.reshape(-1, NR, K).transpose(0, 2, 1))


def _vm_flags(address):  # the VmFlags of the mapping that holds ``address`` (/proc/self/smaps)
    flags, inside = None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("VmFlags:"):
                flags = line.split()[1:]
    return flags


@pytest.mark.skipif(not (sys.platform.startswith("linux") and hasattr(__import__("mmap"), "MADV_HUGEPAGE")),
                    reason="transparent huge pages are Linux's")
def test_gemm_packed_panels_are_on_memory_advised_for_huge_pages():
    """Panels of every size (MiniLM's are all under NumPy's own 4 MiB huge-page threshold) go one
    after another into 2 MiB-aligned chunks advised MADV_HUGEPAGE ('hg' in the mapping's VmFlags);
    a chunk outlives this process's filling of it only through its panels."""
    import gc
    import weakref

    from minibert.kernels import gemm

    rng = np.random.default_rng(0)
    small, large = (gemm.pack(rng.standard_normal(s).astype(np.float32)) for s in ((384, 384), (3000, 3000)))
    for panels in (small, large):
        assert "hg" in _vm_flags(panels.ctypes.data), "panels on memory not advised for huge pages"
    assert large.nbytes > gemm._HugePages.CHUNK  # a mapping of its own, unmapped with its panels
    assert gemm._ARENA.chunk is not None and not np.shares_memory(large, gemm._ARENA.chunk)
    mapping = weakref.ref(large.base.base.obj)  # panels -> the mapping's bytes -> memoryview -> mmap
    del large, panels
    gc.collect()
    assert mapping() is None, "a mapping no panel uses stayed mapped"
    nxt = gemm.pack(rng.standard_normal((384, 384)).astype(np.float32))  # the next panel in the same chunk
    assert np.shares_memory(small.base, nxt.base) and nxt.ctypes.data % 64 == 0


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork is POSIX")
def test_a_child_forked_while_the_panel_arena_is_locked_can_pack():
    """Another thread may be packing a weight (holding the arena's lock) when a thread forks; the
    child has only the forking thread, so the lock must be free there, not held for ever."""
    import os

    from minibert.kernels import gemm

    with gemm._ARENA.lock:
        pid = os.fork()
        if pid == 0:  # the child: pack, or exit 1 if the lock is still taken
            code = 0 if gemm._ARENA.lock.acquire(timeout=10) else 1
            if code == 0:
                gemm._ARENA.lock.release()
                gemm.pack(np.ones((8, 8), np.float32))
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child found the arena's lock held"


def test_gemm_packed_keeps_panels_of_read_only_weights_only():
    """A read-only weight is packed once and its panels dropped with it; a writable one is packed
    on every call, so an in-place change is seen by the next product."""
    import gc

    from minibert.kernels import gemm as G

    rng = np.random.default_rng(14)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    w = rng.standard_normal((30, 16)).astype(np.float32)
    assert G.packed(w) is not G.packed(w)
    G.gemm_numba_packed(x, w)
    w[3] = 0.0
    assert_close(G.gemm_numba_packed(x, w), x @ w.T, TOL["kernel_fp32"], "gemm/numba_packed after an edit")
    w.flags.writeable = False
    panels = G.packed(w)
    NR = G.panel_width(np.float32)  # 24, or 48 on AVX-512
    P = -(-30 // NR)
    assert G.packed(w) is panels and panels.shape == (P, 16, NR)
    assert (panels[-1, :, 30 - (P - 1) * NR:] == 0).all()  # columns past 30: zero padding
    key = id(w)
    assert key in G._PACKED
    del w, panels
    gc.collect()
    assert key not in G._PACKED, "the panels outlived their weight"


def test_gemm_auto_packs_read_only_weights(monkeypatch):
    from minibert.kernels import gemm as G

    called = []
    monkeypatch.setattr(G, "_gemm_packed", lambda x, wp, out, *epilogue: called.append(x.shape[0]) or out.fill(0))
    w = np.ones((6, 5), np.float32)
    G.gemm_auto(np.ones((3, 5), np.float32), w)  # writable: numba_4x3
    w.flags.writeable = False
    G.gemm_auto(np.ones((3, 5), np.float32), w)
    G.gemm_auto(np.ones((500, 5), np.float32), w)  # any number of rows
    G.gemm_auto(np.ones((3, 5)), w)  # mixed dtypes: BLAS
    assert called == [3, 500]


def test_gemm_auto_sees_an_edit_after_a_packed_weight_is_made_writable():
    """gemm_auto's shortcut to kept panels must not outlive the weight's read-only flag."""
    from minibert.kernels import gemm as G

    rng = np.random.default_rng(15)
    x = rng.standard_normal((16, 24)).astype(np.float32)
    w = rng.standard_normal((48, 24)).astype(np.float32)
    w.flags.writeable = False
    G.gemm_auto(x, w)
    G.gemm_auto(x, w)  # from the kept panels
    w.flags.writeable = True
    w[5] = 0.0
    assert_close(G.gemm_auto(x, w), x @ w.T, TOL["kernel_fp32"], "gemm/auto after flipping read-only off and editing")


# -- dense_act / dense_layernorm: the GEMM with its epilogue -------------------------------------------
def _dense_case(rng, dtype, N, out_f, in_f):
    x = rng.standard_normal((N, in_f)).astype(dtype)
    w = (0.05 * rng.standard_normal((out_f, in_f))).astype(dtype)
    b = rng.standard_normal(out_f).astype(dtype)
    frozen = w.copy()
    frozen.flags.writeable = False  # as from_pretrained loads weights: the packed, fused path
    return x, w, frozen, b


DENSE_SHAPES = [(1, 24, 8), (16, 384, 96), (17, 53, 37), (203, 50, 33), (0, 24, 8), (5, 7, 3), (300, 30, 9)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DENSE_SHAPES)
@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("v", versions("dense_act"))
def test_dense_act_matches_reference(monkeypatch, v, dtype, shape, act):
    """act(x·Wᵀ + b) on shapes with row and panel tails, with many row blocks (a tiny block size)
    and with one, for writable and read-only weights: every version against the reference."""
    from minibert.kernels import gemm as G

    x, w, frozen, b = _dense_case(np.random.default_rng(21), dtype, *shape)
    ref = get("dense_act", "numpy")(x, w, b, act)
    ref_parts = get(act or "relu", "numpy")(x @ w.T, b) if act else x @ w.T + b
    assert_close(ref, ref_parts, tol(dtype), "dense_act reference")
    for block_bytes in (G.BLOCK_BYTES, 200):
        monkeypatch.setattr(G, "BLOCK_BYTES", block_bytes)
        for weight, kind in ((w, "writable"), (frozen, "read-only")):
            y = get("dense_act", v)(x, weight, b, act)
            assert y.dtype == x.dtype and y.shape == (shape[0], shape[1])
            assert_close(y, ref, tol(dtype), f"dense_act/{v} {act} {dtype} {shape} {kind}, blocks of {block_bytes} B")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DENSE_SHAPES)
@pytest.mark.parametrize("v", versions("dense_layernorm"))
def test_dense_layernorm_matches_reference(monkeypatch, v, dtype, shape):
    """LayerNorm((x·Wᵀ + b) + residual): the last task of each row block normalizes it, so many
    row blocks (a tiny block size) and one; repeated, since which task is last varies."""
    from minibert.kernels import gemm as G

    rng = np.random.default_rng(22)
    x, w, frozen, b = _dense_case(rng, dtype, *shape)
    res = rng.standard_normal((shape[0], shape[1])).astype(dtype)
    lw = (1 + 0.1 * rng.standard_normal(shape[1])).astype(dtype)
    lb = (0.1 * rng.standard_normal(shape[1])).astype(dtype)
    ref = get("dense_layernorm", "numpy")(x, w, b, res, lw, lb, 1e-12)
    assert_close(ref, get("layernorm", "numpy")(x @ w.T, res, lw, lb, 1e-12, b), tol(dtype), "reference")
    for block_bytes in (G.BLOCK_BYTES, 200):
        monkeypatch.setattr(G, "BLOCK_BYTES", block_bytes)
        for weight, kind in ((w, "writable"), (frozen, "read-only"), (frozen, "read-only"), (frozen, "read-only")):
            y = get("dense_layernorm", v)(x, weight, b, res, lw, lb, 1e-12)
            assert y.dtype == x.dtype and y.shape == res.shape
            assert_close(y, ref, tol(dtype), f"dense_layernorm/{v} {dtype} {shape} {kind}, blocks of {block_bytes} B")


def test_dense_fused_path_runs_for_read_only_weights_only(monkeypatch):
    """The read-only weight goes through the epilogue kernel (once per call), a writable one through
    the two kernels; both give the reference's values (the tests above)."""
    from minibert.kernels import dense as D

    calls = []  # the epilogue of each fused call: "ln", the activation code (0: the bias only), or "product"
    real = D.gemm_packed
    monkeypatch.setattr(D, "gemm_packed", lambda *a, **kw: calls.append(
        "ln" if "ln" in kw else a[4] if len(a) > 4 else "product" if len(a) == 3 else 0) or real(*a, **kw))
    x, w, frozen, b = _dense_case(np.random.default_rng(23), np.float32, 16, 48, 24)
    res = np.zeros((16, 48), np.float32)
    ones = np.ones(48, np.float32)
    D.dense_act_numba_packed(x, w, b, "gelu")
    D.dense_layernorm_numba_packed(x, w, b, res, ones, b, 1e-12)
    assert calls == []
    D.dense_act_numba_packed(x, frozen, b, "gelu")
    D.dense_layernorm_numba_packed(x, frozen, b, res, ones, b, 1e-12)
    D.dense_act_numba_packed(np.asfortranarray(x), frozen, b)  # strided x: the two kernels
    assert calls == [D.ACT_CODES["gelu"], "ln"]
    many = np.ones((1025, 24), np.float32)
    D.dense_act_numba_packed(many, frozen, b, "gelu")  # the epilogue at any number of rows
    D.dense_act_numba_packed(many, frozen, b)
    assert calls == [D.ACT_CODES["gelu"], "ln", D.ACT_CODES["gelu"], 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", [None, "gelu", "gelu_tanh", "relu", "silu"])
def test_dense_act_epilogue_has_the_activation_kernels_bits(dtype, act):
    """The epilogue (float32: in the tile's registers) gives the bits of the product followed by the
    default activation kernel with the bias, over whole tiles, the chunked few-row path and the
    padded last panel."""
    from minibert.kernels import gemm as G
    from minibert.kernels.activations import ACT_CODES

    rng = np.random.default_rng(25)
    N, K = 2 * G.panel_width(dtype) + 7, G.K_CHUNK + 3
    w = (0.05 * rng.standard_normal((N, K))).astype(dtype)
    b = rng.standard_normal(N).astype(dtype)
    panels = G.pack(w)
    for M in (3, G.CHUNKED_ROWS, 203):
        x = (4 * rng.standard_normal((M, K))).astype(dtype)
        fused, product = np.empty((M, N), dtype), np.empty((M, N), dtype)
        G.gemm_packed(x, panels, fused, b, ACT_CODES[act])
        G.gemm_packed(x, panels, product)
        two = product + b if act is None else kernels.default(act)(product, b)
        diff = np.abs(fused - two).max()
        assert np.array_equal(fused, two), f"{act} {dtype} {M} rows: max abs difference {diff:.3g}"


@pytest.mark.parametrize("version", available("dense_act"))
def test_dense_act_rejects_bad_arguments(version):
    f = get("dense_act", version)
    x, w = np.ones((4, 5), np.float32), np.ones((3, 5), np.float32)
    with pytest.raises(ValueError, match=r"act='tanh' is not an activation; expected None .*'gelu'"):
        f(x, w, np.ones(3, np.float32), "tanh")
    if version != "numpy":
        with pytest.raises(ValueError, match=r"bias must have shape \(3,\).*got \(4,\)"):
            f(x, w, np.ones(4, np.float32))
        with pytest.raises(ValueError, match=r"x \[N, in\] and weight \[out, in\]"):
            f(np.ones((4, 6), np.float32), w, np.ones(3, np.float32))


@pytest.mark.parametrize("version", versions("dense_layernorm"))
def test_dense_layernorm_rejects_bad_arguments(version):
    f = get("dense_layernorm", version)
    x, w, v = np.ones((4, 5), np.float32), np.ones((3, 5), np.float32), np.ones(3, np.float32)
    w.flags.writeable = False
    with pytest.raises(ValueError, match=r"residual must have the output's shape \(4, 3\); got \(4, 5\)"):
        f(x, w, v, np.ones((4, 5), np.float32), v, v, 1e-12)
    with pytest.raises(ValueError, match=r"ln_weight must have shape \(3,\).*got \(2,\)"):
        f(x, w, v, np.ones((4, 3), np.float32), v[:2], v, 1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [1, 16, 300])
def test_prepared_dense_layers_equal_the_ops(dtype, N):
    """dense.prepare (the model's dense layers, made at load) runs the same kernel as dense_act / dense_layernorm
    on the same arguments: equal values; None for a writable weight."""
    from minibert.kernels import dense as D

    rng = np.random.default_rng(24)
    x, w, frozen, b = _dense_case(rng, dtype, N, 48, 40)
    assert D.prepare(w, b) is None
    res = rng.standard_normal((N, 48)).astype(dtype)
    lw, lb = (1 + 0.1 * rng.standard_normal(48)).astype(dtype), (0.1 * rng.standard_normal(48)).astype(dtype)
    for act in (None, "gelu", "silu"):
        y = D.prepare(frozen, b, act)(x)
        ref = D.dense_act_numba_packed(x, frozen, b, act)
        assert np.array_equal(y, ref), f"{act}: max abs difference {np.abs(y - ref).max():.3e}"
    y = D.prepare(frozen, b, ln=(lw, lb, 1e-12))(x, res)
    ref = D.dense_layernorm_numba_packed(x, frozen, b, res, lw, lb, 1e-12)
    assert np.array_equal(y, ref), f"LayerNorm: max abs difference {np.abs(y - ref).max():.3e}"


def test_avx2_and_avx512_widths_give_the_same_bits(tmp_path, minilm_dir):
    """The GEMM and P·V tiles are 8 float32 lanes wide for an AVX2 target and 16 for AVX-512; every
    output is one FMA per k, k ascending, at either width. A process compiling for Haswell (AVX2,
    its own Numba cache) gives this process's bits, on a padded batch of the real MiniLM."""
    import subprocess
    import sys

    from minibert import BertModel
    from minibert.kernels import gemm

    script = (
        "import sys, numpy as np\n"
        "from minibert import BertModel\n"
        "from minibert.kernels import gemm\n"
        "x = np.load(sys.argv[2])\n"
        "out = BertModel.from_pretrained(sys.argv[1])(x['ids'], x['mask']).last_hidden_state\n"
        "np.save(sys.argv[3], out)\n"
        "print(gemm.VECTOR_BYTES)\n")
    ids = np.random.default_rng(5).integers(1000, 20000, size=(3, 40))
    mask = np.ones_like(ids)
    mask[1, 25:] = 0
    np.savez(tmp_path / "x.npz", ids=ids, mask=mask)
    from numba.core.registry import cpu_target

    host = cpu_target.target_context.codegen().magic_tuple()[2].split(",")
    avx2 = ",".join("-" + f[1:] if f[1:].startswith(("avx512", "amx", "avx10", "evex512")) else f for f in host)
    env = {**__import__("os").environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": avx2,
           "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", script, str(minilm_dir), str(tmp_path / "x.npz"), str(tmp_path / "y.npy")],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "32", "a Haswell target should build the 8-lane tiles"
    theirs = np.load(tmp_path / "y.npy")
    ours = BertModel.from_pretrained(minilm_dir)(ids, mask).last_hidden_state
    diff = float(np.abs(ours - theirs).max())
    assert np.array_equal(ours, theirs), f"this process ({gemm.VECTOR_BYTES}-byte tiles) vs AVX2: max abs diff {diff:.3e}"


_ZEN4 = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512vnni", "avx512bf16")


def test_the_avx512_build_compiles_on_a_host_without_it(tmp_path, minilm_dir):
    """A host without AVX-512 cannot run the 16-lane tiles (8-row GEMM and P·V tiles, both
    attention kernels' AVX-512 forms), but it can compile them: a process targeting a Zen 4 with
    AVX-512 compiles, without calling, every kernel whose code depends on the width — the
    whole-layer kernel (the packed GEMM with each epilogue, the default attention) and both
    attention kernels, for both dtypes, with the real MiniLM's argument types. So a change made on
    an AVX2 host cannot break the AVX-512 build unseen; on an AVX-512 host every test runs it."""
    import os
    import subprocess
    import sys

    from numba.core.registry import cpu_target

    host = cpu_target.target_context.codegen().magic_tuple()[2].split(",")
    if "+avx512f" in host:
        pytest.skip("this host runs the AVX-512 build in every test")
    features = ",".join("+" + f[1:] if f[1:] in _ZEN4 else f for f in host)
    script = (
        "import sys, numpy as np\n"
        "from numba import typeof\n"
        "from minibert import BertModel\n"
        "from minibert.kernels import attention as A, gemm as G, layer as KL\n"
        "assert (G.VECTOR_BYTES, G.TILE_ROWS) == (64, 8), (G.VECTOR_BYTES, G.TILE_ROWS)\n"
        "for dtype in ('float32', 'float64'):\n"
        "    dt = np.dtype(dtype)\n"
        "    whole = BertModel.from_pretrained(sys.argv[1], dtype=dtype).encoder.layer[0].dense.whole\n"
        "    x, starts, mask = np.zeros((16, 384), dt), np.array([0, 16]), np.zeros((1, 1), dt)\n"
        "    args = (x, starts, mask, False, 12, dt.type(0.125), 16, 16, 16, *whole.weights)\n"
        "    KL._layer.compile(tuple(map(typeof, args)))\n"
        "    for kernel in (A._attention_tiled, A._attention_gemm):\n"
        "        kernel.compile(tuple(map(typeof, (np.zeros((16, 1152), dt), starts, mask, True, 12, dt.type(0.125), x))))\n"
        "for sig in G._gemm_packed.signatures:\n"
        "    print(sig[0].dtype, sum('zmm' in line for line in G._gemm_packed.inspect_asm(sig).splitlines()))\n")
    env = {**os.environ, "NUMBA_CPU_NAME": "znver4", "NUMBA_CPU_FEATURES": features,
           "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-c", script, str(minilm_dir)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr
    zmm = dict(line.split() for line in r.stdout.splitlines())
    assert set(zmm) == {"float32", "float64"} and all(int(n) > 0 for n in zmm.values()), \
        f"the packed GEMM should be built on 512-bit registers: lines using zmm by dtype {zmm}"
