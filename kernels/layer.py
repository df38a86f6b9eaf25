"""A whole encoder layer in one call: model.layer's five kernels (Q/K/V, attention, attention
output + LayerNorm, intermediate + activation, output + LayerNorm) called in the same order with
the same arguments from one Numba function, so the numbers are the same bits.

Why: a few rows' pass is short enough that the Python between kernels counts. MiniLM (1, 16)
back to back spent ~0.5 ms of its ~2.5 ms in Python (443 calls a pass), the same kernels called
layer by layer from here ~1.9 ms (docs/performance.md). Used up to ``LAYER_ROWS`` rows: above
that the per-kernel path's Python is a small share of the pass.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .activations import ACT_CODES
from .attention import _attention, attention_default
from .dense import Prepared
from .gemm import BIAS_ACT, LAYERNORM, NONE, _gemm_packed, _unused, ln_block_rows, rows_per_block

LAYER_ROWS = 256  # the most rows a layer runs in one call


@njit(error_model="numpy", cache=True, nogil=True)
def _layer(x, starts, mask, has_mask, n_head, scale, rows_h, rows_hl, rows_il, qkv_p, qkv_b, ao_p, ao_b, ln1_w,
           ln1_b, eps1, it_p, it_b, act, out_p, out_b, ln2_w, ln2_b, eps2, vec, mat, ints):
    # x [N, H] -> [N, H]; rows_h: gemm.block_rows of an [N, H] input, rows_hl / rows_il:
    # gemm.ln_block_rows of an [N, H] / [N, I] input (the LayerNorm epilogue's). The
    # placeholders vec, mat, ints are gemm._unused's, so every call below is the compiled kernel
    # the per-kernel path calls.
    N, H, I = x.shape[0], x.shape[1], it_b.shape[0]
    z = x.dtype.type(0)
    # the epilogue codes as int64 values, not literals: a literal argument compiles another kernel
    bias_act, layernorm, none = np.int64(BIAS_ACT), np.int64(LAYERNORM), np.int64(NONE)
    qkv = np.empty((N, qkv_b.shape[0]), dtype=x.dtype)  # q | k | v, biases added
    _gemm_packed(x, qkv_p, qkv, rows_h, bias_act, qkv_b, none, mat, vec, vec, z, ints)
    context = np.empty((N, H), dtype=x.dtype)
    _attention(qkv, starts, mask, has_mask, n_head, scale, context)
    a = np.empty((N, H), dtype=x.dtype)  # LayerNorm(context·Wᵀ + b + x)
    _gemm_packed(context, ao_p, a, rows_hl, layernorm, ao_b, none, x, ln1_w, ln1_b, eps1,
                 np.zeros((N + rows_hl - 1) // rows_hl, dtype=np.int64))
    h = np.empty((N, I), dtype=x.dtype)  # act(a·Wᵀ + b)
    _gemm_packed(a, it_p, h, rows_h, bias_act, it_b, act, mat, vec, vec, z, ints)
    out = np.empty((N, H), dtype=x.dtype)  # LayerNorm(h·Wᵀ + b + a)
    _gemm_packed(h, out_p, out, rows_il, layernorm, out_b, none, a, ln2_w, ln2_b, eps2,
                 np.zeros((N + rows_il - 1) // rows_il, dtype=np.int64))
    return out


class PreparedLayer:
    """``layer(x, starts, mask, n_head) -> [N, H]``: model.layer's dense layers and attention for
    x [N, H] (C-contiguous, the weights' dtype, at most ``max_rows`` rows), the sequences as the
    attention kernel takes them (``starts``; ``mask`` a dense batch's additive [B, T] or None).
    Made by :func:`prepare_layer` from four :class:`Prepared` dense layers."""

    __slots__ = ("weights", "intermediate")
    max_rows = LAYER_ROWS

    def __init__(self, qkv, attention_output, intermediate, output):
        ao, it, ou = attention_output, intermediate, output
        self.weights = (qkv.panels, qkv.bias, ao.panels, ao.bias, *ao.ln, it.panels, it.bias, ACT_CODES[it.act],
                        ou.panels, ou.bias, *ou.ln, *_unused(qkv.bias.dtype)[:3])
        self.intermediate = it.weight.shape[0]  # I

    def __call__(self, x, starts, mask, n_head):
        dt, (N, H) = x.dtype, x.shape
        m = _NO_MASK[dt.char] if mask is None else np.ascontiguousarray(mask, dtype=dt)
        return _layer(x, starts, m, mask is not None, n_head, dt.type((H // n_head) ** -0.5),
                      rows_per_block(N, x.nbytes), ln_block_rows(N, x.nbytes),
                      ln_block_rows(N, N * self.intermediate * dt.itemsize), *self.weights)


_NO_MASK = {np.dtype(t).char: np.zeros((1, 1), dtype=t) for t in (np.float32, np.float64)}  # as attention's _run


def prepare_layer(qkv, attention_output, intermediate, output, attention):
    """A :class:`PreparedLayer` if all four dense layers are :class:`Prepared` (the default kernels
    on read-only weights, the LayerNorm ones with ``ln``) and ``attention`` is the default
    attention kernel; else None (the layer runs kernel by kernel)."""
    parts = (qkv, attention_output, intermediate, output)
    if attention is not attention_default or not all(type(p) is Prepared for p in parts):
        return None
    if qkv.ln is not None or qkv.act is not None or intermediate.ln is not None or \
            attention_output.ln is None or output.ln is None:
        return None
    if len({p.weight.dtype for p in parts}) != 1:
        return None
    return PreparedLayer(*parts)
