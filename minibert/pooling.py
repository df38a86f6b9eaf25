"""Sentence vectors from token vectors: plain functions over NumPy arrays.

``hidden`` is [B, T, H] (``out.last_hidden_state``), ``hidden_states`` the L + 1 arrays of
``out.hidden_states`` (embedding output first), ``attention_mask`` the tokenizer's [B, T] of 0/1.
Every function returns [B, H] (``layers(..., combine="concat")``: [B, k·H]), in the input's dtype.

Padding never counts: a sentence gets the same vector alone or inside a padded batch. A row of
``attention_mask`` with no valid token is an error (there is nothing to pool), never zeros or NaN.
"""
from __future__ import annotations

import builtins
from typing import Sequence, Tuple

import numpy as np

POOLS = ("mean", "cls", "max")
COMBINES = ("mean", "concat")


def _check(hidden, attention_mask=None) -> Tuple[np.ndarray, np.ndarray]:
    h = np.asarray(hidden)
    if h.ndim != 3 or h.dtype.kind != "f":
        raise ValueError(f"hidden must be a float array [B, T, H]; got shape {h.shape}, dtype {h.dtype}")
    if attention_mask is None:
        return h, np.ones(h.shape[:2], dtype=bool)
    m = np.asarray(attention_mask)
    if m.shape != h.shape[:2]:
        raise ValueError(f"attention_mask has shape {m.shape}; hidden {h.shape} needs {h.shape[:2]}")
    if m.size and not np.isin(m, (0, 1)).all():
        raise ValueError("attention_mask must contain only 0 and 1")
    m = m.astype(bool)
    empty = np.flatnonzero(~m.any(axis=1))
    if empty.size:
        raise ValueError(f"attention_mask row {int(empty[0])} has no valid token: there is nothing to pool")
    return h, m


def cls(hidden):  # [B, T, H] -> [B, H]
    """The first token's vector ([CLS] for BERT), before the pooler's dense + tanh."""
    h, _ = _check(hidden)
    return h[:, 0].copy()


def mean(hidden, attention_mask):  # [B, T, H], [B, T] -> [B, H]
    """The mean over valid tokens (sentence-transformers' mean pooling)."""
    h, m = _check(hidden, attention_mask)
    w = m.astype(h.dtype)[:, :, None]  # [B, T, 1]
    return (h * w).sum(axis=1) / w.sum(axis=1)


def max(hidden, attention_mask):  # [B, T, H], [B, T] -> [B, H]  # noqa: A001 (the strategy's name)
    """The element-wise max over valid tokens."""
    h, m = _check(hidden, attention_mask)
    return np.where(m[:, :, None], h, -np.inf).max(axis=1).astype(h.dtype)


def first_last_avg(hidden_states: Sequence, attention_mask):  # L + 1 of [B, T, H], [B, T] -> [B, H]
    """The mean-pooled average of the first layer's output and the last layer's (BERT-flow's and
    SimCSE's "first-last avg"). The first layer is ``hidden_states[1]``, the first transformer
    layer; some code uses the embedding output ``hidden_states[0]`` instead: that is
    ``layers(hidden_states, mask, which=(0, -1))``."""
    return layers(hidden_states, attention_mask, which=(1, -1), pool="mean", combine="mean")


def layers(hidden_states: Sequence, attention_mask, which=(-1, -2, -3, -4), pool: str = "mean",
           combine: str = "mean"):
    """Pool each layer of ``which`` (indices into ``hidden_states``) with ``pool`` and combine the
    vectors: their mean ([B, H]) or their concatenation in ``which`` order ([B, len(which)·H])."""
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r}; expected one of {POOLS}")
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r}; expected one of {COMBINES}")
    if hidden_states is None or isinstance(hidden_states, np.ndarray) and hidden_states.ndim == 3:
        raise ValueError("hidden_states must be the sequence of every layer's [B, T, H] "
                         "(out.hidden_states, with output_hidden_states=True)")
    n = len(hidden_states)
    which = tuple(which)
    if not which:
        raise ValueError("which must name at least one layer")
    for i in which:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) or not -n <= i < n:
            raise ValueError(f"which contains {i!r}; hidden_states has {n} entries (indices {-n} .. {n - 1})")
    fn = {"mean": mean, "max": max, "cls": lambda h, m: cls(_check(h, m)[0])}[pool]
    vecs = [fn(hidden_states[i], attention_mask) for i in which]
    if combine == "concat":
        return np.concatenate(vecs, axis=-1)
    return builtins.sum(vecs[1:], vecs[0]) / len(vecs)


def normalize(x, eps: float = 1e-12):  # [..., H] -> [..., H]
    """Each vector divided by its L2 norm (at least ``eps``, as torch's F.normalize): unit length,
    so a dot product is a cosine similarity."""
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise ValueError(f"normalize needs a float array; got dtype {x.dtype}")
    norm = np.sqrt((x.astype(np.float64) ** 2).sum(axis=-1, keepdims=True))
    return (x / np.maximum(norm, eps)).astype(x.dtype)
