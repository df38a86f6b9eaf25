"""A planned encoder layer's five kernels, called directly, for a few rows.

Not an op with versions: minibert.model's layer plans run these kernels (Q/K/V + bias,
attention, output + LayerNorm, intermediate + activation, output + LayerNorm:
``gemm._gemm_packed`` with its epilogues and ``attention._attention_tiled``) through the
wrappers of kernels/dense.py and kernels/attention.py; :func:`run` calls the compiled kernels
themselves, with every argument that does not depend on the input made once (the plan's
``dense.Prepared``). Same kernels on the same arguments: the same numbers bit for bit
(tests/test_model.py checks it against the wrappers and the unplanned pass).

Why: a short input's layer is five parallel regions of a few µs each, and the wrappers' Python
around them (helpers, placeholders, re-derived arguments) cost tens of µs more per layer.
Measured, MiniLM (1, 16) passes back to back, interleaved A/B on a loaded machine (medians /
minimums of 31 rounds): through the wrappers 3.64 / 3.11 ms, this 3.47 / 3.04.

Tried and not kept: the same function under ``@njit``, so that the five calls come from
compiled code with one dispatch per layer: 3.50 / 2.92 ms in that A/B, about the same median.
But a compiled caller links the kernels it calls, and on a cold cache their code is generated
again: ``minibert encode`` took ~4 s longer there (17.2 -> 21.4 s, medians of 3, loaded), too
close to the 15 s budget for a cold start (issue 3).

Only for up to ``dense.ACT_EPILOGUE_ROWS`` rows, where every epilogue is fused (above, the
activation runs as a pass of its own, and the Python per layer is well under 1 % of the work):
:func:`fits` says whether a layer's input can run here.
"""
from __future__ import annotations

import numpy as np

from .activations import ACT_CODES, NONE
from .attention import _attention_tiled
from .dense import ACT_EPILOGUE_ROWS
from .gemm import BIAS_ACT, LAYERNORM, _gemm_packed, _unused, rows_for


def fits(x) -> bool:
    """Whether :func:`run` takes ``x`` (the rows a plan's layer gets)."""
    return 0 < x.shape[0] <= ACT_EPILOGUE_ROWS


def run(x, starts, mask, n_head, steps):
    """The layer of ``steps`` (minibert.model's plan: four dense.Prepared, Q/K/V, attention
    output + LayerNorm, intermediate + activation, output + LayerNorm) on ``x`` [N, H],
    C-contiguous, N within :func:`fits`; ``starts`` (int64 [B+1]) and ``mask`` (None or the
    additive [B, T] mask of a dense batch) as the attention kernel takes them."""
    qkv_d, o_d, i_d, f_d = steps
    dt = x.dtype
    vec, mat, ints, zero = _unused(dt)
    N, H = x.shape
    rows_h, rows_i = rows_for(N, x.nbytes), rows_for(N, N * i_d.bias.size * dt.itemsize)  # gemm.block_rows
    qkv = np.empty((N, qkv_d.bias.size), dtype=dt)  # q | k | v, biases added
    _gemm_packed(x, qkv_d.panels, qkv, rows_h, BIAS_ACT, qkv_d.bias, NONE, mat, vec, vec, zero, ints)
    context = np.empty((N, H), dtype=dt)
    m = np.zeros((1, 1), dtype=dt) if mask is None else np.ascontiguousarray(mask, dtype=dt)
    _attention_tiled(qkv, starts, m, mask is not None, n_head, dt.type((H // n_head) ** -0.5), context)
    a = np.empty((N, H), dtype=dt)  # LayerNorm(context·Wᵀ + b + x)
    _gemm_packed(context, o_d.panels, a, rows_h, LAYERNORM, o_d.bias, NONE, x, *o_d.ln,
                 np.zeros(-(-N // rows_h), dtype=np.int64))
    h = np.empty((N, i_d.bias.size), dtype=dt)  # act(a·Wᵀ + b)
    _gemm_packed(a, i_d.panels, h, rows_h, BIAS_ACT, i_d.bias, ACT_CODES[i_d.act], mat, vec, vec, zero, ints)
    out = np.empty((N, H), dtype=dt)  # LayerNorm(h·Wᵀ + b + a)
    _gemm_packed(h, f_d.panels, out, rows_i, LAYERNORM, f_d.bias, NONE, a, *f_d.ln,
                 np.zeros(-(-N // rows_i), dtype=np.int64))
    return out
