"""Activation functions: GELU (exact erf form and tanh form), ReLU, SiLU.

Versions, each with the reference's signature ``f(x) -> y`` (same shape and dtype as ``x``):
- ``numpy``: the reference. NumPy has no erf, so the exact GELU maps ``math.erf`` over the
  elements (slow, but exact in float64 and written for clarity).
- ``numba``: one ``@njit(cache=True)`` loop over the flattened array. No ``fastmath``: the exact
  GELU must match torch's erf to fp32 rounding and fp64 parity is held to 1e-10.

Why two GELUs: BERT's "gelu" is the exact ``0.5·x·(1 + erf(x/√2))``; "gelu_new",
"gelu_pytorch_tanh" and "gelu_fast" are the tanh approximation
``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` — the three spellings differ only in rounding.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .registry import register

_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

_erf = np.frompyfunc(math.erf, 1, 1)


# --- reference ---------------------------------------------------------------------------------
@register("gelu", "numpy")
def gelu_numpy(x):
    """Exact GELU: 0.5·x·(1 + erf(x/√2))."""
    erf = _erf(x * x.dtype.type(_SQRT_HALF)).astype(x.dtype)
    return x * x.dtype.type(0.5) * (1 + erf)


@register("gelu_tanh", "numpy")
def gelu_tanh_numpy(x):
    """tanh-approximated GELU."""
    c = x.dtype.type(_SQRT_2_OVER_PI)
    return x.dtype.type(0.5) * x * (1 + np.tanh(c * (x + x.dtype.type(0.044715) * x * x * x)))


@register("relu", "numpy")
def relu_numpy(x):
    return np.maximum(x, x.dtype.type(0))


@register("silu", "numpy")
def silu_numpy(x):
    """x·sigmoid(x)."""
    return x / (1 + np.exp(-x))


# --- numba v1: one scalar loop per op -----------------------------------------------------------
@njit(cache=True)
def _gelu_loop(x, out):
    for i in range(x.size):
        v = x[i]
        out[i] = 0.5 * v * (1.0 + math.erf(v * _SQRT_HALF))


@njit(cache=True)
def _gelu_tanh_loop(x, out):
    for i in range(x.size):
        v = x[i]
        out[i] = 0.5 * v * (1.0 + math.tanh(_SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)))


@njit(cache=True)
def _relu_loop(x, out):
    for i in range(x.size):
        v = x[i]
        out[i] = v if v > 0 else 0.0


@njit(cache=True)
def _silu_loop(x, out):
    for i in range(x.size):
        v = x[i]
        out[i] = v / (1.0 + math.exp(-v))


def _elementwise(loop):
    def run(x):
        x = np.ascontiguousarray(x)
        out = np.empty_like(x)
        loop(x.reshape(-1), out.reshape(-1))
        return out

    run.__name__ = loop.__name__.strip("_").replace("_loop", "_numba")
    run.__doc__ = f"Numba version of {run.__name__.replace('_numba', '')}: a scalar loop over the flat array."
    return run


gelu_numba = register("gelu", "numba", default=True)(_elementwise(_gelu_loop))
gelu_tanh_numba = register("gelu_tanh", "numba", default=True)(_elementwise(_gelu_tanh_loop))
relu_numba = register("relu", "numba", default=True)(_elementwise(_relu_loop))
silu_numba = register("silu", "numba", default=True)(_elementwise(_silu_loop))
