"""Vectorizable float32 exp and erf for the Numba kernels, and type-dispatched ``fexp``/``ferf``.

Why: without Intel's SVML (not installed here), LLVM cannot vectorize calls to ``math.exp`` or
``math.erf``, so a Numba loop calling them runs one element at a time — that is why the v1
kernels lost to NumPy (whose float32 exp is hand-vectorized) and to torch. These versions are
straight-line multiply-adds and a bit cast that LLVM turns into 8-wide AVX2 code.

- ``exp_f32``: Cephes' expf. Range reduction x = n·ln2 + r (ln2 split in two so n·ln2 is exact),
  a degree-6 polynomial for e^r on |r| ≤ ln2/2, and 2^n built directly in the exponent bits.
  About 1-2 ulp. Arguments below -87.3 (where float32 e^x is denormal or 0) return exactly 0,
  so masked attention keys keep exactly zero weight; above 88 it saturates at e^88 (finite, never
  inf, so 1 - 2/(e^(2u) + 1) stays exact at ±1); NaN gives NaN.
- ``erf_f32``: the rational approximation Eigen and XLA use for float32 erf: x clamped to [-4, 4]
  (erf is ±1 in float32 beyond), odd degree-13 numerator over even degree-8 denominator. A few ulp.
- ``fexp(x)`` / ``ferf(x)``: these for float32 arguments; ``math.exp`` / ``math.erf`` for float64,
  where fp64 parity (1e-10) needs the exact functions. Chosen at compile time, per type.
- ``fmax(a, b)``: the larger of two floats as LLVM's ``maxnum``, for a row's running maximum:
  LLVM vectorizes a ``maxnum`` reduction, not the compare-and-select Numba makes of ``max()``
  (a row max over 128 float32: 0.25 ns an element with ``max``, 0.045 with ``fmax``; at 16 the
  loop is too short for the vector body either way). With a NaN it returns the other operand
  (the NaN still reaches the result through the row's other terms).
- ``lanes_sum`` / ``lanes_max``: a row's sum and maximum in 8 explicit running values, combined
  in a fixed order: they vectorize without fast-math's ``reassoc``.
- ``row_max(a)`` / ``exp_sum(a, m)``: a softmax row's two passes as vector loops written in LLVM IR
  (``exp_sum``: the float32 exp and the sum in lanes_sum's order, in one pass): 0.67 -> 0.43 ns an
  element at 512 keys against lanes_max, an exp loop and lanes_sum, bit for bit the same result.
  ``exp_sum`` takes m >= every a[j] (the row's maximum): its exp is built for arguments <= 0 and
  right up to 88.3, past which 2^n would overflow its exponent bits.

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
_ROUND = f32(1.5 * 2 ** 23 + 127)  # adding it rounds to an integer n, n + 127 in the low mantissa bits


@njit(inline="always")
def exp_f32(x):
    xc = min(max(x, _EXP_LO), _EXP_HI)
    n = np.floor(xc * _LOG2E + _HALF)
    r = xc - n * _LN2_HI - n * _LN2_LO
    y = ((((_P0 * r + _P1) * r + _P2) * r + _P3) * r + _P4) * r + _P5
    y = y * r * r + r + _ONE
    two_n = _bits_to_float32((np.int32(n) + 127) << 23)
    e = y * two_n if x >= _EXP_LO else f32(0.0)
    return e if x == x else x  # NaN in, NaN out: a NaN score reaches its softmax row as in torch


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


# -- vector loops over one row, written as LLVM IR: their summation order is the code's --------------
LANES_BYTES = 32  # one AVX2 register: 8 float32 or 4 float64 lanes


def _row(a):  # a contiguous 1-d float array: what the vector loops below are built for
    return isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and isinstance(a.dtype, types.Float)


class _Vec:
    """IR arithmetic on one float type or a vector of ``lanes`` of it, over the row ``data``."""

    def __init__(self, builder, ft, lanes, data):
        self.b, self.ft, self.lanes, self.data = builder, ft, lanes, data
        self.t = ir.VectorType(ft, lanes) if lanes > 1 else ft

    def const(self, v, t=None):  # v in every lane, of self.t or of the int type ``t``
        c = ir.Constant(t or self.ft, v if t else float(v))
        return ir.Constant(ir.VectorType(c.type, self.lanes), [c] * self.lanes) if self.lanes > 1 else c

    def splat(self, x):  # a scalar in every lane
        if self.lanes == 1:
            return x
        v = self.b.insert_element(ir.Constant(self.t, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
        return self.b.shuffle_vector(v, ir.Constant(self.t, ir.Undefined), self.const(0, ir.IntType(32)))

    def ptr(self, i):  # to element i·lanes of the row, as a pointer to self.t
        at = self.b.gep(self.data, [self.b.mul(i, ir.Constant(ir.IntType(64), self.lanes))])
        return self.b.bitcast(at, self.t.as_pointer())

    def load(self, i):
        return self.b.load(self.ptr(i), align=4)

    def store(self, x, i):
        self.b.store(x, self.ptr(i), align=4)

    def call(self, name, *args):  # an LLVM intrinsic on self.t: fma, maxnum, minnum, floor
        suffix = (f"v{self.lanes}" if self.lanes > 1 else "") + ("f32" if self.ft == ir.FloatType() else "f64")
        fn = cgutils.get_or_insert_function(self.b.module, ir.FunctionType(self.t, [self.t] * len(args)),
                                            f"llvm.{name}.{suffix}")
        return self.b.call(fn, list(args))

    def exp32(self, x):  # exp_f32's polynomial, its multiply-adds as FMAs, for x <= 88.3
        # n by adding 1.5·2^23 + 127, which rounds x·log2(e) to an integer in the low bits of t:
        # its bits shifted make 2^n, with no floor or conversion (0.72 -> 0.49 ns an element, a
        # softmax row of 512, AVX2). A NaN x goes through every step and comes out NaN
        b, c, fma = self.b, self.const, lambda *a: self.call("fma", *a)
        i32 = ir.IntType(32)
        low = b.fcmp_ordered("<", x, c(_EXP_LO))  # -> exactly 0
        xc = b.select(low, c(_EXP_LO), x)
        t = fma(xc, c(_LOG2E), c(_ROUND))
        n = b.fsub(t, c(_ROUND))
        r = fma(b.fneg(n), c(_LN2_LO), fma(b.fneg(n), c(_LN2_HI), xc))
        y = fma(c(_P0), r, c(_P1))
        for p in (_P2, _P3, _P4, _P5):
            y = fma(y, r, c(p))
        y = b.fadd(fma(b.fmul(y, r), r, r), c(_ONE))
        two_n = b.bitcast(b.shl(b.bitcast(t, self.const(0, i32).type), c(23, i32)), self.t)
        return b.select(low, c(0.0), b.fmul(y, two_n))

    def erf32(self, x):  # erf_f32's rational function, its multiply-adds as FMAs; NaN stays NaN
        b, c, fma = self.b, self.const, lambda *a: self.call("fma", *a)
        x = b.select(b.fcmp_ordered("<", x, c(-_FOUR)), c(-_FOUR), x)
        x = b.select(b.fcmp_ordered(">", x, c(_FOUR)), c(_FOUR), x)
        x2 = b.fmul(x, x)
        p = fma(x2, c(_A13), c(_A11))
        for a in (_A9, _A7, _A5, _A3, _A1):
            p = fma(x2, p, c(a))
        q = fma(x2, c(_B8), c(_B6))
        for a in (_B4, _B2, _B0):
            q = fma(x2, q, c(a))
        return b.fdiv(b.fmul(x, p), q)


def _loop(builder, start, stop):  # for i in range(start, stop), i64 bounds
    return cgutils.for_range(builder, stop, start=start)


@intrinsic
def _vmax(typingctx, a):
    """The largest element of a non-empty contiguous row: 4 vectors of running maxima over
    blocks of 4 vectors, one over the vectors left, the lanes folded, then the rest one at a time.
    ``llvm.maxnum``: a maximum is exact in any order."""
    if not _row(a):
        return None

    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        ft = context.get_data_type(sig.args[0].dtype)
        W = LANES_BYTES // context.get_abi_sizeof(ft)
        v, s = _Vec(builder, ft, W, arr.data), _Vec(builder, ft, 1, arr.data)
        i64 = lambda k: ir.Constant(ir.IntType(64), k)  # noqa: E731
        n = builder.extract_value(arr.shape, 0)
        nv = builder.udiv(n, i64(W))  # whole vectors
        nv4 = builder.mul(builder.udiv(nv, i64(4)), i64(4))
        acc = [cgutils.alloca_once_value(builder, v.splat(builder.load(arr.data))) for _ in range(4)]
        with _loop(builder, i64(0), builder.udiv(nv, i64(4))) as loop:
            for k in range(4):
                x = v.load(builder.add(builder.mul(loop.index, i64(4)), i64(k)))
                builder.store(v.call("maxnum", builder.load(acc[k]), x), acc[k])
        with _loop(builder, nv4, nv) as loop:
            builder.store(v.call("maxnum", builder.load(acc[0]), v.load(loop.index)), acc[0])
        acc = [builder.load(x) for x in acc]
        m = v.call("maxnum", v.call("maxnum", acc[0], acc[1]), v.call("maxnum", acc[2], acc[3]))
        width = W
        while width > 1:  # fold the upper half of the lanes onto the lower
            width //= 2
            order = ir.Constant(ir.VectorType(ir.IntType(32), W), [(k + width) % W for k in range(W)])
            m = v.call("maxnum", m, builder.shuffle_vector(m, ir.Constant(v.t, ir.Undefined), order))
        res = cgutils.alloca_once_value(builder, builder.extract_element(m, ir.Constant(ir.IntType(32), 0)))
        with _loop(builder, builder.mul(nv, i64(W)), n) as loop:
            builder.store(s.call("maxnum", builder.load(res), s.load(loop.index)), res)
        return builder.load(res)

    return a.dtype(a), codegen


@intrinsic
def _exp_sum32(typingctx, a, m):
    """float32 ``a[j] = exp_f32(a[j] - m)`` in place, returning the sum in lanes_sum's order:
    element j into lane j % 8 (those past the last whole vector into lane 0), then the lanes."""
    if not (_row(a) and a.dtype == types.float32 and m == types.float32):
        return None

    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        W = LANES_BYTES // 4
        v, s = _Vec(builder, ir.FloatType(), W, arr.data), _Vec(builder, ir.FloatType(), 1, arr.data)
        i64 = lambda k: ir.Constant(ir.IntType(64), k)  # noqa: E731
        n = builder.extract_value(arr.shape, 0)
        nv = builder.udiv(n, i64(W))
        mv, acc = v.splat(args[1]), cgutils.alloca_once_value(builder, v.const(0.0))
        with _loop(builder, i64(0), nv) as loop:
            e = v.exp32(builder.fsub(v.load(loop.index), mv))
            v.store(e, loop.index)
            builder.store(builder.fadd(builder.load(acc), e), acc)
        lane = [builder.extract_element(builder.load(acc), ir.Constant(ir.IntType(32), k)) for k in range(W)]
        s0 = cgutils.alloca_once_value(builder, lane[0])
        with _loop(builder, builder.mul(nv, i64(W)), n) as loop:
            e = s.exp32(builder.fsub(s.load(loop.index), args[1]))
            s.store(e, loop.index)
            builder.store(builder.fadd(builder.load(s0), e), s0)
        lane[0] = builder.load(s0)
        add = builder.fadd
        return add(add(add(lane[0], lane[1]), add(lane[2], lane[3])),
                   add(add(lane[4], lane[5]), add(lane[6], lane[7])))

    return types.float32(a, m), codegen


def row_max(a):  # pragma: no cover - replaced by the overload inside jitted code
    raise NotImplementedError


def exp_sum(a, m):  # pragma: no cover
    raise NotImplementedError


@overload(row_max, inline="always")
def _row_max(a):
    if _row(a):
        return lambda a: _vmax(a)
    return lambda a: lanes_max(a)


@overload(exp_sum, inline="always")
def _exp_sum(a, m):
    if _row(a) and a.dtype == types.float32 and m == types.float32:
        return lambda a, m: _exp_sum32(a, m)

    def impl(a, m):  # float64 (math.exp), or a strided row: two passes
        for j in range(a.size):
            a[j] = fexp(a[j] - m)
        return lanes_sum(a, a.dtype.type(0), 0)
    return impl


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
