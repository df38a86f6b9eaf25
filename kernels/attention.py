"""Scaled dot-product attention of a batch of sequences laid out row after row.

Signature of every version: ``attention(qkv, starts, n_head, scale, mask=None) -> context`` with
``qkv`` [N, 3H] (each row q | k | v of one token, heads side by side in each), ``starts`` int64
[B+1] (sequence b is rows ``starts[b]:starts[b+1]``; for a dense batch ``b·T``), ``mask`` None or
the additive [B, T] mask of a dense batch (finfo.min at padding keys), and ``context`` [N, H]: for
each sequence and head ``softmax(q·kᵀ·scale + mask)·v``, heads side by side again. A packed batch
needs no mask: each sequence sees only its own rows. Empty sequences are skipped.

Versions:
- ``numpy``: the reference — one sequence at a time, q·kᵀ and P·V as batched matmuls over the
  heads, the softmax the NumPy reference of softmax.py.
- ``blas_v2`` (default): the same matmuls (NumPy's BLAS) with masked_softmax v2 normalizing the
  scores in place. One sequence at a time keeps a single [nH, L, L] block alive, still in cache
  when P·V reads it, and never a [B, nH, T, T] tensor.
- ``numba_fused``: one Numba task per (sequence, head) under prange: K transposed into a scratch,
  then 4 query rows at a time: their scores, softmax and P·V all in L1, nothing [L, L] in memory.
  Kept to measure, not the default: without register blocking the loops are store-bound, and it
  was 1.6× slower than ``blas_v2`` at bert-base (8, 128) (``python -m benchmarks.kernels``); only
  at head size 32 and long sequences did it come level.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .fastmath import fexp
from .registry import register
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


@register("attention", "blas_v2", default=True)
def attention_blas_v2(qkv, starts, n_head, scale, mask=None):
    return _per_sequence(qkv, starts, n_head, scale, mask, masked_softmax_numba_v2)


@njit(parallel=True, fastmath=True, cache=True)
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


@register("attention", "numba_fused")
def attention_numba_fused(qkv, starts, n_head, scale, mask=None):
    qkv = np.ascontiguousarray(qkv)
    N, H = qkv.shape[0], qkv.shape[1] // 3
    out = np.empty((N, H), dtype=qkv.dtype)  # every row belongs to one sequence: all are written
    if N == 0:
        return out
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    # scores start from the mask row and add (q·scale)·k: q·k·scale + mask up to rounding (an
    # ulp or so, inside the kernel tolerance)
    m = np.zeros((1, 1), dtype=qkv.dtype) if mask is None else np.ascontiguousarray(mask, dtype=qkv.dtype)
    _attention_fused(qkv, starts, m, mask is not None, n_head, qkv.dtype.type(scale), out)
    return out
