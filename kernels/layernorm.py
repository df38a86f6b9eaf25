"""LayerNorm over the last axis, with the residual add fused in.

Signature of every version: ``layernorm(x, residual, weight, bias, eps) -> y`` where
``y = LayerNorm(x + residual)`` (``residual`` may be None), ``x``/``residual``/``y`` are
[..., H] and ``weight``/``bias`` are [H]. BERT is post-LN: every sub-layer ends with
``LayerNorm(sublayer(x) + x)``, so the add belongs inside the kernel.

Versions:
- ``numpy``: the reference — mean, biased variance, normalise, scale and shift.
- ``numba``: one pass per row over the flattened [N, H] view; the row's sum and sum of squared
  deviations are accumulated in float64 (two passes over the row, no catastrophic cancellation).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .registry import register


@register("layernorm", "numpy")
def layernorm_numpy(x, residual, weight, bias, eps):
    if residual is not None:
        x = x + residual
    mean = x.mean(axis=-1, keepdims=True)  # [..., 1]
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased, as torch.nn.LayerNorm
    return (x - mean) / np.sqrt(var + x.dtype.type(eps)) * weight + bias


@njit(cache=True)
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


@register("layernorm", "numba", default=True)
def layernorm_numba(x, residual, weight, bias, eps):
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
