"""Vectorizable float32 exp and erf for the Numba kernels, and type-dispatched ``fexp``/``ferf``.

Why: without Intel's SVML (not installed here), LLVM cannot vectorize calls to ``math.exp`` or
``math.erf``, so a Numba loop calling them runs one element at a time — that is why the v1
kernels lost to NumPy (whose float32 exp is hand-vectorized) and to torch. These versions are
straight-line multiply-adds and a bit cast that LLVM turns into 8-wide AVX2 code.

- ``exp_f32``: Cephes' expf. Range reduction x = n·ln2 + r (ln2 split in two so n·ln2 is exact),
  a degree-6 polynomial for e^r on |r| ≤ ln2/2, and 2^n built directly in the exponent bits.
  About 1-2 ulp. Arguments below -87.3 (where float32 e^x is denormal or 0) return exactly 0,
  so masked attention keys keep exactly zero weight; above 88 it saturates at e^88 (finite, never
  inf, so 1 - 2/(e^(2u) + 1) stays exact at ±1).
- ``erf_f32``: the rational approximation Eigen and XLA use for float32 erf: x clamped to [-4, 4]
  (erf is ±1 in float32 beyond), odd degree-13 numerator over even degree-8 denominator. A few ulp.
- ``fexp(x)`` / ``ferf(x)``: these for float32 arguments; ``math.exp`` / ``math.erf`` for float64,
  where fp64 parity (1e-10) needs the exact functions. Chosen at compile time, per type.
- ``fmax(a, b)``: the larger of two floats as LLVM's ``maxnum``, for a row's running maximum:
  LLVM vectorizes a ``maxnum`` reduction, not the compare-and-select Numba makes of ``max()``
  (a row max over 128 float32: 0.25 ns an element with ``max``, 0.045 with ``fmax``; at 16 the
  loop is too short for the vector body either way). With a NaN it returns the other operand
  (the NaN still reaches the result through the row's other terms).

Caution when editing this file: Numba's on-disk cache (``cache=True``) of a kernel in another
file is keyed on that file, not on this one, so a kernel compiled before an edit here keeps the
old inlined code. Delete ``kernels/__pycache__/*.nbi`` and ``*.nbc`` after changing this file
(an installed release is unaffected: installing rewrites every file).
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

f32 = np.float32


@intrinsic
def _bits_to_float32(typingctx, bits):
    """Reinterpret the low 32 bits of an integer as a float32 (no conversion): how 2^n is built."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if bits.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


_EXP_HI, _EXP_LO = f32(88.0), f32(-87.33654)  # e^88 keeps 2^n finite (n <= 127)
_LOG2E, _LN2_HI, _LN2_LO = f32(1.44269504088896341), f32(0.693359375), f32(-2.12194440e-4)
_P0, _P1, _P2 = f32(1.9875691500e-4), f32(1.3981999507e-3), f32(8.3334519073e-3)
_P3, _P4, _P5 = f32(4.1665795894e-2), f32(1.6666665459e-1), f32(5.0000001201e-1)
_HALF, _ONE = f32(0.5), f32(1.0)


@njit(inline="always")
def exp_f32(x):
    xc = min(max(x, _EXP_LO), _EXP_HI)
    n = np.floor(xc * _LOG2E + _HALF)
    r = xc - n * _LN2_HI - n * _LN2_LO
    y = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    y = y * r * r + r + _ONE
    two_n = _bits_to_float32((np.int32(n) + 127) << 23)
    return y * two_n if x >= _EXP_LO else f32(0.0)


_A1, _A3, _A5 = f32(-1.60960333262415e-02), f32(-2.95459980854025e-03), f32(-7.34990630326855e-04)
_A7, _A9 = f32(-5.69250639462346e-05), f32(-2.10102402082508e-06)
_A11, _A13 = f32(2.77068142495902e-08), f32(-2.72614225801306e-10)
_B0, _B2, _B4 = f32(-1.42647390514189e-02), f32(-7.37332916720468e-03), f32(-1.68282697438203e-03)
_B6, _B8 = f32(-2.13374055278905e-04), f32(-1.45660718464996e-05)
_FOUR = f32(4.0)


@njit(inline="always")
def erf_f32(x):
    x = min(max(x, -_FOUR), _FOUR)
    x2 = x * x
    p = x2 * _A13 + _A11
    p = x2 * p + _A9
    p = x2 * p + _A7
    p = x2 * p + _A5
    p = x2 * p + _A3
    p = x2 * p + _A1
    q = x2 * _B8 + _B6
    q = x2 * q + _B4
    q = x2 * q + _B2
    q = x2 * q + _B0
    return x * p / q


def fexp(x):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


def ferf(x):  # pragma: no cover
    raise NotImplementedError


@overload(fexp, inline="always")
def _fexp(x):
    if x == types.float32:
        return lambda x: exp_f32(x)
    return lambda x: math.exp(x)


@overload(ferf, inline="always")
def _ferf(x):
    if x == types.float32:
        return lambda x: erf_f32(x)
    return lambda x: math.erf(x)


@intrinsic
def fmax(typingctx, a, b):
    """``llvm.maxnum`` of two floats of one type (see the module docstring)."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, signature, args):
        ft = context.get_data_type(signature.args[0])
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ft, [ft, ft]),
                                            f"llvm.maxnum.f{a.bitwidth}")
        return builder.call(fn, args)

    return a(a, b), codegen


@njit(inline="always")
def lanes_sum(a, shift, square):
    # sum of (a[j] - shift)^p, p = 1 (square 0) or 2 (square 1), in 8 running sums, then those
    # in a fixed order: the order is the code's, so it vectorizes without letting LLVM reassociate
    # (which made a process that compiled the kernel and one that loaded it from the cache round
    # differently)
    z = a.dtype.type(0)
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = z
    n8 = a.size - a.size % 8
    for j in range(0, n8, 8):
        d0, d1, d2, d3 = a[j] - shift, a[j + 1] - shift, a[j + 2] - shift, a[j + 3] - shift
        d4, d5, d6, d7 = a[j + 4] - shift, a[j + 5] - shift, a[j + 6] - shift, a[j + 7] - shift
        if square:
            d0, d1, d2, d3, d4, d5, d6, d7 = d0 * d0, d1 * d1, d2 * d2, d3 * d3, d4 * d4, d5 * d5, d6 * d6, d7 * d7
        s0 += d0
        s1 += d1
        s2 += d2
        s3 += d3
        s4 += d4
        s5 += d5
        s6 += d6
        s7 += d7
    for j in range(n8, a.size):
        d = a[j] - shift
        s0 += d * d if square else d
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))

@njit(inline="always")
def lanes_max(a):
    # the largest element of a non-empty ``a``, in 8 running maxima combined in a fixed order:
    # vectorizes without fast-math's reassociation, like lanes_sum
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = a[0]
    n8 = a.size - a.size % 8
    for j in range(0, n8, 8):
        m0, m1, m2, m3 = fmax(m0, a[j]), fmax(m1, a[j + 1]), fmax(m2, a[j + 2]), fmax(m3, a[j + 3])
        m4, m5, m6, m7 = fmax(m4, a[j + 4]), fmax(m5, a[j + 5]), fmax(m6, a[j + 6]), fmax(m7, a[j + 7])
    for j in range(n8, a.size):
        m0 = fmax(m0, a[j])
    return fmax(fmax(fmax(m0, m1), fmax(m2, m3)), fmax(fmax(m4, m5), fmax(m6, m7)))
