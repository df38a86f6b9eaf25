"""Taps: the forward pass's named intermediates, kept only when asked for (``capture=``).

The names are the module paths transformers uses (``encoder.layer.3.attention.self.probs``);
minibert.model's functions hand each intermediate to a :class:`Taps` under its name.
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
    """The intermediates to keep, and the ones kept: ``tap(name, array)`` keeps the array if
    ``name`` was asked for. Passed as ``tap=None`` (the default) the forward functions skip every
    tap with one truth test, so capturing costs nothing when not asked for."""

    def __init__(self, names):
        self.names = frozenset(names)
        self.captured: Dict[str, np.ndarray] = {}

    def wants(self, name: str) -> bool:
        return name in self.names

    def __call__(self, name: str, value):
        if name in self.names:
            self.captured[name] = value

    def __bool__(self):
        return bool(self.names)


def select(capture, names: List[str]) -> Optional[Taps]:
    """The :class:`Taps` for ``capture`` (a tap name, a glob pattern or a list of them) among
    ``names``; None for ``capture=None``. A pattern that matches nothing is an error."""
    if capture is None:
        return None
    patterns = [capture] if isinstance(capture, str) else capture
    try:
        patterns = list(patterns)
    except TypeError:
        raise TypeError(f"capture must be a tap name, a glob pattern or a list of them; got {capture!r}") from None
    chosen = set()
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"capture entries must be strings (tap names or glob patterns); got {pat!r}")
        hits = [n for n in names if fnmatchcase(n, pat)]
        if not hits:
            raise ValueError(f"capture pattern {pat!r} matches no tap; model.tap_names() lists all "
                             f"{len(names)}, e.g. {names[1]!r}, 'encoder.layer.*.attention.self.probs'")
        chosen.update(hits)
    return Taps(chosen)
