"""A whole encoder layer as one compiled call, for a few rows.

Not an op with versions: minibert.model's layer plans run the same kernels (Q/K/V + bias,
attention, output + LayerNorm, intermediate + activation, output + LayerNorm: gemm._gemm_packed
with its epilogues and attention._attention_tiled), here called from one ``@njit`` function
instead of five Python calls. Same kernels on the same arguments: the same numbers bit for bit
(tests/test_model.py checks it against the plan's Python calls and the unplanned pass).

Why: a short input's layer is five parallel regions of a few µs each, and the Python around
them (the wrappers' argument handling, Numba's dispatch of a dozen arguments per call) costs
tens of µs more per layer; called from compiled code the kernels skip both, and one dispatch
per layer is left. Measured, MiniLM (1, 16) passes back to back, interleaved A/B on a loaded
machine: 2.95 ms against 3.06 (medians; minimums 2.76 against 2.86). The price is compile time
on a cold cache: this function links the kernels it calls, ~1.9 s more on that machine.

Only for up to ``dense.ACT_EPILOGUE_ROWS`` rows, where every epilogue is fused (above, the
activation runs as a pass of its own, and the Python per layer is well under 1 % of the work):
:func:`fits` says whether a layer's input can run here.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .attention import _attention_tiled
from .activations import ACT_CODES
from .dense import ACT_EPILOGUE_ROWS
from .gemm import BIAS_ACT, LAYERNORM, _gemm_packed, _unused, rows_for

_CODES = np.array([BIAS_ACT, LAYERNORM], dtype=np.int64)  # passed as data: a literal epilogue code
# would type _gemm_packed anew (Literal[int]) and compile it once more per code


@njit(cache=True)
def _layer(x, starts, mask, has_mask, n_head, scale, codes, rows_h, rows_i, unused_vec, unused_mat, unused_ints,
           qkv_p, qkv_b, o_p, o_b, o_lw, o_lb, o_eps, i_p, i_b, act, f_p, f_b, f_lw, f_lb, f_eps):
    # x [N, H] -> [N, H]; *_p the packed panels of each weight (gemm.pack), *_b the biases, *_lw and
    # *_lb the LayerNorms' weight and bias; rows_h and rows_i gemm.block_rows of an [N, H] and an
    # [N, I] input. Each step as minibert.model.layer_planned runs it.
    N, H = x.shape
    bias_act, layernorm = codes[0], codes[1]
    none = act - act  # activations.NONE (0), typed like act
    qkv = np.empty((N, qkv_b.size), dtype=x.dtype)  # q | k | v, biases added
    _gemm_packed(x, qkv_p, qkv, rows_h, bias_act, qkv_b, none, unused_mat, unused_vec, unused_vec, o_eps,
                 unused_ints)
    context = np.empty((N, H), dtype=x.dtype)
    _attention_tiled(qkv, starts, mask, has_mask, n_head, scale, context)
    a = np.empty((N, H), dtype=x.dtype)  # LayerNorm(context·Wᵀ + b + x)
    _gemm_packed(context, o_p, a, rows_h, layernorm, o_b, none, x, o_lw, o_lb, o_eps,
                 np.zeros((N + rows_h - 1) // rows_h, dtype=np.int64))
    h = np.empty((N, i_b.size), dtype=x.dtype)  # act(a·Wᵀ + b)
    _gemm_packed(a, i_p, h, rows_h, bias_act, i_b, act, unused_mat, unused_vec, unused_vec, o_eps, unused_ints)
    out = np.empty((N, H), dtype=x.dtype)  # LayerNorm(h·Wᵀ + b + a)
    _gemm_packed(h, f_p, out, rows_i, layernorm, f_b, none, a, f_lw, f_lb, f_eps,
                 np.zeros((N + rows_i - 1) // rows_i, dtype=np.int64))
    return out


def fits(x) -> bool:
    """Whether :func:`run` takes ``x`` (the rows a plan's layer gets)."""
    return 0 < x.shape[0] <= ACT_EPILOGUE_ROWS


def run(x, starts, mask, n_head, steps):
    """The layer of ``steps`` (minibert.model's plan: four dense.Prepared, Q/K/V, attention
    output + LayerNorm, intermediate + activation, output + LayerNorm) on ``x`` [N, H], C-contiguous,
    N within :func:`fits`; ``starts`` and ``mask`` as the attention kernel takes them."""
    qkv_d, o_d, i_d, f_d = steps
    dt = x.dtype
    vec, mat, ints, _ = _unused(dt)
    N, H = x.shape
    m = np.zeros((1, 1), dtype=dt) if mask is None else np.ascontiguousarray(mask, dtype=dt)
    return _layer(x, starts, m, mask is not None, n_head, dt.type((H // n_head) ** -0.5), _CODES,
                  rows_for(N, x.nbytes), rows_for(N, N * i_d.bias.size * dt.itemsize), vec, mat, ints,
                  qkv_d.panels, qkv_d.bias, o_d.panels, o_d.bias, *o_d.ln, i_d.panels, i_d.bias, ACT_CODES[i_d.act],
                  f_d.panels, f_d.bias, *f_d.ln)
