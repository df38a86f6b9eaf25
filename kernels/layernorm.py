"""LayerNorm over the last axis, with the residual add fused in.

Signature of every version: ``layernorm(x, residual, weight, bias, eps, x_bias=None) -> y`` where
``y = LayerNorm((x + x_bias) + residual)`` (``residual`` and ``x_bias`` may be None),
``x``/``residual``/``y`` are [..., H] and ``weight``/``bias``/``x_bias`` are [H]. BERT is post-LN:
every sub-layer ends with ``LayerNorm(dense(h) + x)``, so the dense layer's bias and the residual
add belong in this one pass over memory. The adds are rounded in transformers' order.

Versions:
- ``numpy``: the reference: mean, biased variance, normalise, scale and shift.
- ``numba``: one row at a time, sums in float64, two passes (no cancellation); NumPy adds the bias.
- ``numba_v2`` (default): rows over the threads, the bias fused, sums in the input's dtype in 8
  explicit partial sums (``fastmath.lanes_sum``): they vectorize without ``reassoc``, which rounded
  differently in a compiling and a cache-loading process.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .fastmath import lanes_sum
from .registry import FASTMATH, register


@register("layernorm", "numpy")
def layernorm_numpy(x, residual, weight, bias, eps, x_bias=None):
    if x_bias is not None:
        x = x + np.asarray(x_bias, dtype=x.dtype)
    if residual is not None:
        x = x + residual
    mean = x.mean(axis=-1, keepdims=True)  # [..., 1]
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased, as torch.nn.LayerNorm
    return (x - mean) / np.sqrt(var + x.dtype.type(eps)) * weight + bias


@njit(error_model="numpy", cache=True, nogil=True)
def _layernorm_rows(x, residual, has_residual, weight, bias, eps, out):
    n, h = x.shape
    for r in range(n):
        # the sum x + residual is rounded to the array's dtype first, exactly as an unfused add
        for j in range(h):
            out[r, j] = x[r, j] + residual[r, j] if has_residual else x[r, j]
        s = 0.0
        for j in range(h):
            s += out[r, j]
        mean = s / h
        ss = 0.0
        for j in range(h):
            d = out[r, j] - mean
            ss += d * d
        inv = 1.0 / np.sqrt(ss / h + eps)
        for j in range(h):
            out[r, j] = (out[r, j] - mean) * inv * weight[j] + bias[j]


@register("layernorm", "numba")
def layernorm_numba(x, residual, weight, bias, eps, x_bias=None):
    if x_bias is not None:
        x = x + np.asarray(x_bias, dtype=x.dtype)
    shape = x.shape
    x2 = np.ascontiguousarray(x).reshape(-1, shape[-1])
    out = np.empty(x2.shape, dtype=x.dtype)
    weight = np.ascontiguousarray(weight, dtype=x.dtype)
    bias = np.ascontiguousarray(bias, dtype=x.dtype)
    if residual is None:
        _layernorm_rows(x2, x2, False, weight, bias, float(eps), out)
    else:
        r2 = np.ascontiguousarray(residual, dtype=x.dtype).reshape(x2.shape)
        _layernorm_rows(x2, r2, True, weight, bias, float(eps), out)
    return out.reshape(shape)


@njit(inline="always")
def ln_row(src, xb, res, weight, bias, eps, dst):
    # dst = LayerNorm((src + xb) + res)·weight + bias over one row of H: 1-D views; dst may be src.
    # Also run by the dense layers' GEMM on the rows it has just finished (kernels/dense.py)
    h = src.size
    f = dst.dtype.type
    for j in range(h):
        dst[j] = (src[j] + xb[j]) + res[j]
    mean = lanes_sum(dst, f(0), f(0)) / f(h)  # / f(h): with the int h it would be float64, and so every loop after it
    inv = f(1 / np.sqrt(lanes_sum(dst, mean, f(1)) / h + eps))
    for j in range(h):
        dst[j] = (dst[j] - mean) * inv * weight[j] + bias[j]


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
def _layernorm_v2(x, xb, residual, weight, bias, eps, out):
    # x, residual, out: [N, H]; xb, weight, bias: [H]
    for r in prange(x.shape[0]):
        ln_row(x[r], xb, residual[r], weight, bias, eps, out[r])


@register("layernorm", "numba_v2", default=True)
def layernorm_numba_v2(x, residual, weight, bias, eps, x_bias=None):
    shape, dt = x.shape, x.dtype
    h = shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, h)
    out = np.empty(x2.shape, dtype=dt)
    zeros = None
    if x_bias is None or residual is None:
        zeros = np.zeros(h, dtype=dt)
    xb = zeros if x_bias is None else np.ascontiguousarray(x_bias, dtype=dt)
    # no residual: add a zero row (x + 0 is x); a broadcast view costs no memory
    r2 = (np.broadcast_to(zeros, x2.shape) if residual is None
          else np.ascontiguousarray(residual, dtype=dt).reshape(x2.shape))
    _layernorm_v2(x2, xb, r2, np.ascontiguousarray(weight, dtype=dt),
           np.ascontiguousarray(bias, dtype=dt), dt.type(eps), out)
    return out.reshape(shape)
