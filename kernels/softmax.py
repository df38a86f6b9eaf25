"""Scaled, masked softmax over the last axis: the probabilities of BERT's attention.

Signature of every version: ``masked_softmax(scores, mask, scale) -> probs`` with
``scores`` [B, nH, Tq, Tk] (raw q·kᵀ), ``mask`` [B, Tk] additive (0 where a key is attended,
``finfo(dtype).min`` where it is padding) or None, ``scale`` a float (head_dim ** -0.5).
``probs = softmax(scores · scale + mask[:, None, None, :])`` in that order, as transformers'
eager attention computes it.

Why finfo.min and not -inf: a row whose keys are all padding must stay finite. With finfo.min
every score of such a row rounds to the same value and the softmax is uniform, which is what
transformers returns; -inf would give 0/0 = NaN.

Versions:
- ``numpy``: the reference — scale, add, subtract the row max, exp, normalise.
- ``numba``: one loop per (b, h, q) row doing the same arithmetic in place of temporaries.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .registry import register


@register("masked_softmax", "numpy")
def masked_softmax_numpy(scores, mask, scale):
    s = scores * scores.dtype.type(scale)  # [B, nH, Tq, Tk]
    if mask is not None:
        s = s + mask[:, None, None, :]
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


@njit(cache=True)
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


@register("masked_softmax", "numba", default=True)
def masked_softmax_numba(scores, mask, scale):
    scores = np.ascontiguousarray(scores)
    out = np.empty_like(scores)
    dt = scores.dtype.type
    if mask is None:
        dummy = np.zeros((scores.shape[0], scores.shape[3]), dtype=scores.dtype)
        _masked_softmax_rows(scores, dummy, False, dt(scale), out)
    else:
        _masked_softmax_rows(scores, np.ascontiguousarray(mask, dtype=scores.dtype), True, dt(scale), out)
    return out
