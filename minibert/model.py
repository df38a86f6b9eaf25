"""BERT's forward pass as plain functions over NumPy arrays.

Shape glossary: B batch, T tokens, H hidden, nH heads, dH head dim (H / nH), I intermediate,
L layers, V vocabulary.

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
    return x @ weight.T + bias


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


def self_attention(x, mask, *, query, key, value, n_head, k):  # [B, T, H], [B, T] -> [B, T, H], [B, nH, T, T]
    q = split_heads(linear(x, **query), n_head)  # [B, nH, T, dH]
    kk = split_heads(linear(x, **key), n_head)  # [B, nH, T, dH]
    v = split_heads(linear(x, **value), n_head)  # [B, nH, T, dH]
    scale = q.shape[-1] ** -0.5
    probs = k["masked_softmax"](q @ kk.transpose(0, 1, 3, 2), mask, scale)  # [B, nH, T, T]
    return merge_heads(probs @ v), probs  # [B, T, H], [B, nH, T, T]


def attention_block(x, mask, *, self, output, n_head, eps, k):  # [B, T, H] -> [B, T, H], [B, nH, T, T]
    # `self` is the checkpoint's name of the sub-module (attention.self.query...), not an instance
    context, probs = self_attention(x, mask, **self, n_head=n_head, k=k)
    y = linear(context, **output["dense"])  # [B, T, H]
    return k["layernorm"](y, x, output["LayerNorm"]["weight"], output["LayerNorm"]["bias"], eps), probs


def layer(x, mask, *, attention: Dict, intermediate: Dict, output: Dict, n_head, eps, act, k):
    # [B, T, H], [B, T] -> [B, T, H], [B, nH, T, T]
    a, probs = attention_block(x, mask, **attention, n_head=n_head, eps=eps, k=k)
    h = k[act](linear(a, **intermediate["dense"]))  # [B, T, I]
    y = linear(h, **output["dense"])  # [B, T, H]
    return k["layernorm"](y, a, output["LayerNorm"]["weight"], output["LayerNorm"]["bias"], eps), probs


def pooler(h, *, dense):  # [B, T, H] -> [B, H]
    return np.tanh(linear(h[:, 0], **dense))


# -- task heads (BertForMaskedLM, ...): dropout is the identity at inference ----------------------
def lm_head(h, *, transform, decoder, bias, eps, act, k):  # [..., H] -> [..., V]
    # BertLMPredictionHead: dense + activation + LayerNorm, then the decoder. The decoder's weight
    # is the word embedding matrix and its bias is cls.predictions.bias (`bias` here) when tied,
    # as in most checkpoints; the caller puts whichever applies into `decoder`.
    t = k[act](linear(h, **transform["dense"]))  # [..., H]
    t = k["layernorm"](t, None, transform["LayerNorm"]["weight"], transform["LayerNorm"]["bias"], eps)
    return linear(t, **decoder)  # [..., V]


def bert(params: Dict, input_ids, attention_mask, token_type_ids, position_ids, *, n_head: int, eps: float,
         act: str, k: Dict, output_hidden_states: bool = False, output_attentions: bool = False):
    """The whole BertModel. Inputs are checked int64 [B, T] arrays (``attention_mask`` 0/1 in the
    compute dtype). Returns a dict of last_hidden_state [B, T, H], pooler_output [B, H] or None,
    hidden_states (L + 1 of [B, T, H]) or None, attentions (L of [B, nH, T, T]) or None."""
    dtype = params["embeddings"]["LayerNorm"]["weight"].dtype
    mask = additive_mask(attention_mask, dtype)  # [B, T]
    x = embeddings(input_ids, token_type_ids, position_ids, **params["embeddings"], eps=eps, k=k)  # [B, T, H]
    # intermediates are kept only when asked for: nothing of a layer outlives the next one otherwise
    hidden: List[np.ndarray] = [x] if output_hidden_states else []
    attentions: List[np.ndarray] = []
    for lp in params["encoder"]["layer"]:
        x, probs = layer(x, mask, **lp, n_head=n_head, eps=eps, act=act, k=k)
        if output_hidden_states:
            hidden.append(x)
        if output_attentions:
            attentions.append(probs)
    pooled: Optional[np.ndarray] = pooler(x, **params["pooler"]) if params.get("pooler") else None
    return {
        "last_hidden_state": x,
        "pooler_output": pooled,
        "hidden_states": tuple(hidden) if output_hidden_states else None,
        "attentions": tuple(attentions) if output_attentions else None,
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
