"""Which input tokens a representation or a prediction depends on, without gradients.

- :func:`attention_rollout` (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"):
  each layer's attention averaged over heads, the residual added as ``0.5·A + 0.5·I``, rows
  renormalized, and the layers multiplied: ``R = Â_L ··· Â_2 Â_1``.
- :func:`value_zeroing` (Mohebbi et al. 2023, "Quantifying Context Mixing in Transformers"): token
  j's value vector zeroed in layer l (every head), and how far token i's layer-l output moves:
  ``C[l, b, i, j] = 1 − cos(x̃_i^{¬j}, x_i)``.
- :func:`occlusion` (Zeiler & Fergus 2014; Li et al. 2016 for text): the drop of a per-sequence
  metric when one input token is replaced, by default with [MASK].

The model runs the perturbed inputs batched, several variants in one call.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .interventions import _inputs, calls, per_call, rows
from .outputs import ModelOutput
from .tokenizer import checkpoint_tokenizer

__all__ = ["attention_rollout", "value_zeroing", "occlusion"]


def _valid(attention_mask, B, T, what):
    if attention_mask is None:
        return np.ones((B, T), dtype=bool)
    m = np.asarray(attention_mask)
    if m.shape != (B, T):
        raise ValueError(f"attention_mask has shape {m.shape}; expected ({B}, {T}) like the {what}")
    return m != 0


def attention_rollout(attentions: Sequence[np.ndarray], attention_mask=None, add_residual: bool = True) -> np.ndarray:
    """[B, T, T]: row i is how much token i's last-layer representation draws on each input token,
    by attention alone. ``attentions``: the L arrays [B, nH, T, T] of ``output_attentions=True``;
    padding tokens (``attention_mask`` 0) get zero rows and columns and the rest renormalize."""
    if isinstance(attentions, np.ndarray) and attentions.ndim == 5:
        attentions = list(attentions)
    try:
        A = [np.asarray(a) for a in attentions]
    except TypeError:
        raise TypeError(f"attentions must be a sequence of [B, nH, T, T] arrays; got {type(attentions).__name__}") from None
    if not A or any(a.ndim != 4 or a.shape != A[0].shape or a.shape[2] != a.shape[3] for a in A):
        raise ValueError("attentions must be a non-empty sequence of arrays of one shape [B, nH, T, T]; got shapes "
                         f"{[a.shape for a in A]}")
    B, _, T, _ = A[0].shape
    dtype = np.result_type(A[0].dtype, np.float32)
    valid = _valid(attention_mask, B, T, "attentions")
    keep = (valid[:, :, None] & valid[:, None, :]).astype(np.float64)  # [B, T, T]
    eye = np.eye(T)[None]
    R = np.broadcast_to(eye * keep, (B, T, T)).copy()
    for a in A:
        m = a.astype(np.float64).mean(axis=1)  # [B, T, T]: heads averaged
        if add_residual:
            m = 0.5 * m + 0.5 * eye
        m = m * keep
        s = m.sum(axis=-1, keepdims=True)
        m = np.divide(m, s, out=np.zeros_like(m), where=s > 0)
        R = m @ R
    return R.astype(dtype)


def _model_and_inputs(model, x):
    inputs = _inputs("x", x)
    B, T = inputs["input_ids"].shape
    return inputs, B, T, _valid(inputs.get("attention_mask"), B, T, "input_ids")


def value_zeroing(model, x, batch_size: int = 64) -> np.ndarray:
    """[L, B, T, T]: ``C[l, b, i, j]`` = cosine distance between token i's layer-l output with
    token j's value vector zeroed in that layer (all heads) and without. Rows and columns of
    padding tokens are 0. The paper then normalizes each row to sum 1; divide by
    ``C.sum(-1, keepdims=True)`` for that."""
    inputs, B, T, valid = _model_and_inputs(model, x)
    n_call = per_call(batch_size, B)
    L = model.config.num_hidden_layers
    outs = [f"encoder.layer.{l}.output" for l in range(L)]
    ref = model(**inputs, capture=outs).captures  # the same route as the zeroed runs (taps on)
    ref = [ref[o].astype(np.float64) for o in outs]  # [B, T, H] per layer
    ref_norm = [np.linalg.norm(r, axis=-1) for r in ref]  # [B, T]
    cells = [(l, j) for l in range(L) for j in range(T) if valid[:, j].any()]
    C = np.zeros((L, B, T, T))
    for _, chunk, batch in calls(cells, inputs, n_call):
        by_layer = {}
        for slot, (l, j) in enumerate(chunk):
            by_layer.setdefault(l, []).append((slot, j))
        patch = {f"encoder.layer.{l}.attention.self.value": _ZeroValue(cs, B) for l, cs in by_layer.items()}
        got = model(**batch, patch=patch, capture=sorted({outs[l] for l in by_layer})).captures
        for slot, (l, j) in enumerate(chunk):
            a = got[outs[l]][slot * B:(slot + 1) * B].astype(np.float64)  # [B, T, H]
            cos = (a * ref[l]).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * ref_norm[l], 1e-300)
            C[l, :, :, j] = 1 - cos
    C *= (valid[:, :, None] & valid[:, None, :])[None]
    return C


class _ZeroValue:  # value [B·cells, nH, T, dH] with token j's vector zeroed in its cell's rows
    def __init__(self, cells, B):
        self.cells, self.B = cells, B

    def __call__(self, value, name):
        out = value.copy()
        for slot, j in self.cells:
            out[slot * self.B:(slot + 1) * self.B, :, j] = 0
        return out


def _per_sequence(metric, out, B) -> np.ndarray:
    m = np.asarray(metric(out), dtype=np.float64)
    if m.shape == () and B == 1:
        m = m.reshape(1)
    if m.shape != (B,):
        raise ValueError(f"metric must return one number per sequence, shape ({B},); it returned shape {m.shape}")
    return m


def occlusion(model, x, metric: Callable[[ModelOutput], np.ndarray], replace_with="[MASK]",
              tokenizer=None, batch_size: int = 64) -> np.ndarray:
    """[B, T]: ``metric(out)[b]`` of the input minus that of the input with token t replaced by
    ``replace_with`` (a token string, looked up in ``tokenizer`` — by default the checkpoint's —
    or an id). ``metric`` returns one number per sequence, shape [B]. Every valid position is
    occluded, special tokens included; padding positions get 0."""
    inputs, B, T, valid = _model_and_inputs(model, x)
    n_call = per_call(batch_size, B)
    V = model.config.vocab_size
    if isinstance(replace_with, str):
        tok = tokenizer if tokenizer is not None else checkpoint_tokenizer(getattr(model, "name_or_path", None))
        if tok is None:
            raise ValueError(f"replace_with={replace_with!r} is a token, but the checkpoint has no tokenizer files; "
                             "pass tokenizer= or a token id")
        rid = tok.get_vocab().get(replace_with)
        if rid is None:
            raise ValueError(f"replace_with={replace_with!r} is not a token of the tokenizer's vocabulary")
    elif isinstance(replace_with, (int, np.integer)) and not isinstance(replace_with, bool):
        rid = int(replace_with)
        if not 0 <= rid < V:
            raise ValueError(f"replace_with={rid} is outside the vocabulary (0..{V - 1})")
    else:
        raise TypeError(f"replace_with must be a token string or an id; got {replace_with!r}")
    base = _per_sequence(metric, model(**inputs), B)
    positions = [t for t in range(T) if valid[:, t].any()]
    S = np.zeros((B, T))
    for _, chunk, batch in calls(positions, inputs, n_call):
        for slot, t in enumerate(chunk):
            batch["input_ids"][slot * B:(slot + 1) * B, t] = rid
        out = model(**batch)
        for slot, t in enumerate(chunk):
            S[:, t] = base - _per_sequence(metric, rows(out, slot * B, (slot + 1) * B), B)
    return S * valid
