"""Scaled, masked softmax over the last axis: the probabilities of BERT's attention.

Signature of every version: ``masked_softmax(scores, mask, scale, out=None) -> probs`` with
``scores`` [B, nH, Tq, Tk] (raw q·kᵀ), ``mask`` [B, Tk] additive (0 where a key is attended,
``finfo(dtype).min`` where it is padding) or None, ``scale`` a float (head_dim ** -0.5).
``probs = softmax(scores · scale + mask[:, None, None, :])`` in that order, as transformers'
eager attention computes it. ``out`` (an array like ``scores``, which may be ``scores`` itself)
receives the result, so the model normalizes the scores in place.

Why finfo.min and not -inf: a row whose keys are all padding must stay finite. With finfo.min
every score of such a row rounds to the same value and the softmax is uniform, which is what
transformers returns; -inf would give 0/0 = NaN.

Versions:
- ``numpy``: the reference: scale, add, subtract the row max, exp, normalise.
- ``numba``: one loop per (b, h, q) row, the same arithmetic in place of temporaries.
- ``numba_v2`` (default): rows over the threads (``prange``), float32 exp from fastmath.py (it
  vectorizes; ``math.exp`` does not), sums in the rows' dtype. Masked keys still weigh exactly 0.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .fastmath import exp_sum, row_max
from .registry import FASTMATH, register


def _out_like(scores, out):
    if out is None:
        return np.empty_like(scores)
    if out.shape != scores.shape or out.dtype != scores.dtype or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {scores.dtype} array of shape {scores.shape}; "
                         f"got {out.dtype} {out.shape}")
    return out


@register("masked_softmax", "numpy")
def masked_softmax_numpy(scores, mask, scale, out=None):
    s = scores * scores.dtype.type(scale)  # [B, nH, Tq, Tk]
    if mask is not None:
        s = s + mask[:, None, None, :]
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return np.divide(e, e.sum(axis=-1, keepdims=True), out=None if out is None else _out_like(scores, out))


@njit(error_model="numpy", cache=True, nogil=True)
def _masked_softmax_rows(s, mask, has_mask, scale, out):
    b_n, h_n, q_n, k_n = s.shape
    for b in range(b_n):
        for h in range(h_n):
            for q in range(q_n):
                m = -np.inf
                for k in range(k_n):
                    v = s[b, h, q, k] * scale
                    if has_mask:
                        v = v + mask[b, k]
                    out[b, h, q, k] = v
                    if v > m:
                        m = v
                tot = 0.0
                for k in range(k_n):
                    e = math.exp(out[b, h, q, k] - m)
                    out[b, h, q, k] = e
                    tot += out[b, h, q, k]
                for k in range(k_n):
                    out[b, h, q, k] = out[b, h, q, k] / tot


@register("masked_softmax", "numba")
def masked_softmax_numba(scores, mask, scale, out=None):
    scores = np.ascontiguousarray(scores)
    out = _out_like(scores, out)
    dt = scores.dtype.type
    if mask is None:
        dummy = np.zeros((scores.shape[0], scores.shape[3]), dtype=scores.dtype)
        _masked_softmax_rows(scores, dummy, False, dt(scale), out)
    else:
        _masked_softmax_rows(scores, np.ascontiguousarray(mask, dtype=scores.dtype), True, dt(scale), out)
    return out


@njit(parallel=True, fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
def _masked_softmax_v2(s, mask, scale, one, out):
    # s, out: [R, Tk] rows (R = B·nH·Tq, rows of one sequence contiguous); mask: [B, Tk] additive
    rows, k_n = s.shape
    per_seq = rows // mask.shape[0]
    for r in prange(rows):
        src, dst, add = s[r], out[r], mask[r // per_seq]  # 1-D views: the inner loops vectorize
        for k in range(k_n):
            dst[k] = src[k] * scale + add[k]
        inv = one / exp_sum(dst, row_max(dst))  # vector loops in a fixed order (fastmath.py)
        for k in range(k_n):
            dst[k] *= inv


@register("masked_softmax", "numba_v2", default=True)
def masked_softmax_numba_v2(scores, mask, scale, out=None):
    scores = np.ascontiguousarray(scores)
    B, nH, Tq, Tk = scores.shape
    out = _out_like(scores, out)  # may be scores: each row is read before it is written
    if scores.size == 0:
        return out
    dt = scores.dtype.type
    m = np.zeros((B, Tk), dtype=scores.dtype) if mask is None else np.ascontiguousarray(mask, dtype=scores.dtype)
    _masked_softmax_v2(scores.reshape(B * nH * Tq, Tk), m, dt(scale), dt(1.0),
           out.reshape(B * nH * Tq, Tk))
    return out
