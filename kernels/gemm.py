"""The dense layers' matrix product, without bias: ``y = x · Wᵀ``.

Signature of every version: ``gemm(x, weight, out=None) -> y`` with ``x`` [N, in], ``weight``
[out, in] (the checkpoint's nn.Linear layout, never transposed or repacked) and ``y`` [N, out]
in ``x``'s dtype; ``out``, if given, an [N, out] array (any strides) that receives ``y``. The
bias is added by the pass that follows (activation or LayerNorm, see their ``bias=`` arguments).

Versions:
- ``numpy``: the reference, ``np.matmul(x, weight.T)``: NumPy's BLAS (OpenBLAS) sgemm/dgemm.
- ``numba_4x3``: a register-blocked dot-product kernel that reads ``weight`` in its own layout.
  Every task of the ``prange`` owns 3 rows of ``weight`` and computes their dot products with 4
  rows of ``x`` at a time: 12 running sums that LLVM keeps in 12 AVX2 registers, each step
  loading 4 + 3 vectors for 12 FMAs, and the 3 weight rows stay in L1/L2 while all N rows of
  ``x`` pass by. Why it exists: for a few rows (one short sentence: N = 16) BLAS copies the whole
  weight matrix into its packed panel layout on every call, which here costs as much as the
  product itself; this kernel streams each weight once and does no copy. Measured on the 48
  GEMMs of a bert-base forward pass at N = 16 (weights out of cache, 2 threads): 94 GFLOP/s
  against OpenBLAS's 69. It stops paying near N = 64, where BLAS's packing is amortized
  (``python -m benchmarks.kernels`` has both at N = 16 and N = 1024). fastmath lets LLVM split
  each sum into 8-lane partial sums: a different summation order from BLAS's, i.e. rounding only.
- ``auto`` (the default): ``numba_4x3`` for N <= ``SMALL_N`` rows, the BLAS reference above.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .registry import register

SMALL_N = 48  # rows up to which numba_4x3 beats OpenBLAS here (see the docstring)


@register("gemm", "numpy")
def gemm_numpy(x, weight, out=None):
    return np.matmul(x, weight.T, out=out)


@njit(inline="always")
def _dot(a, b, zero):
    s = zero
    for k in range(a.size):
        s += a[k] * b[k]
    return s


@njit(parallel=True, fastmath=True, cache=True)
def _gemm_4x3(x, w, out):
    # x [M, K], w [N, K], out [M, N], all C-contiguous: out[i, j] = x[i] · w[j]
    M, N = x.shape[0], w.shape[0]
    z = x.dtype.type(0)
    M4 = M - M % 4
    for jb in prange((N + 2) // 3):
        j = 3 * jb
        if j + 3 > N:  # the last 1 or 2 weight rows: one dot product per output
            for jj in range(j, N):
                for i in range(M):
                    out[i, jj] = _dot(x[i], w[jj], z)
            continue
        w0, w1, w2 = w[j], w[j + 1], w[j + 2]
        for i in range(0, M4, 4):
            x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
            s00 = s01 = s02 = s10 = s11 = s12 = s20 = s21 = s22 = s30 = s31 = s32 = z
            for k in range(x0.size):
                a0, a1, a2, a3 = x0[k], x1[k], x2[k], x3[k]
                b0, b1, b2 = w0[k], w1[k], w2[k]
                s00 += a0 * b0
                s01 += a0 * b1
                s02 += a0 * b2
                s10 += a1 * b0
                s11 += a1 * b1
                s12 += a1 * b2
                s20 += a2 * b0
                s21 += a2 * b1
                s22 += a2 * b2
                s30 += a3 * b0
                s31 += a3 * b1
                s32 += a3 * b2
            out[i, j], out[i, j + 1], out[i, j + 2] = s00, s01, s02
            out[i + 1, j], out[i + 1, j + 1], out[i + 1, j + 2] = s10, s11, s12
            out[i + 2, j], out[i + 2, j + 1], out[i + 2, j + 2] = s20, s21, s22
            out[i + 3, j], out[i + 3, j + 1], out[i + 3, j + 2] = s30, s31, s32
        for i in range(M4, M):  # the last 1-3 rows of x: one dot product per output
            for jj in range(j, j + 3):
                out[i, jj] = _dot(x[i], w[jj], z)


def _check(x, weight, out):
    if x.ndim != 2 or weight.ndim != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemm: x [N, in] and weight [out, in] must agree on `in`; got x {x.shape}, "
                         f"weight {weight.shape}")
    shape = (x.shape[0], weight.shape[0])
    if out is not None and out.shape != shape:
        raise ValueError(f"gemm: out must have shape {shape}; got {out.shape}")
    return shape


def _numba_ok(x, weight):  # what the kernel is compiled for; anything else goes to BLAS
    return (x.dtype == weight.dtype and x.dtype in (np.float32, np.float64) and x.flags.c_contiguous
            and weight.flags.c_contiguous)


@register("gemm", "numba_4x3")
def gemm_numba_4x3(x, weight, out=None):
    shape = _check(x, weight, out)
    if not _numba_ok(x, weight):  # mixed or other dtypes, strided inputs: BLAS handles them
        return gemm_numpy(x, weight, out)
    direct = out is not None and out.flags.c_contiguous
    y = out if direct else np.empty(shape, dtype=x.dtype)
    if y.size:
        _gemm_4x3(x, weight, y)
    if out is not None and not direct:  # a column block of a wider array (project_qkv's fallback)
        out[...] = y
        return out
    return y


@register("gemm", "auto", default=True)
def gemm_auto(x, weight, out=None):
    if x.ndim == 2 and x.shape[0] <= SMALL_N and _numba_ok(x, weight):
        return gemm_numba_4x3(x, weight, out)
    return gemm_numpy(x, weight, out)
