"""The encoder's dense layers whole: the product, its bias and what follows it, in one kernel.

Two ops, each with its reference and Numba versions of the same signature:
- ``dense_act(x, weight, bias, act=None) -> act(x·Wᵀ + bias)``, x [N, in], weight [out, in] (the
  checkpoint's nn.Linear layout), bias [out], y [N, out]. ``act`` None adds the bias only (Q/K/V,
  the pooler before its tanh); else the name of an activation op, "gelu", "gelu_tanh", "relu"
  or "silu" (BertIntermediate).
- ``dense_layernorm(x, weight, bias, residual, ln_weight, ln_bias, eps) ->
  LayerNorm((x·Wᵀ + bias) + residual)``, residual [N, out], ln_weight and ln_bias [out]:
  BertSelfOutput and BertOutput (post-LN), the adds rounded in transformers' order.

Versions (docs/kernels.md has the measurements):
- ``numpy``: the reference: the gemm reference, then the activation's or LayerNorm's reference.
- ``numba``: the default gemm, then the default activation or LayerNorm with the bias fused: two
  kernels, the baseline the fused version is measured against.
- ``numba_packed`` (default): gemm's numba_packed with an epilogue, one parallel region instead of
  two: bias and activation on each tile's sums in registers, before they are stored; bias +
  residual + LayerNorm by the task that finishes a row block's last panel. The epilogue runs the
  activation and LayerNorm kernels' own formulas, so the numbers are the two kernels'.
  Weights gemm does not pack (writable, other dtypes) and strided ``x`` take the ``numba`` path.
"""
from __future__ import annotations

import numpy as np

from .activations import ACT_CODES
from .gemm import _check, _kept, _packed_ok, gemm_numpy, gemm_packed, packed
from .layernorm import layernorm_numpy
from .registry import default, get, register

ACTIVATIONS = tuple(a for a in ACT_CODES if a is not None)


def _act_code(act):
    code = ACT_CODES.get(act) if isinstance(act, (str, type(None))) else None
    if code is None:
        raise ValueError(f"dense_act: act={act!r} is not an activation; expected None (the bias only) or one of "
                         f"{list(ACTIVATIONS)}")
    return code


def _vector(name, v, n, dtype):  # bias, ln_weight, ln_bias: [n], contiguous, of the compute dtype
    if type(v) is np.ndarray and v.shape == (n,) and v.dtype == dtype and v.flags.c_contiguous:
        return v  # the model's case, with the fewest calls: this runs 3 times a layer per call
    v = np.asarray(v)
    if v.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), one value per output feature; got {v.shape}")
    return np.ascontiguousarray(v, dtype=dtype)


def _panels(x, weight):
    """The packed panels of ``weight`` if the fused kernel can run on ``x``, else None."""
    if x.ndim != 2 or x.dtype != weight.dtype or not x.flags.c_contiguous:
        return None
    panels = _kept(weight)  # the common case: a read-only weight packed on an earlier call
    if panels is not None:
        return panels
    if weight.flags.writeable or not _packed_ok(x, weight):
        return None  # a writable weight may change in place: gemm packs it anew or reads it directly
    return packed(weight)


# -- dense_act -------------------------------------------------------------------------------------
@register("dense_act", "numpy")
def dense_act_numpy(x, weight, bias, act=None):
    _act_code(act)
    y = gemm_numpy(x, weight)  # [N, out]
    return y + bias if act is None else get(act, "numpy")(y, bias)


@register("dense_act", "numba")
def dense_act_numba(x, weight, bias, act=None):
    _act_code(act)
    _check(x, weight, None)
    return _two_kernels(x, weight, _vector("bias", bias, weight.shape[0], x.dtype), act)


def _two_kernels(x, weight, b, act):
    y = default("gemm")(x, weight)
    if act is None:
        y += b
        return y
    return default(act)(y, b)


@register("dense_act", "numba_packed", default=True)
def dense_act_numba_packed(x, weight, bias, act=None):
    _act_code(act)
    shape = _check(x, weight, None)
    b = _vector("bias", bias, shape[1], x.dtype)
    panels = _panels(x, weight)
    if panels is None:
        return _two_kernels(x, weight, b, act)
    return _act_packed(x, panels, b, act)


def _act_packed(x, panels, b, act):  # act(x·Wᵀ + b) from W's panels; arguments checked
    y = np.empty((x.shape[0], b.shape[0]), dtype=x.dtype)
    if y.size:
        gemm_packed(x, panels, y, b, ACT_CODES[act])
    return y


# -- dense_layernorm -------------------------------------------------------------------------------
@register("dense_layernorm", "numpy")
def dense_layernorm_numpy(x, weight, bias, residual, ln_weight, ln_bias, eps):
    return layernorm_numpy(gemm_numpy(x, weight), residual, ln_weight, ln_bias, eps, bias)


def _ln_args(x, weight, bias, residual, ln_weight, ln_bias):  # checked: shape, residual, bias, ln_weight, ln_bias
    shape = _check(x, weight, None)
    residual = np.asarray(residual)
    if residual.shape != shape:
        raise ValueError(f"dense_layernorm: residual must have the output's shape {shape}; got {residual.shape}")
    return (shape, residual, *(_vector(n, v, shape[1], x.dtype) for n, v in
                               (("bias", bias), ("ln_weight", ln_weight), ("ln_bias", ln_bias))))


@register("dense_layernorm", "numba")
def dense_layernorm_numba(x, weight, bias, residual, ln_weight, ln_bias, eps):
    _, residual, b, lw, lb = _ln_args(x, weight, bias, residual, ln_weight, ln_bias)
    return default("layernorm")(default("gemm")(x, weight), residual, lw, lb, eps, b)


@register("dense_layernorm", "numba_packed", default=True)
def dense_layernorm_numba_packed(x, weight, bias, residual, ln_weight, ln_bias, eps):
    shape, residual, b, lw, lb = _ln_args(x, weight, bias, residual, ln_weight, ln_bias)
    dt = x.dtype
    panels = _panels(x, weight)
    if panels is None:
        return default("layernorm")(default("gemm")(x, weight), residual, lw, lb, eps, b)
    return _ln_packed(x, panels, b, np.ascontiguousarray(residual, dtype=dt), lw, lb, eps)


def _ln_packed(x, panels, b, residual, lw, lb, eps):  # LayerNorm((x·Wᵀ + b) + residual) from W's panels
    y = np.empty(residual.shape, dtype=x.dtype)
    if y.size:
        gemm_packed(x, panels, y, b, ln=(residual, lw, lb, eps))
    return y


# -- prepared: a dense layer's kernel arguments made once ----------------------------------------------
class Prepared:
    """One dense layer of the model with its epilogue, ready to run: ``layer(x)`` is
    ``dense_act(x, weight, bias, act)`` and ``layer(x, residual)`` (made with ``ln``) is
    ``dense_layernorm(x, weight, bias, residual, *ln)``, the same code on the same arguments
    without the per-call checks and lookups. minibert.model makes one per dense layer at load and
    when a weight is assigned. ``x`` (and ``residual``) must be C-contiguous [N, in] ([N, out]) of
    the weight's dtype. Make one with :func:`prepare`."""

    __slots__ = ("weight", "panels", "bias", "act", "ln")

    def __init__(self, weight, bias, act, ln):
        self.weight, self.panels, self.bias, self.act, self.ln = weight, packed(weight), bias, act, ln

    def __call__(self, x, residual=None):
        if self.ln is None:
            return _act_packed(x, self.panels, self.bias, self.act)
        return _ln_packed(x, self.panels, self.bias, residual, *self.ln)


def prepare(weight, bias, act=None, ln=None):
    """A :class:`Prepared` dense layer (``ln`` = (ln_weight, ln_bias, eps) for the LayerNorm
    epilogue), or None when the fused kernel does not take ``weight``: a writable weight, or not
    float32/float64, or the vectors do not fit it."""
    _act_code(act)
    if weight.flags.writeable or weight.ndim != 2 or weight.dtype not in (np.float32, np.float64):
        return None
    if not (weight.flags.c_contiguous and weight.shape[0] > 0 and weight.shape[1] > 0):
        return None
    dt, n = weight.dtype, weight.shape[0]
    try:
        b = _vector("bias", bias, n, dt)
        if ln is not None:
            ln = (_vector("ln_weight", ln[0], n, dt), _vector("ln_bias", ln[1], n, dt), dt.type(ln[2]))
    except ValueError:
        return None
    return Prepared(weight, b, act, ln)
