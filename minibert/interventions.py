"""Interventions built on ``patch=``: head ablation and activation patching.

``model(**x, patch=ablate_heads({3: [1, 5]}))`` removes heads 1 and 5 of layer 3;
``activation_patching(model, clean, corrupted, metric)`` asks which layer's output, at which
position, carries the difference between two inputs (Meng et al. 2022, "Locating and Editing
Factual Associations in GPT"; Heimersheim & Nanda 2024, "How to use and interpret activation
patching"), with the patched runs batched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Sequence

import numpy as np

from .outputs import ModelOutput
from .taps import select as _select

__all__ = ["ablate_heads", "activation_patching", "PatchingResult"]


def _heads_arg(heads) -> Dict[int, List[int]]:
    if not isinstance(heads, Mapping) or not heads:
        raise TypeError(f"heads must be a non-empty dict {{layer: [head, ...]}}; got {heads!r}")
    out = {}
    for layer, hs in heads.items():
        if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)) or layer < 0:
            raise ValueError(f"heads: layer {layer!r} is not a non-negative integer")
        hs = [hs] if isinstance(hs, (int, np.integer)) else list(hs)
        bad = [h for h in hs if isinstance(h, (bool, np.bool_)) or not isinstance(h, (int, np.integer)) or h < 0]
        if bad or not hs:
            raise ValueError(f"heads[{layer}]: expected a non-empty list of non-negative head indices; got {hs!r}")
        out[int(layer)] = sorted({int(h) for h in hs})
    return out


def _check_heads(layer, heads, n_head):
    if heads[-1] >= n_head:
        raise ValueError(f"ablate_heads: layer {layer} has heads 0..{n_head - 1}; got head {heads[-1]}")


class _ZeroHeads:
    """probs [B, nH, T, T] with the heads' rows zeroed: their context is 0."""
    wants_batch = True

    def __init__(self, layer, heads):
        self.layer, self.heads = layer, heads

    def __call__(self, probs, name, valid=None, n_head=None):
        _check_heads(self.layer, self.heads, probs.shape[1])
        out = probs.copy()
        out[:, self.heads] = 0
        return out

    def __repr__(self):
        return f"ablate_heads(layer {self.layer}, heads {self.heads}, zero)"


class _MeanHeads:
    """context [B, T, H] with each head's dH columns set, at every position, to their mean over the
    sequence's valid positions."""
    wants_batch = True

    def __init__(self, layer, heads):
        self.layer, self.heads = layer, heads

    def __call__(self, context, name, valid=None, n_head=None):
        _check_heads(self.layer, self.heads, n_head)
        B, T, H = context.shape
        dH = H // n_head
        w = valid.astype(context.dtype)  # [B, T]
        count = np.maximum(w.sum(axis=1), 1)[:, None]  # [B, 1]
        out = context.copy()
        for h in self.heads:
            cols = slice(h * dH, (h + 1) * dH)
            mean = np.einsum("bt,btd->bd", w, context[:, :, cols]) / count  # [B, dH]
            out[:, :, cols] = mean[:, None, :]
        return out

    def __repr__(self):
        return f"ablate_heads(layer {self.layer}, heads {self.heads}, mean)"


def ablate_heads(heads: Mapping[int, Sequence[int]], how: str = "zero") -> Dict[str, Callable]:
    """A ``patch=`` dict that removes attention heads: ``heads`` maps a layer to the heads to remove.

    ``how="zero"``: the heads' attention probabilities × 0, so they add nothing to the context
    (what transformers 4's ``head_mask`` did with a 0). ``how="mean"``: each head's context
    replaced, at every position, by its mean over the sequence's valid positions (mean ablation:
    the head's average contribution stays, its dependence on the input goes). Merge it with other
    patches as a dict: ``patch={**ablate_heads({3: [1]}), "embeddings": f}``."""
    heads = _heads_arg(heads)
    if how == "zero":
        return {f"encoder.layer.{l}.attention.self.probs": _ZeroHeads(l, hs) for l, hs in heads.items()}
    if how == "mean":
        return {f"encoder.layer.{l}.attention.self.context": _MeanHeads(l, hs) for l, hs in heads.items()}
    raise ValueError(f"how={how!r}; expected 'zero' or 'mean'")


# -- activation patching ---------------------------------------------------------------------------
@dataclass
class PatchingResult:
    """``grid`` [n_taps, T] (per position) or [n_taps]: the metric of the corrupted run with that tap
    (at that position) set to the clean run's value; ``clean`` and ``corrupted``: the metric
    unpatched; ``taps``: the tap names of the grid's rows; ``calls``: model calls made."""
    grid: np.ndarray
    taps: List[str]
    clean: float
    corrupted: float
    per_position: bool
    calls: int

    def normalized(self) -> np.ndarray:
        """(grid − corrupted) / (clean − corrupted): 1 where the patch restores the clean metric."""
        span = self.clean - self.corrupted
        if span == 0:
            raise ValueError("the clean and corrupted metrics are equal; nothing to normalize by")
        return (self.grid - self.corrupted) / span


_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def _inputs(name, x) -> Dict[str, np.ndarray]:
    if not hasattr(x, "keys") or "input_ids" not in x:
        raise TypeError(f"{name} must be a tokenizer output (a dict with input_ids, ...); got {type(x).__name__}")
    out = {k: np.asarray(x[k]) for k in _INPUTS if k in x and x[k] is not None}
    ids = out["input_ids"]
    if ids.ndim == 1:
        out = {k: v[None] for k, v in out.items()}
    return out


def _position_axis(tap: str):  # where a tap's values have the token position, None for pooler.dense
    if tap == "pooler.dense":
        return None
    kind = tap.rsplit(".", 1)[-1]
    return 2 if kind in ("query", "key", "value", "scores", "probs") else 1


def _metric(metric, out) -> float:
    m = metric(out)
    if np.ndim(m) != 0:
        raise TypeError(f"metric must return one number; it returned shape {np.shape(m)}")
    try:
        return float(m)
    except (TypeError, ValueError):
        raise TypeError(f"metric must return a number; it returned {type(m).__name__}") from None


def rows(out: ModelOutput, lo: int, hi: int) -> ModelOutput:
    """Sequences ``lo:hi`` of a batched output: every array field sliced on its batch axis."""
    def cut(v):
        if isinstance(v, np.ndarray) and v.ndim:
            return v[lo:hi]
        if isinstance(v, tuple):
            return tuple(cut(a) for a in v)
        if isinstance(v, dict):
            return {k: cut(a) for k, a in v.items()}
        return v
    return type(out)(**{f: cut(getattr(out, f)) for f in out._fields if f != "loss"})


def per_call(batch_size, B: int) -> int:
    """How many copies of a B-sequence input one model call takes: as many as fit in ``batch_size``
    sequences, at least one."""
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    return max(1, int(batch_size) // B)


def calls(cells: list, inputs: Dict[str, np.ndarray], n: int):
    """``(start, chunk, batch)`` per model call: ``n`` cells at a time and the inputs repeated once
    per cell (cell ``slot`` of the chunk is rows ``slot·B:(slot+1)·B`` of the batch)."""
    for start in range(0, len(cells), n):
        chunk = cells[start:start + n]
        yield start, chunk, {k: np.concatenate([v] * len(chunk)) for k, v in inputs.items()}


class _SetClean:
    """Rows of the batched call that get the clean value of one tap (at one position each, or all)."""

    def __init__(self, clean_value, axis, cells, B):
        self.clean, self.axis, self.cells, self.B = clean_value, axis, cells, B  # cells: [(slot, pos or None)]

    def __call__(self, value, name):
        out = value.copy()
        for slot, pos in self.cells:
            r = slice(slot * self.B, (slot + 1) * self.B)
            if pos is None:
                out[r] = self.clean
            else:
                idx = (r,) + (slice(None),) * (self.axis - 1) + (pos,)
                src = (slice(None),) * self.axis + (pos,)
                out[idx] = self.clean[src]
        return out


def activation_patching(model, clean, corrupted, metric: Callable[[ModelOutput], float],
                        taps="encoder.layer.*.output", per_position: bool = True,
                        batch_size: int = 64) -> PatchingResult:
    """For each tap matching ``taps`` (and each position, ``per_position``): ``metric`` of the
    ``corrupted`` run with that tap's value (at that position) replaced by the ``clean`` run's.

    ``taps`` selects as ``capture=`` does: the default glob matches each layer's ``output`` and its
    ``attention.output``; pass a list of names for the layer outputs alone.
    ``clean``, ``corrupted``: tokenizer outputs of the same shape. ``metric(out) -> float`` takes the
    model's output for the batch (e.g. a logit difference). The patched runs go through the model
    as batches of up to ``batch_size`` sequences, several cells in each; each cell's output is cut
    out of its batch (:func:`rows`) before ``metric`` sees it."""
    c, x = _inputs("clean", clean), _inputs("corrupted", corrupted)
    if set(c) != set(x) or any(c[k].shape != x[k].shape for k in c):
        raise ValueError("clean and corrupted must hold the same inputs of the same shapes; got "
                         f"{ {k: v.shape for k, v in c.items()} } and { {k: v.shape for k, v in x.items()} }")
    B, T = c["input_ids"].shape
    n_call = per_call(batch_size, B)
    names = [n for n in model.tap_names() if n in _select(taps, model.tap_names()).names]
    if per_position and "pooler.dense" in names:
        raise ValueError("pooler.dense has no position axis; leave it out of taps or use per_position=False")
    # both unpatched runs capture, so they take the patched runs' route (attention materialized),
    # and a cell whose patch changes nothing gives the corrupted metric bit for bit
    clean_out = model(**c, capture=names)
    clean_values, clean_m = clean_out.captures, _metric(metric, clean_out)
    corrupted_m = _metric(metric, model(**x, capture=names))
    made = 2
    cells = [(n, t) for n in names for t in (range(T) if per_position else [None])]
    values = np.empty(len(cells))
    for start, chunk, batch in calls(cells, x, n_call):
        by_tap: Dict[str, list] = {}
        for slot, (n, t) in enumerate(chunk):
            by_tap.setdefault(n, []).append((slot, t))
        patch = {n: _SetClean(clean_values[n], _position_axis(n), cs, B) for n, cs in by_tap.items()}
        out = model(**batch, patch=patch)
        made += 1
        for slot in range(len(chunk)):
            values[start + slot] = _metric(metric, rows(out, slot * B, (slot + 1) * B))
    grid = values.reshape(len(names), T) if per_position else values
    return PatchingResult(grid=grid, taps=names, clean=clean_m, corrupted=corrupted_m,
                          per_position=per_position, calls=made)
