"""BERT's forward pass as plain functions over NumPy arrays.

Shape glossary: B batch, T tokens, H hidden, nH heads, dH head dim (H / nH), I intermediate,
L layers, V vocabulary.

Taps: every function takes ``tap`` (a :class:`Taps`, or None for none) and the module path
``name`` it runs under, and hands its named intermediates to ``tap`` (see :func:`tap_names`).

Parameters are nested dicts whose keys are the checkpoint's own names, splatted into the
functions (``layer(x, mask, **params["encoder"]["layer"][3], ...)``), so
``encoder.layer.3.attention.self.query.weight`` is ``params["encoder"]["layer"][3]["attention"]
["self"]["query"]["weight"]``. Linear weights keep the checkpoint's [out, in] layout.

``k`` is the kernel set, ``{op: function}`` from :func:`minibert.kernels.select`: the only
difference between ``kernels="numpy"`` and ``kernels="numba"``. Matrix products go to NumPy's BLAS.

This is transformers' BertModel with eager attention, post-LN:
  embeddings: LayerNorm(word + token_type + position)
  each layer: a = LayerNorm(dense(attention(x)) + x); LayerNorm(dense(act(dense(a))) + a)
  pooler:     tanh(dense(h[:, 0]))
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np


def linear(x, weight, bias):  # [..., in], [out, in], [out] -> [..., out]
    # one 2-D GEMM over all tokens (NumPy would loop over the batch for a 3-D x), bias added in place
    y = x.reshape(-1, x.shape[-1]) @ weight.T  # [N, out]
    y += bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def additive_mask(attention_mask, dtype):  # [B, T] of 0/1 -> [B, T] of 0 / finfo.min
    # (1 - mask) * finfo.min as transformers builds it: finite, so a row with no attended key
    # gives a uniform softmax, never NaN.
    return (1 - attention_mask.astype(dtype)) * np.finfo(dtype).min


def embeddings(input_ids, token_type_ids, position_ids, *, word_embeddings, position_embeddings,
               token_type_embeddings, LayerNorm, eps, k):  # [B, T] x3 -> [B, T, H]
    x = word_embeddings["weight"][input_ids]  # [B, T, H]
    x = x + token_type_embeddings["weight"][token_type_ids]  # same order of adds as transformers
    x = x + position_embeddings["weight"][position_ids]
    return k["layernorm"](x, None, LayerNorm["weight"], LayerNorm["bias"], eps)


def split_heads(x, n_head):  # [B, T, H] -> [B, nH, T, dH]
    B, T, H = x.shape
    return x.reshape(B, T, n_head, H // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):  # [B, nH, T, dH] -> [B, T, H]
    B, nH, T, dH = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, nH * dH)


def self_attention(x, mask, *, query, key, value, n_head, k, tap=None, name=""):
    # [B, T, H], [B, T] -> [B, T, H], [B, nH, T, T]
    q = split_heads(linear(x, **query), n_head)  # [B, nH, T, dH]
    kk = split_heads(linear(x, **key), n_head)  # [B, nH, T, dH]
    v = split_heads(linear(x, **value), n_head)  # [B, nH, T, dH]
    scale = q.shape[-1] ** -0.5
    scores = q @ kk.transpose(0, 1, 3, 2)  # [B, nH, T, T], unscaled: the kernel scales, masks and normalizes
    if tap:
        tap(name + ".query", q)
        tap(name + ".key", kk)
        tap(name + ".value", v)
        if tap.wants(name + ".scores"):  # the one intermediate the fused softmax never materializes
            tap(name + ".scores", scores * scores.dtype.type(scale) + mask[:, None, None, :])
    probs = k["masked_softmax"](scores, mask, scale)  # [B, nH, T, T]
    context = merge_heads(probs @ v)  # [B, T, H]
    if tap:
        tap(name + ".probs", probs)
        tap(name + ".context", context)
    return context, probs


def attention_block(x, mask, *, self, output, n_head, eps, k, tap=None, name=""):
    # [B, T, H] -> [B, T, H], [B, nH, T, T]
    # `self` is the checkpoint's name of the sub-module (attention.self.query...), not an instance
    context, probs = self_attention(x, mask, **self, n_head=n_head, k=k, tap=tap, name=name + ".self")
    y = linear(context, **output["dense"])  # [B, T, H]
    a = k["layernorm"](y, x, output["LayerNorm"]["weight"], output["LayerNorm"]["bias"], eps)  # [B, T, H]
    if tap:
        tap(name + ".output", a)
    return a, probs


def layer(x, mask, *, attention: Dict, intermediate: Dict, output: Dict, n_head, eps, act, k, tap=None, name=""):
    # [B, T, H], [B, T] -> [B, T, H], [B, nH, T, T]
    a, probs = attention_block(x, mask, **attention, n_head=n_head, eps=eps, k=k, tap=tap, name=name + ".attention")
    h = k[act](linear(a, **intermediate["dense"]))  # [B, T, I]
    y = linear(h, **output["dense"])  # [B, T, H]
    out = k["layernorm"](y, a, output["LayerNorm"]["weight"], output["LayerNorm"]["bias"], eps)  # [B, T, H]
    if tap:
        tap(name + ".intermediate", h)
        tap(name + ".output", out)
    return out, probs


def pooler(h, *, dense, tap=None):  # [B, T, H] -> [B, H]
    pre = linear(h[:, 0], **dense)  # [B, H]
    if tap:
        tap("pooler.dense", pre)
    return np.tanh(pre)


# -- taps: named intermediates, kept only when asked for --------------------------------------------
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


# -- task heads (BertForMaskedLM, ...): dropout is the identity at inference ----------------------
def lm_head(h, *, transform, decoder, bias, eps, act, k):  # [..., H] -> [..., V]
    # BertLMPredictionHead: dense + activation + LayerNorm, then the decoder. The decoder's weight
    # is the word embedding matrix and its bias is cls.predictions.bias (`bias` here) when tied,
    # as in most checkpoints; the caller puts whichever applies into `decoder`.
    t = k[act](linear(h, **transform["dense"]))  # [..., H]
    t = k["layernorm"](t, None, transform["LayerNorm"]["weight"], transform["LayerNorm"]["bias"], eps)
    return linear(t, **decoder)  # [..., V]


def bert(params: Dict, input_ids, attention_mask, token_type_ids, position_ids, *, n_head: int, eps: float,
         act: str, k: Dict, output_hidden_states: bool = False, output_attentions: bool = False,
         tap: Optional[Taps] = None):
    """The whole BertModel. Inputs are checked int64 [B, T] arrays (``attention_mask`` 0/1 in the
    compute dtype). Returns a dict of last_hidden_state [B, T, H], pooler_output [B, H] or None,
    hidden_states (L + 1 of [B, T, H]) or None, attentions (L of [B, nH, T, T]) or None, and
    captures ({tap name: array}) or None."""
    dtype = params["embeddings"]["LayerNorm"]["weight"].dtype
    mask = additive_mask(attention_mask, dtype)  # [B, T]
    x = embeddings(input_ids, token_type_ids, position_ids, **params["embeddings"], eps=eps, k=k)  # [B, T, H]
    wanted, tap = tap, (tap or None)  # an empty Taps runs like None and still returns {}
    if tap:
        tap("embeddings", x)
    # intermediates are kept only when asked for: nothing of a layer outlives the next one otherwise
    hidden: List[np.ndarray] = [x] if output_hidden_states else []
    attentions: List[np.ndarray] = []
    for i, lp in enumerate(params["encoder"]["layer"]):
        x, probs = layer(x, mask, **lp, n_head=n_head, eps=eps, act=act, k=k, tap=tap, name=f"encoder.layer.{i}")
        if output_hidden_states:
            hidden.append(x)
        if output_attentions:
            attentions.append(probs)
    pooled: Optional[np.ndarray] = pooler(x, **params["pooler"], tap=tap) if params.get("pooler") else None
    return {
        "last_hidden_state": x,
        "pooler_output": pooled,
        "hidden_states": tuple(hidden) if output_hidden_states else None,
        "attentions": tuple(attentions) if output_attentions else None,
        "captures": wanted.captured if wanted is not None else None,
    }


# -- flat checkpoint names <-> nested params --------------------------------------------------------
def nest(flat: Dict[str, np.ndarray]) -> Dict:
    """``{"encoder.layer.0.output.dense.weight": a}`` -> ``{"encoder": {"layer": [{"output": ...}]}}``.

    The arrays are not copied. Numbered levels become lists.
    """
    root: Dict = {}
    for name, arr in flat.items():
        node = root
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = arr

    def listify(node):
        if not isinstance(node, dict):
            return node
        if node and all(key.isdigit() for key in node):
            return [listify(node[str(i)]) for i in range(len(node))]
        return {key: listify(v) for key, v in node.items()}

    return listify(root)


def flatten(params: Dict, prefix: str = "") -> Dict[str, np.ndarray]:
    """The inverse of :func:`nest`."""
    flat: Dict[str, np.ndarray] = {}
    items = enumerate(params) if isinstance(params, list) else params.items()
    for key, v in items:
        name = f"{prefix}{key}"
        if isinstance(v, (dict, list)):
            flat.update(flatten(v, name + "."))
        else:
            flat[name] = v
    return flat
