"""The dense layers' matrix product, without bias: ``y = x · Wᵀ``.

Signature of every version: ``gemm(x, weight, out=None) -> y`` with ``x`` [N, in], ``weight``
[out, in] (the checkpoint's nn.Linear layout) and ``y`` [N, out] in ``x``'s dtype; ``out``, if
given, an [N, out] array (any strides) that receives ``y``. The bias is added by the pass that
follows, or by numba_packed's epilogue (kernels/dense.py).

Versions (docs/kernels.md has the measurements):
- ``numpy``: the reference, ``np.matmul(x, weight.T)`` (OpenBLAS).
- ``numba_4x3``: 3 weight rows × 4 x rows of dot products in 12 registers, reading the weight in
  place: for a few rows, where BLAS spends as long repacking the weight as multiplying.
- ``numba_packed``: the weight packed once into [in, 24]-column panels (48 on AVX-512 hosts) and an
  outer-product 4 × 3 vector micro-kernel (8 × 3 on AVX-512, whose 32 registers hold 24
  accumulators) in LLVM IR that prefetches the next panel: one long stream per panel, the copy
  kept for read-only weights. A block of a few rows (up to 4 tiles on AVX-512, 2 on AVX2),
  memory-bound, runs each panel in chunks of K instead, its tiles prefetching a fixed distance
  ahead together. Summation: k ascending in each lane, one FMA per step, so both widths and both
  paths give the same bits.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import sys
import threading
import weakref

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .activations import NONE, _act32, _switch_act, act_row
from .fastmath import _Vec
from .layernorm import ln_row
from .registry import FASTMATH, register

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


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
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
    return _into(out, shape, x.dtype, _gemm_4x3, x, weight)


def _into(out, shape, dtype, kernel, *args):  # kernel(*args, y) into a C-contiguous y: out or a new array
    direct = out is not None and out.flags.c_contiguous
    y = out if direct else np.empty(shape, dtype=dtype)
    if y.size:
        kernel(*args, y)
    if out is not None and not direct:  # a column block of a wider array (project_qkv's fallback)
        out[...] = y
        return out
    return y


# -- numba_packed ------------------------------------------------------------------------------------
def _vector_bytes() -> int:
    """64 (an AVX-512 register) when Numba compiles for a CPU with AVX-512F, else 32 (AVX2). Read
    from the target Numba keys its on-disk cache on, so a cached kernel always has this width. The
    results are the same bits at either width: each output is one FMA per k, k ascending."""
    from numba.core.registry import cpu_target

    return 64 if "+avx512f" in cpu_target.target_context.codegen().magic_tuple()[2].split(",") else 32


VECTOR_BYTES = _vector_bytes()  # 32: 4 x 24-column tiles in 12 ymm registers; 64: 4 x 48 in 12 zmm
PANEL_VECTORS = 3  # vectors of columns per panel
# rows per tile: 4 x 3 = 12 accumulators of AVX2's 16 registers; 8 x 3 = 24 of AVX-512's 32, which
# halves the panel loads per FMA
TILE_ROWS = 8 if VECTOR_BYTES == 64 else 4


def _tile_kernel(rows, vectors=PANEL_VECTORS, prefetch=True, chunked=False, epilogue=False):
    """A Numba intrinsic ``tile(x, i, wp, p, out, c, pf, pfs)``: ``out[i:i+rows, c:c+NR] =
    x[i:i+rows] @ wp[p]`` for C-contiguous ``x`` [M, K], panels ``wp`` [P, K, NR] and ``out``
    [M, >= c+NR]; while at it, step k prefetches element ``pf + k·pfs`` of ``wp`` (flat) into L2.

    ``epilogue``: three more arguments ``bias, boff, act``; unless act < 0, float32 sums become
    ``act(sum + bias[boff + column])`` in registers before they are stored (activations._act32,
    act_row's numbers), in a chunked tile after its last chunk (k1 = K). ``bias`` holds NR values
    from boff. float64 tiles store the sums: their activation needs math.erf (``_epilogue``).

    ``chunked``: ``tile(x, i, wp, p, out, c, pf, pfs, npf, k0, k1, valid)`` runs steps k0 <= k < k1
    only, adding to what ``out`` holds unless k0 is 0 (so a sum run in chunks is the same FMAs in
    the same order), for the first ``valid`` (1 to ``rows``) rows; step k prefetches ``npf`` lines
    from element ``pf + (k - k0)·pfs``. One kernel for every row count up to ``rows`` compiles
    faster than one per count, and these blocks are memory-bound, so the repeated rows cost little.

    The loop over K is built as LLVM IR: ``rows`` x ``vectors`` vector accumulators (allocas that LLVM's
    mem2reg turns into registers), each step ``vectors`` loads of the panel, ``rows`` broadcasts of
    x, one ``llvm.fma`` per accumulator and the prefetches. No bounds checks: the caller passes
    valid tiles (a prefetch never faults, whatever the address)."""

    def typer(x, i, wp, p, out, c, pf, pfs, *more):
        if not (isinstance(x, types.Array) and x.dtype in (types.float32, types.float64) and x.dtype == wp.dtype
                and x.dtype == out.dtype):
            return None
        if epilogue and not (isinstance(more[-3], types.Array) and more[-3].dtype == x.dtype and more[-3].ndim == 1
                             and more[-3].layout == "C"):
            return None
        return types.void(x, i, wp, p, out, c, pf, pfs, *more), codegen

    def codegen(context, builder, sig, args):
        xa, wa, oa = (context.make_array(sig.args[n])(context, builder, args[n]) for n in (0, 2, 4))
        i0, p, c0, pf, pfs = (context.cast(builder, args[n], sig.args[n], types.int64) for n in (1, 3, 5, 6, 7))
        ft = context.get_data_type(sig.args[0].dtype)
        lanes = VECTOR_BYTES // context.get_abi_sizeof(ft)
        vt, i64, i32 = ir.VectorType(ft, lanes), ir.IntType(64), ir.IntType(32)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vt, [vt, vt, vt]),
            f"llvm.fma.v{lanes}f{8 * context.get_abi_sizeof(ft)}")
        K = cgutils.unpack_tuple(builder, xa.shape)[1]
        NR = cgutils.unpack_tuple(builder, wa.shape)[2]
        ldo = cgutils.unpack_tuple(builder, oa.shape)[1]
        const = lambda n: ir.Constant(i64, n)  # noqa: E731
        zero = ir.Constant(vt, [ir.Constant(ft, 0.0)] * lanes)
        splat = ir.Constant(ir.VectorType(i32, lanes), [0] * lanes)
        i8p = ir.IntType(8).as_pointer()
        fetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8")
        hint = [ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)]  # read, into L2 and out, data
        if chunked:
            npf, k0, k1, valid = (context.cast(builder, args[n], sig.args[n], types.int64) for n in (8, 9, 10, 11))
            last = builder.sub(valid, const(1))  # rows past the valid ones repeat the last: computed, not stored
            row = [builder.select(builder.icmp_signed("<", const(r), valid), const(r), last) for r in range(rows)]
        else:
            row = [const(r) for r in range(rows)]
        orow = [builder.gep(oa.data, [builder.add(builder.mul(builder.add(i0, row[r]), ldo), c0)])
                for r in range(rows)]
        optr = [[builder.bitcast(builder.gep(orow[r], [const(v * lanes)]), vt.as_pointer()) for v in range(vectors)]
                for r in range(rows)]
        acc = [[cgutils.alloca_once_value(builder, zero) for _ in range(vectors)] for _ in range(rows)]
        if chunked:
            with builder.if_then(builder.icmp_signed("!=", k0, const(0))):  # a later chunk: go on from the sums
                for r in range(rows):
                    for v in range(vectors):
                        builder.store(builder.load(optr[r][v], align=4), acc[r][v])
            steps = cgutils.for_range_slice(builder, k0, k1, const(1))
        else:
            k0, steps = const(0), cgutils.for_range(builder, K)
        ahead = builder.gep(wa.data, [pf])
        panel = builder.gep(wa.data, [builder.mul(p, builder.mul(K, NR))])  # wp[p, 0, 0]
        xrow = [builder.gep(xa.data, [builder.mul(builder.add(i0, row[r]), K)]) for r in range(rows)]
        with steps as loop:
            k = loop[0] if chunked else loop.index
            step = builder.gep(panel, [builder.mul(k, NR)])  # wp[p, k, :]
            if prefetch:
                line = builder.bitcast(builder.gep(ahead, [builder.mul(builder.sub(k, k0), pfs)]), i8p)
                builder.call(fetch, [line, *hint])
                for m in (1, 2) if chunked else ():  # npf is 1 to 3: a panel row is at most 3 lines
                    with builder.if_then(builder.icmp_signed(">", npf, const(m)), likely=True):
                        builder.call(fetch, [builder.gep(line, [const(64 * m)]), *hint])
            b = [builder.load(builder.bitcast(builder.gep(step, [const(v * lanes)]), vt.as_pointer()), align=4)
                 for v in range(vectors)]
            for r in range(rows):
                a = builder.insert_element(ir.Constant(vt, ir.Undefined), builder.load(builder.gep(xrow[r], [k])),
                                           ir.Constant(i32, 0))
                a = builder.shuffle_vector(a, ir.Constant(vt, ir.Undefined), splat)  # x[i + r, k] in every lane
                for v in range(vectors):
                    builder.store(builder.call(fma, [a, b[v], builder.load(acc[r][v])]), acc[r][v])
        if epilogue and ft == ir.FloatType():
            _bias_act(context, builder, sig, args, acc, vt, lanes, builder.icmp_signed("==", k1, K) if chunked else None)
        for r in range(rows):
            stored = builder.icmp_signed("<", const(r), valid) if chunked and r else None
            with builder.if_then(stored) if stored is not None else contextlib.nullcontext():
                for v in range(vectors):
                    builder.store(builder.load(acc[r][v]), optr[r][v], align=4)
        return context.get_dummy_value()

    if chunked and epilogue:
        @intrinsic
        def tile(typingctx, x, i, wp, p, out, c, pf, pfs, npf, k0, k1, valid, bias, boff, act):
            return typer(x, i, wp, p, out, c, pf, pfs, npf, k0, k1, valid, bias, boff, act)
    elif epilogue:
        @intrinsic
        def tile(typingctx, x, i, wp, p, out, c, pf, pfs, bias, boff, act):
            return typer(x, i, wp, p, out, c, pf, pfs, bias, boff, act)
    elif chunked:
        @intrinsic
        def tile(typingctx, x, i, wp, p, out, c, pf, pfs, npf, k0, k1, valid):
            return typer(x, i, wp, p, out, c, pf, pfs, npf, k0, k1, valid)
    else:
        @intrinsic
        def tile(typingctx, x, i, wp, p, out, c, pf, pfs):
            return typer(x, i, wp, p, out, c, pf, pfs)
    return tile


def _bias_act(context, builder, sig, args, acc, vt, lanes, last):
    # acc[r][v] = act(acc[r][v] + bias[boff + v·lanes ...]) for the tile's (bias, boff, act), the
    # intrinsic's last three arguments; nothing if act < 0 or (chunked) this is not the last chunk
    n = len(sig.args)
    bias = context.make_array(sig.args[n - 3])(context, builder, args[n - 3])
    boff, code = (context.cast(builder, args[k], sig.args[k], types.int64) for k in (n - 2, n - 1))
    i64 = ir.IntType(64)
    go = builder.icmp_signed(">=", code, ir.Constant(i64, 0))
    with builder.if_then(go if last is None else builder.and_(go, last)):
        v = _Vec(builder, vt.element, lanes, builder.gep(bias.data, [boff]))
        b = [v.load(ir.Constant(i64, k)) for k in range(len(acc[0]))]
        _switch_act(builder, code, lambda act: [
            builder.store(_act32(v, builder.fadd(builder.load(a), b[k]), act), a)
            for row in acc for k, a in enumerate(row)])


_tile8, _tile4, _tile3, _tile2, _tile1 = (_tile_kernel(r, epilogue=True) for r in (8, 4, 3, 2, 1))
_ctile8, _ctile4 = (_tile_kernel(r, chunked=True, epilogue=True) for r in (8, 4))
# row blocks of up to this many rows run a panel in chunks of K: 4 tiles on AVX-512, 2 on AVX2
# (on the Zen 3 hosts 16 rows ran as fast or faster in whole panels: docs/kernels.md)
CHUNKED_ROWS = 4 * TILE_ROWS if TILE_ROWS == 8 else 2 * TILE_ROWS
K_CHUNK = 64  # panel rows (12 KB on AVX-512) that such a block's tiles run before the next
PREFETCH_BYTES = 16384  # how far ahead of its reads such a block prefetches


def _epilogue(out, i, rows, c, n, epi):  # pragma: no cover - replaced by the overload
    raise NotImplementedError


@overload(_epilogue, inline="always")
def _epilogue_impl(out, i, rows, c, n, epi):
    # epi = (bias, boff, act) as the tile kernels take it: float32 tiles apply it in registers;
    # a float64 tile gets act_row (math.erf) on the rows just written, while they are in L1
    if out.dtype == types.float32:
        return lambda out, i, rows, c, n, epi: None

    def impl(out, i, rows, c, n, epi):
        bias, boff, act = epi
        if act >= 0:
            bb = bias[boff:boff + n]
            for r in range(i, i + rows):
                t = out[r, c:c + n]
                act_row(t, bb, t, act)
    return impl


@njit(inline="always")
def _tiles(x, i0, i1, wp, p, out, c, q, epi):
    # rows i0:i1 of x against panel p, into out[i0:i1, c:c+NR], each tile then its epilogue;
    # meanwhile the tiles prefetch panel q (the thread's next), each its share of the panel
    K, NR = wp.shape[1], wp.shape[2]
    share = -(-NR // -(-(i1 - i0) // TILE_ROWS))  # columns of panel q per tile
    full = i1 - (i1 - i0) % TILE_ROWS
    for i in range(i0, full, TILE_ROWS):
        pf, pfs = _ahead(q, K, NR, share, (i - i0) // TILE_ROWS)
        if TILE_ROWS == 8:
            _tile8(x, i, wp, p, out, c, pf, pfs, epi[0], epi[1], epi[2])
        else:
            _tile4(x, i, wp, p, out, c, pf, pfs, epi[0], epi[1], epi[2])
        _epilogue(out, i, TILE_ROWS, c, NR, epi)
    pf, pfs = _ahead(q, K, NR, share, (full - i0) // TILE_ROWS)
    i, rest = full, i1 - full
    if rest >= 4:  # (8-row tiles only)
        _tile4(x, i, wp, p, out, c, pf, pfs, epi[0], epi[1], epi[2])
        _epilogue(out, i, 4, c, NR, epi)
        i, rest = i + 4, rest - 4
    if rest == 3:
        _tile3(x, i, wp, p, out, c, pf, pfs, epi[0], epi[1], epi[2])
    elif rest == 2:
        _tile2(x, i, wp, p, out, c, pf, pfs, epi[0], epi[1], epi[2])
    elif rest == 1:
        _tile1(x, i, wp, p, out, c, pf, pfs, epi[0], epi[1], epi[2])
    if rest:
        _epilogue(out, i, rest, c, NR, epi)


@njit(inline="always")
def _chunked_tiles(x, i0, i1, wp, p, out, c, epi):
    # rows i0:i1 (at most CHUNKED_ROWS) of x against panel p, into out[i0:i1, c:c+NR], K_CHUNK
    # steps at a time: every tile runs a chunk while it is in L1, and the tiles share the
    # prefetching of the chunk PREFETCH_BYTES further on in the thread's panels (one after
    # another in memory), so DRAM streams under the whole block, which with a few rows is
    # memory-bound. Whole-panel tiles leave it idle while the later tiles run from L2.
    K, NR = wp.shape[1], wp.shape[2]
    n = i1 - i0
    rest = n % TILE_ROWS
    tiles = n // TILE_ROWS + (rest + 3) // 4  # the rest in 4-row tiles, the last one's rows maybe fewer
    pfs = -(-NR // tiles)  # elements of each panel row that a tile prefetches: its share
    npf = -(-pfs * wp.itemsize // 64)  # cache lines a step
    for k0 in range(0, K, K_CHUNK):
        k1 = min(K, k0 + K_CHUNK)
        pf = (p * K + k0) * NR + PREFETCH_BYTES // wp.itemsize  # the chunk's first element, ahead
        i = i0
        for j in range(tiles):
            at, left = pf + j * K_CHUNK * pfs, i1 - i
            rows = 8 if TILE_ROWS == 8 and left >= 8 else min(4, left)
            if TILE_ROWS == 8 and rows == 8:  # (a constant first: Numba drops the branch on AVX2)
                _ctile8(x, i, wp, p, out, c, at, pfs, npf, k0, k1, 8, epi[0], epi[1], epi[2])
            else:
                _ctile4(x, i, wp, p, out, c, at, pfs, npf, k0, k1, rows, epi[0], epi[1], epi[2])
            i += rows
    _epilogue(out, i0, n, c, NR, epi)


@njit(inline="always")
def _block_tiles(x, i0, i1, wp, p, out, c, q, epi):
    if i1 - i0 <= CHUNKED_ROWS:
        _chunked_tiles(x, i0, i1, wp, p, out, c, epi)
    else:
        _tiles(x, i0, i1, wp, p, out, c, q, epi)


@njit(inline="always")
def _ahead(q, K, NR, share, j):
    # (first element, elements per k step) that tile j prefetches: columns j·share... of panel q,
    # read k-major, i.e. the flat range q·K·NR + j·share·K + [0, share·K). Past the panel's
    # columns (more tiles than columns), the panel's first line again: a no-op
    start = j * share
    if start >= NR:
        return q * K * NR, 0
    return q * K * NR + start * K, share


@intrinsic
def _fetch_add(typingctx, counts, i, n):
    """``counts[i] += n`` as one atomic read-modify-write (sequentially consistent); returns the
    value before. ``counts``: a C-contiguous int64 array. What a thread's stores before the add
    are visible to the thread whose add comes after it."""
    if not (isinstance(counts, types.Array) and counts.dtype == types.int64):
        return None
    sig = types.int64(counts, i, n)

    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        idx, inc = (context.cast(builder, args[k], sig.args[k], types.int64) for k in (1, 2))
        return builder.atomic_rmw("add", builder.gep(arr.data, [idx]), inc, "seq_cst")

    return sig, codegen


PRODUCT, BIAS_ACT, LAYERNORM = 0, 1, 2  # _gemm_packed's epilogues


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
def _gemm_packed(x, wp, out, block_rows, epilogue, bias, act, residual, ln_weight, ln_bias, eps, done):
    # x [M, K], panels wp [P, K, NR] of weight [N, K] (N <= P·NR, the last panel zero-padded),
    # out [M, N]; all C-contiguous. Tasks are (row block, panel), row block major: each thread
    # runs its row blocks against every panel, so x is read from cache, the weight once per block.
    # The epilogue (kernels/dense.py):
    # - PRODUCT: none, out = x·Wᵀ (the other arguments are not read);
    # - BIAS_ACT: out = act(out + bias [N]), act a code of activations.act_row: on each tile's
    #   sums in registers (float32), on the tile just stored (float64; see _epilogue);
    # - LAYERNORM: the task that finishes a row block's last panel (``done`` [blocks] int64 zeros
    #   counts them) turns the block's rows into LayerNorm((out + bias) + residual [M, N]).
    # One signature for all three, so the kernel compiles once per dtype (~5 s cold, each variant).
    # fastmath reaches the epilogue only: the tile kernel is LLVM IR of its own, one FMA per step
    # in a fixed order.
    M, N, P, NR = x.shape[0], out.shape[1], wp.shape[0], wp.shape[2]
    full = N // NR
    blocks = (M + block_rows - 1) // block_rows
    bp = np.zeros(P * NR, dtype=out.dtype)  # the bias padded to whole panels, as the tiles read it
    code = act if epilogue == BIAS_ACT else -1
    if code >= 0:
        bp[:N] = bias
    for t in prange(blocks * P):
        b, p = t // P, t % P
        i0 = b * block_rows
        i1 = min(M, i0 + block_rows)
        q = (p + 1) % P  # the panel of task t + 1, this thread's next under a static schedule
        c0 = p * NR
        # the padded last panel through a scratch tile, then its real columns; one call of the
        # tiles for both (two calls compiled the inlined tile kernels twice)
        dst, cd = (out, c0) if p < full else (np.empty((M, NR), dtype=out.dtype), 0)
        _block_tiles(x, i0, i1, wp, p, dst, cd, q, (bp, c0, code))
        if p >= full:
            out[i0:i1, c0:] = dst[i0:i1, :N - c0]
        if epilogue == LAYERNORM:
            if _fetch_add(done, b, 1) == P - 1:  # every panel of this row block is done
                for i in range(i0, i1):
                    ln_row(out[i], bias, residual[i], ln_weight, ln_bias, eps, out[i])


_UNUSED: dict = {}  # dtype -> placeholders for the epilogue arguments an epilogue does not read


def _unused(dt):
    """(vector, matrix, counts, zero): placeholders for the arguments of _gemm_packed that an
    epilogue does not read, typed as the model's arguments are, so its calls share one compiled
    kernel."""
    unused = _UNUSED.get(dt)
    if unused is None:
        vec = np.zeros(0, dt)  # read-only as the checkpoint's biases (Numba types read-only arrays apart)
        vec.flags.writeable = False
        unused = _UNUSED[dt] = (vec, np.zeros((0, 0), dt), np.zeros(0, np.int64), np.dtype(dt).type(0))
    return unused


def gemm_packed(x, panels, out, bias=None, act=NONE, ln=None):
    """``out = x @ W.T`` from ``panels`` = packed(W), then the epilogue: none; with ``bias``,
    ``act(out + bias)``; with ``ln = (residual, weight, bias, eps)`` too, LayerNorm((out + bias) +
    residual). Arguments as the kernel needs them: C-contiguous, of ``x``'s dtype; out.size > 0."""
    dt = x.dtype
    if ln is not None:
        rows = ln_block_rows(x.shape[0], x.nbytes)
        residual, weight, ln_bias, eps = ln
        done = np.zeros(-(-x.shape[0] // rows), dtype=np.int64)  # panels finished, per row block
        _gemm_packed(x, panels, out, rows, LAYERNORM, bias, NONE, residual, weight, ln_bias, dt.type(eps), done)
    else:
        vec, mat, ints, zero = _unused(dt)
        epilogue, bias = (PRODUCT, vec) if bias is None else (BIAS_ACT, bias)
        _gemm_packed(x, panels, out, block_rows(x), epilogue, bias, act, mat, vec, vec, zero, ints)


BLOCK_BYTES = 2 << 20  # at most about this much of x per row block, so a block stays in the L3 cache


def block_rows(x):
    return rows_per_block(x.shape[0], x.nbytes)


def rows_per_block(n, nbytes, parts=1):
    # of an x of n rows: equal blocks (equal tasks), a multiple of ``parts`` of them, each a
    # multiple of the tile's rows
    blocks = -(-max(1, -(-nbytes // BLOCK_BYTES)) // parts) * parts
    rows = -(-n // blocks)
    return max(TILE_ROWS, -(-rows // TILE_ROWS) * TILE_ROWS)


def ln_block_rows(n, nbytes):
    # the LayerNorm epilogue's blocks: a multiple of the threads, so each thread normalizes the
    # blocks it finished at the same time as the others (one block: one thread normalized all
    # rows while the other waited; [1024, 384] x [384, 384]ᵀ, 2 threads: +0.27 ms over the
    # product, +0.13 with two blocks)
    return rows_per_block(n, nbytes, get_num_threads())


def panel_width(dtype) -> int:
    return PANEL_VECTORS * VECTOR_BYTES // np.dtype(dtype).itemsize


def pack(weight):  # [N, K] -> panels [ceil(N / NR), K, NR], columns past N zero
    N, K = weight.shape
    NR = panel_width(weight.dtype)
    P = -(-N // NR)
    panels = np.zeros((P, NR, K), dtype=weight.dtype)
    panels.reshape(P * NR, K)[:N] = weight
    out = _ARENA.empty((P, K, NR), weight.dtype)
    out[...] = panels.transpose(0, 2, 1)
    return out


def aligned_empty(shape, dtype, align=64):
    """An uninitialized C-contiguous array whose data starts on an ``align``-byte boundary. NumPy's
    large arrays start 16 bytes into a page, so each 64-byte row of a panel (one AVX-512 load)
    would straddle two cache lines."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class _HugePages:
    """Memory for the panels, packed one after another into 2 MiB pages (Linux transparent huge
    pages, asked for by ``madvise``): a pass streams every panel once, and with 4 KiB pages MiniLM's
    42 MB cost ~10,000 TLB misses a pass, more after another process ran (docs/performance.md).
    NumPy asks for huge pages only for arrays of 4 MiB and up, which leaves out every MiniLM panel.
    Chunks of ``CHUNK`` bytes (a larger array gets a mapping of its own); an array is a view that
    keeps its chunk mapped, so a chunk is unmapped once its last panel is gone and this is no longer
    filling it."""

    CHUNK = 32 << 20
    PAGE = 2 << 20

    def __init__(self):
        self.lock = threading.Lock()
        self.chunk, self.used = None, 0
        self.ok = sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")

    def empty(self, shape, dtype, align=64):
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if not self.ok or nbytes == 0:
            return aligned_empty(shape, dtype, align)
        with self.lock:
            try:
                if nbytes > self.CHUNK:  # a mapping of its own; the chunk being filled stays
                    return self._map(nbytes).view(dtype).reshape(shape)
                start = -(-self.used // align) * align
                if self.chunk is None or start + nbytes > self.chunk.size:
                    self.chunk, start = self._map(self.CHUNK), 0
            except (OSError, ValueError):  # no memory to map, or madvise refused: plain pages
                self.ok = False
                return aligned_empty(shape, dtype, align)
            self.used = start + nbytes
            return self.chunk[start:start + nbytes].view(dtype).reshape(shape)

    def _map(self, size):  # -> uint8 [size] on a 2 MiB boundary, asked to be backed by huge pages
        m = mmap.mmap(-1, size + self.PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        raw = np.frombuffer(m, dtype=np.uint8)
        start = -raw.ctypes.data % self.PAGE
        m.madvise(mmap.MADV_HUGEPAGE, start, size - size % mmap.PAGESIZE)
        return raw[start:start + size]


_ARENA = _HugePages()
if hasattr(os, "register_at_fork"):  # a fork while another thread packs: the child has only this thread
    os.register_at_fork(after_in_child=lambda: setattr(_ARENA, "lock", threading.Lock()))
_PACKED: dict = {}  # id(weight) -> (weakref to weight, its panels): read-only weights only


def packed(weight):
    """The panels of ``weight``, packed on the first call and kept while ``weight`` lives if it is
    read-only (it cannot change under the copy); a writable weight is packed anew every call."""
    if weight.flags.writeable:
        return pack(weight)
    panels = _kept(weight)
    if panels is not None:
        return panels
    panels = pack(weight)
    key = id(weight)
    _PACKED[key] = (weakref.ref(weight, lambda _, key=key: _PACKED.pop(key, None)), panels)
    from ..weights import release_pages  # a weight mapped from its file leaves the RSS: the panels
    release_pages(weight)  # are what is read now (a BLAS call on a large batch maps its pages back)
    return panels


def _kept(weight):  # the panels kept for ``weight`` if it is read-only and was packed before, else None
    hit = _PACKED.get(id(weight))
    if hit is None or hit[0]() is not weight or weight.flags.writeable:  # made writable after packing
        return None
    return hit[1]


def _packed_ok(x, weight):
    return _numba_ok(x, weight) and weight.shape[0] > 0 and weight.shape[1] > 0


@register("gemm", "numba_packed")
def gemm_numba_packed(x, weight, out=None):
    shape = _check(x, weight, out)
    if not _packed_ok(x, weight):
        return gemm_numba_4x3(x, weight, out)  # its own fallbacks: BLAS for other dtypes and strides
    return _into(out, shape, x.dtype, _packed_product, x, weight)


def _packed_product(x, weight, y):
    gemm_packed(x, packed(weight), y)


@register("gemm", "auto", default=True)
def gemm_auto(x, weight, out=None):
    # the common case first, with the fewest checks: a read-only weight packed on an earlier call
    # (a few rows' product is ~10 µs, so the ~4 µs of the general path below is worth skipping)
    panels = _kept(weight) if out is None else None
    if (panels is not None and x.ndim == 2 and x.dtype == weight.dtype and x.flags.c_contiguous
            and x.shape[1] == weight.shape[1]):
        y = np.empty((x.shape[0], weight.shape[0]), dtype=x.dtype)
        if y.size:
            gemm_packed(x, panels, y)
        return y
    if x.ndim == 2 and not weight.flags.writeable and _packed_ok(x, weight):
        return gemm_numba_packed(x, weight, out)
    if x.ndim == 2 and x.shape[0] <= SMALL_N and _numba_ok(x, weight):
        return gemm_numba_4x3(x, weight, out)
    return gemm_numpy(x, weight, out)
