"""``ACT2FN``: transformers' activation table, as NumPy functions (``from transformers.activations
import ACT2FN`` ports with the import changed). Each takes an array and returns ``act(x)`` in its
dtype, by transformers' formulas: "gelu" the exact erf form; "gelu_new", "gelu_pytorch_tanh",
"gelu_fast" the tanh form; "relu"; "silu" / "swish"; "tanh"; "sigmoid"; "linear" the identity.
They are the NumPy references of minibert.kernels (kernels="numpy").
"""
from __future__ import annotations

import numpy as np

from .config import ACTIVATIONS
from .kernels import get


def _unary(fn):
    return lambda x: fn(np.asarray(x))


ACT2FN = {name: _unary(get(op, "numpy")) for name, op in ACTIVATIONS.items()}
ACT2FN.update(tanh=_unary(np.tanh), sigmoid=_unary(lambda x: 1 / (1 + np.exp(-x))), linear=_unary(lambda x: x))
