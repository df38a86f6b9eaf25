"""Activation functions: GELU (exact erf form and tanh form), ReLU, SiLU.

Versions, each with the reference's signature ``f(x, bias=None) -> y`` computing ``act(x + bias)``
(same shape and dtype as ``x``; ``bias`` [x.shape[-1]] is the bias of the dense layer that made
``x``, so the add is fused into the activation's pass over memory instead of a pass of its own):
- ``numpy``: the reference. NumPy has no erf, so the exact GELU maps ``math.erf`` over the
  elements (slow, but exact in float64 and written for clarity).
- ``numba``: one ``@njit(error_model="numpy", cache=True)`` loop over the flattened array. No ``fastmath``: the exact
  GELU must match torch's erf to fp32 rounding and fp64 parity is held to 1e-10.
- ``numba_v2`` (the default for all four): float32 erf/exp as vectorizable multiply-adds
  (fastmath.py), a ``prange`` over the rows on both cores, the bias added in the same pass;
  float64 keeps math.erf/math.exp. See below.

Why two GELUs: BERT's "gelu" is the exact ``0.5·x·(1 + erf(x/√2))``; "gelu_new",
"gelu_pytorch_tanh" and "gelu_fast" are the tanh approximation
``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`` — the three spellings differ only in rounding.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .fastmath import _EXP_HI, LANES_BYTES, _Vec, fexp, ferf
from .registry import FASTMATH, register

_SQRT_HALF = math.sqrt(0.5)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)

_erf = np.frompyfunc(math.erf, 1, 1)


def _add_bias(x, bias):
    return x if bias is None else x + np.asarray(bias, dtype=x.dtype)


# --- reference ---------------------------------------------------------------------------------
@register("gelu", "numpy")
def gelu_numpy(x, bias=None):
    """Exact GELU: 0.5·x·(1 + erf(x/√2))."""
    x = _add_bias(x, bias)
    erf = _erf(x * x.dtype.type(_SQRT_HALF)).astype(x.dtype)
    return x * x.dtype.type(0.5) * (1 + erf)


@register("gelu_tanh", "numpy")
def gelu_tanh_numpy(x, bias=None):
    """tanh-approximated GELU."""
    x = _add_bias(x, bias)
    c = x.dtype.type(_SQRT_2_OVER_PI)
    return x.dtype.type(0.5) * x * (1 + np.tanh(c * (x + x.dtype.type(0.044715) * x * x * x)))


@register("relu", "numpy")
def relu_numpy(x, bias=None):
    x = _add_bias(x, bias)
    return np.maximum(x, x.dtype.type(0))


@register("silu", "numpy")
def silu_numpy(x, bias=None):
    """x·sigmoid(x)."""
    x = _add_bias(x, bias)
    with np.errstate(over="ignore"):  # e^-x overflows to inf for x << 0, and x / inf is the right 0
        return x / (1 + np.exp(-x))


# --- numba v1: one scalar loop per op -----------------------------------------------------------
@njit(error_model="numpy", cache=True, nogil=True)
def _gelu_loop(x, out):
    for i in range(x.size):
        v = x[i]
        out[i] = 0.5 * v * (1.0 + math.erf(v * _SQRT_HALF))


@njit(error_model="numpy", cache=True, nogil=True)
def _gelu_tanh_loop(x, out):
    for i in range(x.size):
        v = x[i]
        out[i] = 0.5 * v * (1.0 + math.tanh(_SQRT_2_OVER_PI * (v + 0.044715 * v * v * v)))


@njit(error_model="numpy", cache=True, nogil=True)
def _relu_loop(x, out):
    for i in range(x.size):
        v = x[i]
        out[i] = v if v > 0 else 0.0


@njit(error_model="numpy", cache=True, nogil=True)
def _silu_loop(x, out):
    for i in range(x.size):
        v = x[i]
        out[i] = v / (1.0 + math.exp(-v))


def _elementwise(loop):
    def run(x, bias=None):
        x = np.ascontiguousarray(_add_bias(x, bias))
        out = np.empty_like(x)
        loop(x.reshape(-1), out.reshape(-1))
        return out

    run.__name__ = loop.__name__.strip("_").replace("_loop", "_numba")
    run.__doc__ = f"Numba version of {run.__name__.replace('_numba', '')}: a scalar loop over the flat array."
    return run


gelu_numba = register("gelu", "numba")(_elementwise(_gelu_loop))
gelu_tanh_numba = register("gelu_tanh", "numba")(_elementwise(_gelu_tanh_loop))
relu_numba = register("relu", "numba")(_elementwise(_relu_loop))
silu_numba = register("silu", "numba")(_elementwise(_silu_loop))


# --- numba v2: vectorizable float32 math, both cores -----------------------------------------------
# The v1 loops call math.erf / math.tanh, which LLVM cannot vectorize here (no SVML), so they run
# one element at a time. v2 computes erf and exp in float32 with the multiply-add formulas of
# fastmath.py, as vector IR of fixed FMAs (_act_row32, 8 lanes of AVX2), and splits the array over
# Numba's threads (prange); within the kernel tolerance (a few float32 ulps; erf's approximation
# is within 4e-7 of math.erf). The dense layers' GEMM applies the same formulas (_act32) to each
# tile's sums (kernels/gemm.py): the same bits. float64 keeps math.erf/math.exp (fp64 parity).
NONE, GELU, GELU_TANH, RELU, SILU = 0, 1, 2, 3, 4  # act_row's codes; NONE adds the bias only
ACT_CODES = {None: NONE, "gelu": GELU, "gelu_tanh": GELU_TANH, "relu": RELU, "silu": SILU}


def act_row(src, b, dst, act):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


@overload(act_row, inline="always")
def _act_row(src, b, dst, act):
    # dst[j] = act(src[j] + b[j]) over one row, act one of the codes above; dst may be src.
    # float32 contiguous rows: the vector loops of _act_row32, whatever the row's length; else
    # (float64, strided views) the loops below
    if _f32(src, b, dst) and src.ndim == b.ndim == dst.ndim == 1:
        return lambda src, b, dst, act: _act_row32(src, b, dst, act)
    return lambda src, b, dst, act: _act_loops(src, b, dst, act)


def _act32(v, x, act):
    """IR for act(x) on a _Vec's type: fixed FMAs and no fast-math flags, so a lane of a vector and
    the scalar tail give the same bits. ``act`` a code (a Python int), or ``(GELU_TANH, tanh)``
    from _switch_act: tanh-GELU where the i1 ``tanh`` is set, else SiLU (one exp for both)."""
    b, c = v.b, v.const
    if act == GELU:  # 0.5·x·(1 + erf(x/√2))
        return b.fmul(b.fmul(c(0.5), x), b.fadd(c(1.0), v.erf32(b.fmul(x, c(_SQRT_HALF)))))
    if isinstance(act, tuple):  # x / (1 + e^z), z as in _act_loops; e^z saturates at e^88
        inner = b.fadd(x, b.fmul(c(0.044715), b.fmul(b.fmul(x, x), x)))
        z = b.select(act[1], b.fmul(c(-2.0), b.fmul(c(_SQRT_2_OVER_PI), inner)), b.fneg(x))
        z = b.select(b.fcmp_ordered(">", z, c(_EXP_HI)), c(_EXP_HI), z)
        return b.fdiv(x, b.fadd(c(1.0), v.exp32(z)))
    if act == RELU:  # max(x, 0) as Python's max: a NaN stays
        return b.select(b.fcmp_ordered("<", x, c(0.0)), c(0.0), x)
    return x


def _switch_act(builder, code, body):
    """IR running ``body(act)`` (which emits one act code's computation) for the code ``code``
    (i64) holds at run time; tanh-GELU and SiLU share one body (less code to compile: their
    seven copies in the GEMM's tile kernels took ~1 s); an unknown code runs NONE's."""
    blocks = {act: builder.append_basic_block(f"act.{act}") for act in (NONE, GELU, GELU_TANH, RELU)}
    end = builder.append_basic_block("act.end")
    switch = builder.switch(code, blocks[NONE])
    for act, block in blocks.items():
        switch.add_case(ir.Constant(code.type, act), block)
        if act == GELU_TANH:
            switch.add_case(ir.Constant(code.type, SILU), block)
        builder.position_at_end(block)
        tanh = builder.icmp_signed("==", code, ir.Constant(code.type, GELU_TANH))
        body((GELU_TANH, tanh) if act == GELU_TANH else act)
        builder.branch(end)
    builder.position_at_end(end)


def _f32(*arrays):
    return all(isinstance(a, types.Array) and a.layout == "C" and a.dtype == types.float32 for a in arrays)


@intrinsic
def _act_row32(typingctx, src, b, dst, act):
    """float32 ``act_row``: a row of any length in whole vectors and a tail (LLVM's own vector
    loop took twice as long an element over the 24-column rows of a GEMM tile, measured)."""
    if not (_f32(src, b, dst) and src.ndim == b.ndim == dst.ndim == 1 and isinstance(act, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        arrs = [context.make_array(sig.args[k])(context, builder, args[k]) for k in range(3)]
        code = context.cast(builder, args[3], sig.args[3], types.int64)
        ft, i64 = ir.FloatType(), ir.IntType(64)
        W = LANES_BYTES // 4
        n = builder.extract_value(arrs[0].shape, 0)
        nv = builder.udiv(n, ir.Constant(i64, W))

        def body(act):  # whole vectors, then the tail one element at a time
            for lanes, lo, hi in ((W, ir.Constant(i64, 0), nv), (1, builder.mul(nv, ir.Constant(i64, W)), n)):
                s, b, d = (_Vec(builder, ft, lanes, a.data) for a in arrs)
                with cgutils.for_range(builder, hi, start=lo) as loop:
                    d.store(_act32(d, builder.fadd(s.load(loop.index), b.load(loop.index)), act), loop.index)

        _switch_act(builder, code, body)
        return context.get_dummy_value()

    return types.void(src, b, dst, act), codegen


@njit(inline="always")
def _act_loops(src, b, dst, act):
    # the loops vectorize once inlined into a caller compiled with fastmath: called as a function
    # of its own, LLVM leaves the erf and exp loops scalar (5x slower, measured). tanh-GELU and
    # SiLU share one loop, hence one fexp: Numba's SSA pass trips over two inlined fexp calls in
    # one function.
    f = dst.dtype.type
    if act == GELU:
        for j in range(src.size):
            v = src[j] + b[j]
            dst[j] = f(0.5) * v * (f(1.0) + ferf(v * f(_SQRT_HALF)))
    elif act == GELU_TANH or act == SILU:
        # x / (1 + e^z) with z = -2u for tanh-GELU (0.5·(1 + tanh(u)) = 1 / (1 + e^(-2u)): one exp,
        # and no 1 - (nearly 1) cancellation, so the far negative tail is exactly 0 as with
        # tanh), z = -x for SiLU. The test on act is the same every step (LLVM hoists it); the
        # shared loop costs tanh-GELU ~13 % against a loop of its own (measured), SiLU nothing
        tanh = act == GELU_TANH
        for j in range(src.size):
            v = src[j] + b[j]
            z = f(-2.0) * (f(_SQRT_2_OVER_PI) * (v + f(0.044715) * v * v * v)) if tanh else -v
            dst[j] = v / (f(1.0) + fexp(z))
    elif act == RELU:
        for j in range(src.size):
            dst[j] = max(src[j] + b[j], f(0.0))
    else:
        for j in range(src.size):
            dst[j] = src[j] + b[j]


# x, out: [R, C], prange over the rows; b: [C], the bias (zeros when there is none: x + 0 is x).
@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
def _act_v2(x, b, out, act):
    for r in prange(x.shape[0]):
        act_row(x[r], b, out[r], act)


def _rows(x, bias):
    """(x contiguous, x as [R, C] over its last axis, the bias [C] or zeros, out like x)."""
    x = np.ascontiguousarray(x)
    c = x.shape[-1] if x.ndim else 1
    if bias is None:
        b = np.zeros(c, dtype=x.dtype)
    else:
        b = np.ascontiguousarray(bias, dtype=x.dtype)
        if b.shape != (c,) or x.ndim == 0:
            raise ValueError(f"bias of shape {b.shape} does not match the last axis of x, shape {x.shape}")
    return x, x.reshape(-1, c), b, np.empty_like(x)


def _v2(x, bias, act):
    x, x2, b, out = _rows(x, bias)
    _act_v2(x2, b, out.reshape(x2.shape), act)
    return out


@register("gelu", "numba_v2", default=True)
def gelu_numba_v2(x, bias=None):
    """Exact-form GELU with a vectorized float32 erf, over all threads, bias fused."""
    return _v2(x, bias, GELU)


@register("gelu_tanh", "numba_v2", default=True)
def gelu_tanh_numba_v2(x, bias=None):
    """tanh-form GELU with tanh from a vectorized float32 exp, over all threads, bias fused."""
    return _v2(x, bias, GELU_TANH)


@register("relu", "numba_v2", default=True)
def relu_numba_v2(x, bias=None):
    """ReLU over all threads, bias fused (v1 adds the bias in a NumPy pass of its own first)."""
    return _v2(x, bias, RELU)


@register("silu", "numba_v2", default=True)
def silu_numba_v2(x, bias=None):
    """SiLU with a vectorized float32 exp, over all threads, bias fused."""
    return _v2(x, bias, SILU)
