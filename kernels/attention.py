"""Scaled dot-product attention of a batch of sequences laid out row after row.

Signature of every version: ``attention(qkv, starts, n_head, scale, mask=None) -> context`` with
``qkv`` [N, 3H] (each row q | k | v of one token, heads side by side in each), ``starts`` int64
[B+1] (sequence b is rows ``starts[b]:starts[b+1]``; for a dense batch ``b·T``), ``mask`` None or
the additive [B, T] mask of a dense batch (finfo.min at padding keys), and ``context`` [N, H]: for
each sequence and head ``softmax(q·kᵀ·scale + mask)·v``, heads side by side again. A packed batch
needs no mask: each sequence sees only its own rows. Empty sequences are skipped.

Versions (docs/kernels.md has the measurements):
- ``numpy``: the reference: per sequence, q·kᵀ and P·V as batched matmuls, softmax.py's reference.
- ``blas_v2``: the same matmuls with masked_softmax v2 in place: one [nH, L, L] block alive at a
  time, still in cache when P·V reads it.
- ``numba_fused``: a task per (sequence, head), 4 query rows at a time, scores, softmax and P·V in
  L1; kept to measure: store-bound without register blocking.
- ``numba_tiled`` (default on AVX2): numba_fused's plan (a task per (sequence, head), 4 query
  rows at a time, their [4, L] scores in L1) with each product on gemm.py's tile kernel: q·kᵀ on
  the keys packed into 24-column panels (48 on AVX-512), each score in registers over all head
  dims, no prefetching (a partial last panel through a scratch, so the scores are L wide); the
  softmax's max and exp-and-sum as vector loops in LLVM IR (``fastmath.row_max``/``exp_sum``);
  P·V on V packed into 16-column panels (32 on AVX-512; no padding at head sizes 32 and 64).
  Every sum in an order the code fixes: no ``reassoc``, which would round differently in a
  compiling and a cache-loading process.
- ``numba_gemm`` (default on AVX-512): q·kᵀ on the same key panels with gemm.py's tile loop
  (``_tiles``: 8 query rows a tile on AVX-512, 4 on AVX2, prefetching the next panel), the keys
  padded to whole panels through the softmax and P·V (8-row V tiles on AVX-512). On AVX2 it is
  the slower of the two: its prefetches and the padding cost more than they save there.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .fastmath import exp_sum, fexp, row_max
from .gemm import PANEL_VECTORS, TILE_ROWS, VECTOR_BYTES, _tile_kernel, _tiles
from .registry import FASTMATH, register
from .softmax import masked_softmax_numba_v2, masked_softmax_numpy


def _per_sequence(qkv, starts, n_head, scale, mask, softmax):
    """One sequence at a time: q·kᵀ and P·V as batched matmuls over the heads (NumPy's BLAS), the
    scores normalized in place by ``softmax`` (a masked_softmax version)."""
    N, H = qkv.shape[0], qkv.shape[1] // 3
    dH = H // n_head
    out = np.empty((N, H), dtype=qkv.dtype)  # starts[0] = 0 and starts[-1] = N: every row is written
    for b in range(starts.size - 1):
        lo, hi = int(starts[b]), int(starts[b + 1])
        if hi == lo:
            continue
        t = qkv[lo:hi].reshape(1, hi - lo, 3, n_head, dH)
        q, k, v = (t[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [1, nH, L, dH] views, no copy
        scores = q @ k.transpose(0, 1, 3, 2)  # [1, nH, L, L]
        softmax(scores, None if mask is None else mask[b:b + 1, :hi - lo], scale, out=scores)
        # P·V written straight into the [N, H] layout
        np.matmul(scores, v, out=out[lo:hi].reshape(1, hi - lo, n_head, dH).transpose(0, 2, 1, 3))
    return out


@register("attention", "numpy")
def attention_numpy(qkv, starts, n_head, scale, mask=None):
    return _per_sequence(qkv, starts, n_head, scale, mask, masked_softmax_numpy)


@register("attention", "blas_v2")
def attention_blas_v2(qkv, starts, n_head, scale, mask=None):
    return _per_sequence(qkv, starts, n_head, scale, mask, masked_softmax_numba_v2)


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
def _attention_fused(qkv, starts, mask, has_mask, n_head, scale, out):
    H = qkv.shape[1] // 3
    dH = H // n_head
    zero = qkv.dtype.type(0)
    for task in prange((starts.size - 1) * n_head):
        b, h = task // n_head, task % n_head
        lo, L = starts[b], starts[b + 1] - starts[b]
        if L == 0:
            continue
        kT = np.empty((dH, L), dtype=qkv.dtype)  # this head's keys, transposed: rows of L
        v = np.empty((L, dH), dtype=qkv.dtype)
        for j in range(L):
            for d in range(dH):
                kT[d, j] = qkv[lo + j, H + h * dH + d]
                v[j, d] = qkv[lo + j, 2 * H + h * dH + d]
        s = np.empty((4, L), dtype=qkv.dtype)
        acc = np.empty(dH, dtype=qkv.dtype)
        for i0 in range(0, L, 4):
            nb = min(4, L - i0)
            for r in range(nb):
                row = s[r]
                for j in range(L):
                    row[j] = mask[b, j] if has_mask else zero
            for d in range(dH):  # scores of 4 query rows: each key row loaded once for all four
                kd = kT[d]
                for r in range(nb):
                    qv = qkv[lo + i0 + r, h * dH + d] * scale
                    row = s[r]
                    for j in range(L):
                        row[j] += qv * kd[j]
            for r in range(nb):
                row = s[r]
                m = row[0]
                for j in range(L):
                    m = max(m, row[j])
                tot = zero
                for j in range(L):
                    e = fexp(row[j] - m)
                    row[j] = e
                    tot += e
                inv = 1 / tot
                acc[:] = zero
                for j in range(L):
                    p = row[j] * inv
                    vj = v[j]
                    for d in range(dH):
                        acc[d] += p * vj[d]
                o = out[lo + i0 + r]
                for d in range(dH):
                    o[h * dH + d] = acc[d]


def _run(kernel, qkv, starts, n_head, scale, mask):
    """The Numba versions' shared wrapper: contiguous inputs, the output, a dummy mask for None."""
    qkv = np.ascontiguousarray(qkv)
    N, H = qkv.shape[0], qkv.shape[1] // 3
    out = np.empty((N, H), dtype=qkv.dtype)  # every row belongs to one sequence: all are written
    if N == 0:
        return out
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    # scores start from the mask row and add (q·scale)·k: q·k·scale + mask up to rounding (an
    # ulp or so, inside the kernel tolerance)
    m = np.zeros((1, 1), dtype=qkv.dtype) if mask is None else np.ascontiguousarray(mask, dtype=qkv.dtype)
    kernel(qkv, starts, m, mask is not None, n_head, qkv.dtype.type(scale), out)
    return out


@register("attention", "numba_fused")
def attention_numba_fused(qkv, starts, n_head, scale, mask=None):
    return _run(_attention_fused, qkv, starts, n_head, scale, mask)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
def _pack_k(qkv, lo, L, col, dH, kp):  # kp[p, d, c] = qkv[lo + p·NR + c, col + d] for the L keys
    # 8 keys of a panel at a time: 8 contiguous values a write. A panel is 24 or 48 float32 wide
    # but 12 float64 on AVX2, so the blocks of 8 stop at each panel's end
    NR = kp.shape[2]
    for p in range((L + NR - 1) // NR):
        j0, j1 = p * NR, min(L, p * NR + NR)
        j = j0
        while j + 8 <= j1:
            r0, r1 = qkv[lo + j, col:col + dH], qkv[lo + j + 1, col:col + dH]
            r2, r3 = qkv[lo + j + 2, col:col + dH], qkv[lo + j + 3, col:col + dH]
            r4, r5 = qkv[lo + j + 4, col:col + dH], qkv[lo + j + 5, col:col + dH]
            r6, r7 = qkv[lo + j + 6, col:col + dH], qkv[lo + j + 7, col:col + dH]
            c = j - j0
            for d in range(dH):
                t = kp[p, d]
                t[c], t[c + 1], t[c + 2], t[c + 3] = r0[d], r1[d], r2[d], r3[d]
                t[c + 4], t[c + 5], t[c + 6], t[c + 7] = r4[d], r5[d], r6[d], r7[d]
            j += 8
        for k in range(j, j1):
            src = qkv[lo + k, col:col + dH]
            for d in range(dH):
                kp[p, d, k - j0] = src[d]


# 4 query rows against a panel of keys: gemm.py's tile kernel without its prefetches (the
# keys are in L2 already; prefetching cost q·kᵀ ~25 % here, AVX2)
_qk_tile = _tile_kernel(4, PANEL_VECTORS, False)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
def _scores(q4, kp, L, s, last):
    # s[:4, :L] = q4 @ Kᵀ, the keys packed into panels kp [P, dH, NR]: each score in registers
    # over all head dims. A last partial panel goes through ``last`` [4, NR], so s is L wide,
    # as the softmax and P·V want it
    NR = kp.shape[2]
    full = L // NR
    for p in range(full):
        _qk_tile(q4, 0, kp, p, s, p * NR, 0, 0)
    if full < kp.shape[0]:
        _qk_tile(q4, 0, kp, full, last, 0, 0, 0)
        for r in range(4):
            s[r, full * NR:L] = last[r, :L - full * NR]


@njit(fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
def _softmax_rows(s, nr, inv):  # s[:nr] -> exp(s - row max) in place, inv[r] = 1 / row sum
    for r in range(nr):
        row = s[r]
        inv[r] = 1 / exp_sum(row, row_max(row))


@njit(fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
def _pack_v(qkv, lo, vo, dH, wp):  # V = qkv[lo:lo+L, vo:vo+dH] -> panels wp [P, L, NR], zeros past dH
    NR = wp.shape[2]
    for p in range(wp.shape[0]):
        c0 = p * NR
        n = min(NR, dH - c0)
        for k in range(wp.shape[1]):
            src, dst = qkv[lo + k, vo + c0:vo + c0 + n], wp[p, k]
            for c in range(n):
                dst[c] = src[c]
            for c in range(n, NR):
                dst[c] = 0


V_VECTORS = 2  # vectors of columns per V panel: 16 float32 (32 on AVX-512), dividing head sizes 32 and 64
_vtile4, _vtile3, _vtile2, _vtile1 = (_tile_kernel(r, V_VECTORS, False) for r in (4, 3, 2, 1))


@njit(fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
def _context(s, nr, inv, wp, ctx, out, r0, col, dH):
    # out[r0+r, col:col+dH] = (s[r]·inv[r])·V for nr <= 4 rows, V packed into panels wp: gemm.py's
    # tile kernel (register-blocked vector FMAs in LLVM IR, the keys in order), into ctx [4, P·NR]
    NR = wp.shape[2]
    for p in range(wp.shape[0]):
        if nr == 4:
            _vtile4(s, 0, wp, p, ctx, p * NR, 0, 0)
        elif nr == 3:
            _vtile3(s, 0, wp, p, ctx, p * NR, 0, 0)
        elif nr == 2:
            _vtile2(s, 0, wp, p, ctx, p * NR, 0, 0)
        else:
            _vtile1(s, 0, wp, p, ctx, p * NR, 0, 0)
    for r in range(nr):
        o, cr, i = out[r0 + r, col:col + dH], ctx[r], inv[r]
        for d in range(dH):
            o[d] = cr[d] * i


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
def _attention_tiled(qkv, starts, mask, has_mask, n_head, scale, out):
    H = qkv.shape[1] // 3
    dH = H // n_head
    NR = PANEL_VECTORS * VECTOR_BYTES // qkv.itemsize  # keys per K panel: 24 float32 (48 on AVX-512)
    NV = V_VECTORS * VECTOR_BYTES // qkv.itemsize  # head dims per V panel: 16 float32 (32 on AVX-512)
    for task in prange((starts.size - 1) * n_head):
        b, h = task // n_head, task % n_head
        lo, L = starts[b], starts[b + 1] - starts[b]
        if L == 0:
            continue
        PK = (L + NR - 1) // NR
        kp = np.empty((PK, dH, NR), dtype=qkv.dtype)  # kp[p, d, c] = k[p·NR + c, d]
        kp[PK - 1] = 0  # keys past L in the last panel: their scores are computed, never read
        _pack_k(qkv, lo, L, H + h * dH, dH, kp)
        wp = np.empty(((dH + NV - 1) // NV, L, NV), dtype=qkv.dtype)  # V in panels, for the tile kernel
        _pack_v(qkv, lo, 2 * H + h * dH, dH, wp)
        q4 = np.zeros((4, dH), dtype=qkv.dtype)  # 4 query rows, scaled: the tile kernel's rows
        s = np.empty((4, L), dtype=qkv.dtype)  # scores, then probabilities, of the 4 rows
        last = np.empty((4, NR), dtype=qkv.dtype)
        inv = np.empty(4, dtype=qkv.dtype)
        ctx = np.empty((4, wp.shape[0] * NV), dtype=qkv.dtype)  # the 4 rows' unnormalized context
        for i0 in range(0, L, 4):
            nr = min(4, L - i0)
            for r in range(nr):  # rows past nr keep zeros (or an earlier row): computed, not used
                src, dst = qkv[lo + i0 + r, h * dH:h * dH + dH], q4[r]
                for d in range(dH):
                    dst[d] = src[d] * scale
            _scores(q4, kp, L, s, last)
            if has_mask:
                mr = mask[b]
                for r in range(nr):
                    row = s[r]
                    for j in range(L):
                        row[j] += mr[j]
            _softmax_rows(s, nr, inv)
            _context(s, nr, inv, wp, ctx, out, lo + i0, h * dH, dH)


# The default per vector width, chosen at import: numba_gemm where the tiles are 8 rows (AVX-512),
# numba_tiled on AVX2, where it ran 4-13 % faster at every shape measured (docs/kernels.md)
TILED_DEFAULT = VECTOR_BYTES == 32


@register("attention", "numba_tiled", default=TILED_DEFAULT)
def attention_numba_tiled(qkv, starts, n_head, scale, mask=None):
    return _run(_attention_tiled, qkv, starts, n_head, scale, mask)


_vtile8 = _tile_kernel(8, V_VECTORS, False)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
def _key_tiles(x, nr, kp, p, s):  # s[:nr, p·NR:(p+1)·NR] = x[:nr] @ kp[p]: gemm.py's tiles, which
    # prefetch the next key panel meanwhile
    _tiles(x, 0, nr, kp, p, s, p * kp.shape[2], (p + 1) % kp.shape[0], (s[0], 0, -1))  # act -1: no epilogue


@njit(fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
def _value_tiles(s, nr, vp, p, ctx):  # ctx[:nr, p·NV:(p+1)·NV] = s[:nr] @ vp[p]
    c, i, rest = p * vp.shape[2], 0, nr
    if TILE_ROWS == 8 and rest == 8:
        _vtile8(s, 0, vp, p, ctx, c, 0, 0)
        return
    if rest >= 4:
        _vtile4(s, 0, vp, p, ctx, c, 0, 0)
        i, rest = 4, rest - 4
    if rest == 3:
        _vtile3(s, i, vp, p, ctx, c, 0, 0)
    elif rest == 2:
        _vtile2(s, i, vp, p, ctx, c, 0, 0)
    elif rest == 1:
        _vtile1(s, i, vp, p, ctx, c, 0, 0)


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
def _attention_gemm(qkv, starts, mask, has_mask, n_head, scale, out):
    H = qkv.shape[1] // 3
    dH = H // n_head
    NR = PANEL_VECTORS * VECTOR_BYTES // qkv.itemsize  # keys per K panel
    NV = V_VECTORS * VECTOR_BYTES // qkv.itemsize  # head dims per V panel
    for task in prange((starts.size - 1) * n_head):
        b, h = task // n_head, task % n_head
        lo, L = starts[b], starts[b + 1] - starts[b]
        if L == 0:
            continue
        PK = (L + NR - 1) // NR
        LP = PK * NR  # keys padded to whole panels: zero keys, zero values, probability 0
        q = np.empty((L, dH), dtype=qkv.dtype)  # q·scale, the tile kernel's rows
        for i in range(L):
            src, dst = qkv[lo + i, h * dH:h * dH + dH], q[i]
            for d in range(dH):
                dst[d] = src[d] * scale
        kp = np.zeros((PK, dH, NR), dtype=qkv.dtype)  # kp[p, d, c] = k[p·NR + c, d]
        _pack_k(qkv, lo, L, H + h * dH, dH, kp)
        PV = (dH + NV - 1) // NV
        vp = np.zeros((PV, LP, NV), dtype=qkv.dtype)
        _pack_v(qkv, lo, 2 * H + h * dH, dH, vp[:, :L])
        s = np.empty((TILE_ROWS, LP), dtype=qkv.dtype)
        inv = np.empty(TILE_ROWS, dtype=qkv.dtype)
        ctx = np.empty((TILE_ROWS, PV * NV), dtype=qkv.dtype)
        for i0 in range(0, L, TILE_ROWS):
            nr = min(TILE_ROWS, L - i0)
            x = q[i0:i0 + nr]
            for p in range(PK):
                _key_tiles(x, nr, kp, p, s)
            for r in range(nr):
                row = s[r, :L]
                if has_mask:
                    mr = mask[b]
                    for j in range(L):
                        row[j] += mr[j]
                inv[r] = 1 / exp_sum(row, row_max(row))
                s[r, L:] = 0
            for p in range(PV):
                _value_tiles(s, nr, vp, p, ctx)
            for r in range(nr):
                o, cr, v = out[lo + i0 + r, h * dH:h * dH + dH], ctx[r], inv[r]
                for d in range(dH):
                    o[d] = cr[d] * v


@register("attention", "numba_gemm", default=not TILED_DEFAULT)
def attention_numba_gemm(qkv, starts, n_head, scale, mask=None):
    return _run(_attention_gemm, qkv, starts, n_head, scale, mask)


# the default version's kernel and wrapper, for the whole-layer kernel (layer.py)
_attention, attention_default = ((_attention_tiled, attention_numba_tiled) if TILED_DEFAULT
                                 else (_attention_gemm, attention_numba_gemm))
