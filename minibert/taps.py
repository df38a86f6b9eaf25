"""Taps: the forward pass's named intermediates, kept (``capture=``) or replaced (``patch=``) only
when asked for.

The names are the module paths transformers uses (``encoder.layer.3.attention.self.probs``);
minibert.model's functions hand each intermediate to a :class:`Taps` under its name and go on
with what it returns, as a torch forward hook that returns a replacement.
"""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Dict, List, Optional

import numpy as np

TAP_SUFFIXES = (  # per layer, under encoder.layer.{i}.
    "attention.self.query", "attention.self.key", "attention.self.value", "attention.self.scores",
    "attention.self.probs", "attention.self.context", "attention.output", "intermediate", "output",
)


def tap_names(n_layers: int, pooler: bool = True) -> List[str]:
    """Every tap of a model, in the order the forward pass reaches them."""
    names = ["embeddings"]
    for i in range(n_layers):
        names += [f"encoder.layer.{i}.{s}" for s in TAP_SUFFIXES]
    return names + (["pooler.dense"] if pooler else [])


class Taps:
    """The intermediates to keep or replace: ``tap(name, array)`` returns the array the pass goes on
    with (a patch's replacement, or the array itself) and keeps it if ``name`` was asked for.
    Passed as ``tap=None`` (the default) the forward functions skip every tap with one truth test,
    so capturing and patching cost nothing when not asked for."""

    def __init__(self, names, patches=None):
        self.names = frozenset(names)
        self.patches: Dict[str, object] = dict(patches or {})
        self.captured: Dict[str, np.ndarray] = {}
        self.batch: Dict[str, object] = {}  # valid [B, T] and n_head, set by the pass (see _replacement)

    def wants(self, name: str) -> bool:
        return name in self.names or name in self.patches

    def patched(self, name: str) -> bool:
        return name in self.patches

    def __call__(self, name: str, value):
        if name in self.patches:
            value = _replacement(name, value, self.patches[name], self.batch)
        if name in self.names:
            self.captured[name] = value
        return value

    def __bool__(self):
        return bool(self.names or self.patches)


def _replacement(name, value, patch, batch):
    """The array a patch puts in place of ``value`` at tap ``name``: a fresh C-contiguous array of
    value's shape and dtype (the pass may write into it; the caller's array stays as it was).
    A function is called ``f(value, name)``; minibert's own patches that need the batch (they set
    ``wants_batch = True``, e.g. interventions.ablate_heads' mean) get ``valid=`` [B, T] and
    ``n_head=`` too."""
    if callable(patch):
        extra = batch if getattr(patch, "wants_batch", False) else {}
        given = patch(_read_only(value), name, **extra)
    else:
        given = patch
    try:
        arr = np.asarray(given)
    except (TypeError, ValueError) as e:
        raise TypeError(f"patch for {name!r} gave {type(given).__name__}, not an array: {e}") from None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise TypeError(f"patch for {name!r} gave an array of dtype {arr.dtype}; expected numbers")
    if callable(patch):
        if arr.shape != value.shape:
            raise ValueError(f"patch function for {name!r} returned shape {arr.shape}; expected the tap's shape "
                             f"{value.shape}")
    else:
        try:
            arr = np.broadcast_to(arr, value.shape)
        except ValueError:
            raise ValueError(f"patch for {name!r}: an array of shape {arr.shape} does not broadcast to the tap's "
                             f"shape {value.shape}") from None
    return np.array(arr, dtype=value.dtype, order="C", copy=True)


def _read_only(a):
    v = a.view()
    v.flags.writeable = False
    return v


def _patterns(arg, what):  # a string or an iterable of strings -> list
    patterns = [arg] if isinstance(arg, str) else arg
    try:
        patterns = list(patterns)
    except TypeError:
        raise TypeError(f"{what} must be a tap name, a glob pattern or a list of them; got {arg!r}") from None
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"{what} entries must be strings (tap names or glob patterns); got {pat!r}")
    return patterns


def _matches(pat, names, what):
    hits = [n for n in names if fnmatchcase(n, pat)]
    if not hits:
        raise ValueError(f"{what} pattern {pat!r} matches no tap; model.tap_names() lists all "
                         f"{len(names)}, e.g. {names[1]!r}, 'encoder.layer.*.attention.self.probs'")
    return hits


def select(capture, names: List[str], patch=None) -> Optional[Taps]:
    """The :class:`Taps` for ``capture`` (a tap name, a glob pattern or a list of them) and
    ``patch`` (a dict from a tap name or pattern to an array or a function ``f(value, name)``)
    among ``names``; None when both are None. A pattern that matches nothing is an error; so is
    a tap two patterns of ``patch`` both match."""
    if capture is None and patch is None:
        return None
    chosen = set()
    for pat in ([] if capture is None else _patterns(capture, "capture")):
        chosen.update(_matches(pat, names, "capture"))
    patches: Dict[str, object] = {}
    if patch is not None:
        if not isinstance(patch, dict):
            raise TypeError(f"patch must be a dict from tap names or glob patterns to arrays or functions; "
                            f"got {type(patch).__name__}")
        for pat, value in patch.items():
            if not isinstance(pat, str):
                raise TypeError(f"patch keys must be strings (tap names or glob patterns); got {pat!r}")
            if value is None:
                raise TypeError(f"patch for {pat!r} is None; give an array or a function f(value, name)")
            for n in _matches(pat, names, "patch"):
                if n in patches:
                    raise ValueError(f"tap {n!r} is matched by two patch patterns; give it one")
                patches[n] = value
    return Taps(chosen, patches)
