"""BERT's forward pass as plain functions over NumPy arrays.

Shape glossary: B batch, T tokens, H hidden, nH heads, dH head dim (H / nH), I intermediate,
L layers, V vocabulary, N rows of the encoder's activations: B·T for a dense batch, the number of
valid tokens when a padded batch runs packed (see :class:`Batch`).

This is transformers' BertModel with eager attention, post-LN:
  embeddings: LayerNorm(word + token_type + position)
  each layer: q | k | v = x·Wᵀ + b                            (Q, K and V as one GEMM)
              a = LayerNorm(softmax(q·kᵀ·scale + mask)·v·Wᵀ + b + x)   (per head; scale = 1/√dH)
              LayerNorm(act(a·Wᵀ + b)·Wᵀ + b + a)
  pooler:     tanh(h[:, 0]·Wᵀ + b)

Parameters are nested dicts whose keys are the checkpoint's own names
(``params["encoder"]["layer"][3]["attention"]["self"]["query"]["weight"]``); linear weights keep
the checkpoint's [out, in] layout. A layer's four dense layers run as a :class:`LayerDense`,
callables made from the layer's arrays by :func:`layer_dense` at load and again when a weight is
assigned (minibert.modules), so a pass prepares nothing.

``k`` is the kernel set, ``{op: function}`` from :func:`minibert.kernels.select`: the only
difference between ``kernels="numpy"`` and ``kernels="numba"``. With the default kernels a dense
layer is one kernel: the GEMM on its weight packed once, with the bias and activation, or bias,
residual and LayerNorm, as an epilogue (kernels/dense.py). A writable weight, or another kernel
set, goes through ``k["dense_act"]`` / ``k["dense_layernorm"]`` on the arrays as they are.

Taps: the functions take ``tap`` (a :class:`minibert.taps.Taps`, or None for none) and the
module path ``name`` they run under, hand it their named intermediates and go on with what it
returns (a patch's replacement, or the same array).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, NamedTuple, Optional

import numpy as np

from .kernels import dense as _dense
from .kernels.layer import prepare_layer


def linear(x, weight, bias):  # [..., in], [out, in], [out] -> [..., out]
    # one 2-D GEMM over all tokens (NumPy would loop over the batch for a 3-D x), bias added in place
    y = gemm(x.reshape(-1, x.shape[-1]), weight)  # [N, out]
    y += bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def gemm(x, weight, out=None):  # [N, in], [out, in] -> [N, out]: BLAS sgemm/dgemm, no bias
    # the encoder adds each bias in the pass that follows (activation, LayerNorm): see kernels/
    return np.matmul(x, weight.T, out=out)


def additive_mask(attention_mask, dtype):  # [B, T] of 0/1 -> [B, T] of 0 / finfo.min
    # (1 - mask) * finfo.min as transformers builds it: finite, so a row with no attended key
    # gives a uniform softmax, never NaN.
    return (1 - attention_mask.astype(dtype)) * np.finfo(dtype).min


class Batch:
    """How the rows of the encoder's [N, H] activations map to the caller's [B, T] batch.

    dense: N = B·T, every sequence T rows, ``mask`` the additive [B, T] mask (pad keys get
    finfo.min): transformers' computation, padding positions included.
    packed: only the valid tokens, N = their number; sequence b is rows ``starts[b]:starts[b+1]``
    and attends to exactly those rows, so no mask is needed and no work is spent on padding.
    ``rows`` are the flat positions (b·T + t) of the packed rows, for scattering back to [B, T].
    """

    def __init__(self, B, T, *, mask=None, rows=None, starts=None):
        self.B, self.T, self.mask, self.rows = B, T, mask, rows
        # where each sequence's rows start, and the end: packed as given, dense every T rows
        self.starts = np.arange(B + 1, dtype=np.int64) * T if starts is None else starts

    @classmethod
    def dense(cls, mask):  # mask: additive [B, T]
        return cls(*mask.shape, mask=mask)

    @classmethod
    def packed(cls, valid):  # valid: bool [B, T]
        B, T = valid.shape
        counts = valid.sum(axis=1)
        starts = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(counts, out=starts[1:])
        return cls(B, T, rows=np.flatnonzero(valid.reshape(-1)), starts=starts)

    @property
    def is_packed(self):
        return self.rows is not None

    def unpack(self, x):  # [N, F] -> [B, T, F]: the packed rows in place, zeros at padding
        if not self.is_packed:
            return x.reshape(self.B, self.T, x.shape[-1])
        full = np.zeros((self.B * self.T, x.shape[-1]), dtype=x.dtype)
        full[self.rows] = x
        return full.reshape(self.B, self.T, x.shape[-1])


def embeddings(input_ids, token_type_ids, position_ids, *, word_embeddings, position_embeddings,
               token_type_embeddings, LayerNorm, eps, k, inputs_embeds=None):  # [...] x3 -> [..., H]
    # inputs_embeds [..., H], if given, stand in for the word embeddings (input_ids is then None).
    # np.asarray: the tables are views of the memory-mapped file, and a gather from an np.memmap
    # runs its Python __getitem__ and __array_finalize__ (~10 µs a pass)
    x = np.array(inputs_embeds) if inputs_embeds is not None else np.asarray(word_embeddings["weight"])[input_ids]
    x += np.asarray(token_type_embeddings["weight"])[token_type_ids]
    pos = np.asarray(position_embeddings["weight"])[position_ids]  # [..., H]
    # LayerNorm((word + token_type) + position): transformers' order of adds, the last in the kernel
    return k["layernorm"](x, pos, LayerNorm["weight"], LayerNorm["bias"], eps)


def fuse_qkv(query, key, value):  # -> (weight [3H, H], bias [3H]) as one array each
    """Concatenate Q, K and V once so they run as one GEMM; the caller then points query, key and
    value at row blocks of the result, so the weights stay in memory once."""
    return (np.concatenate([query["weight"], key["weight"], value["weight"]]),
            np.concatenate([query["bias"], key["bias"], value["bias"]]))


# -- dense layers, made once per set of weights ---------------------------------------------------
class LayerDense(NamedTuple):
    """A layer's dense layers as callables (see :func:`layer_dense`)."""
    qkv: Callable               # x [N, H] -> [N, 3H]: q | k | v, biases added
    attention_output: Callable  # (context [N, H], x [N, H]) -> LayerNorm(context·Wᵀ + b + x)
    intermediate: Callable      # a [N, H] -> act(a·Wᵀ + b) [N, I]
    output: Callable            # (h [N, I], a [N, H]) -> LayerNorm(h·Wᵀ + b + a)
    # (x, starts, mask, n_head) -> the layer's output: the four above and the attention kernel in
    # one call, for up to whole.max_rows rows (kernels/layer.py); None: the layer runs op by op
    whole: Optional[Callable] = None


def dense(k, weight, bias, act=None, ln=None):
    """``x -> act(x·Wᵀ + b)``, or with ``ln`` = (ln_weight, ln_bias, eps) ``(x, residual) ->
    LayerNorm(x·Wᵀ + b + residual)``: the default kernels' prepared layer (the weight packed now)
    when it takes ``weight`` (read-only), else ``k``'s op on the arrays as they are, so that an
    assigned writable weight is used as given, in-place edits included."""
    if k.get("dense_act") is _dense.dense_act_numba_packed and k.get("dense_layernorm") is \
            _dense.dense_layernorm_numba_packed:
        prepared = _dense.prepare(weight, bias, act, ln)
        if prepared is not None:
            return prepared
    if ln is None:
        return partial(_dense_act, k["dense_act"], weight, bias, act)
    return partial(_dense_layernorm, k["dense_layernorm"], weight, bias, *ln)


def _dense_act(op, weight, bias, act, x):
    return op(x, weight, bias, act)


def _dense_layernorm(op, weight, bias, ln_weight, ln_bias, eps, x, residual):
    return op(x, weight, bias, residual, ln_weight, ln_bias, eps)


def layer_dense(lp, act, eps, k, fused=None) -> LayerDense:
    """The four dense layers of layer params ``lp``. ``fused``: Q/K/V's concatenated (weight,
    bias) when query, key and value are still its row blocks; None: three GEMMs."""
    s, o, it, ou = lp["attention"]["self"], lp["attention"]["output"], lp["intermediate"]["dense"], lp["output"]
    qkv = dense(k, *fused) if fused is not None else partial(_qkv_unfused, k["gemm"], s["query"], s["key"], s["value"])
    ln1, ln2 = o["LayerNorm"], ou["LayerNorm"]
    parts = (qkv, dense(k, o["dense"]["weight"], o["dense"]["bias"], ln=(ln1["weight"], ln1["bias"], eps)),
             dense(k, it["weight"], it["bias"], act),
             dense(k, ou["dense"]["weight"], ou["dense"]["bias"], ln=(ln2["weight"], ln2["bias"], eps)))
    return LayerDense(*parts, prepare_layer(*parts, k.get("attention")))


def _qkv_unfused(gemm, query, key, value, x):  # [N, H] -> [N, 3H]: three GEMMs into the column blocks
    H = query["weight"].shape[0]
    qkv = np.empty((x.shape[0], 3 * H), dtype=x.dtype)
    for i, p in enumerate((query, key, value)):
        gemm(x, p["weight"], out=qkv[:, i * H:(i + 1) * H])
    qkv += np.concatenate([query["bias"], key["bias"], value["bias"]])
    return qkv


# -- the encoder ------------------------------------------------------------------------------------
def attention(qkv, batch: Batch, n_head, k, keep_probs=False, tap=None, name="", head_mask=None):
    # [N, 3H] -> context [N, H], probs [B, nH, T, T] (keep_probs: dense batch) or None
    # context = softmax(q·kᵀ·scale + mask)·v per head, the heads side by side in [N, H]
    N, H = qkv.shape[0], qkv.shape[1] // 3
    dH = H // n_head
    scale = dH ** -0.5
    if not (keep_probs or tap or head_mask is not None):  # the whole formula in one kernel (kernels/attention.py):
        # packed sequences attend to their own rows only; a dense batch uses its mask rows
        return k["attention"](qkv, batch.starts, n_head, scale, None if batch.is_packed else batch.mask), None
    # each intermediate materialized, handed to the tap (which may replace it): dense batches only
    B, T = batch.B, batch.T
    t = qkv.reshape(B, T, 3, n_head, dH)
    q, kk, v = (t[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B, nH, T, dH] views, no copy
    if tap:
        q, kk, v = (tap(f"{name}.{n}", x) for n, x in (("query", q), ("key", kk), ("value", v)))
    scores = q @ kk.transpose(0, 1, 3, 2)  # [B, nH, T, T]
    if tap and tap.wants(name + ".scores"):  # the one intermediate the softmax kernels never form
        scaled = scores * scores.dtype.type(scale)
        if batch.mask is not None:
            scaled += batch.mask[:, None, None, :]
        scaled = tap(name + ".scores", scaled)
    if tap and tap.patched(name + ".scores"):  # the softmax runs on the patched scores as given
        probs = k["masked_softmax"](scaled, None, 1.0, out=scaled)
    else:
        probs = k["masked_softmax"](scores, batch.mask, scale, out=scores)  # softmax(scores·scale + mask), in place
    if head_mask is not None:  # [nH]: transformers 4's head_mask, on the probabilities
        probs *= head_mask[None, :, None, None]
    if tap:
        probs = tap(name + ".probs", probs)
    context = np.empty((N, H), dtype=qkv.dtype)
    np.matmul(probs, v, out=context.reshape(B, T, n_head, dH).transpose(0, 2, 1, 3))  # straight into [N, H]
    if tap:
        context = tap(name + ".context", context.reshape(B, T, H)).reshape(N, H)
    return context, probs


def self_attention(x, batch: Batch, qkv_dense, n_head, k, keep_probs=False, tap=None, name="", head_mask=None):
    # [N, H] -> context [N, H], probs [B, nH, T, T] or None
    return attention(qkv_dense(x), batch, n_head, k, keep_probs, tap, name, head_mask)  # qkv [N, 3H]: q | k | v


def attention_block(x, batch: Batch, d: LayerDense, n_head, k, keep_probs=False, tap=None, name="", head_mask=None):
    # [N, H] -> [N, H], [B, nH, T, T] or None
    context, probs = self_attention(x, batch, d.qkv, n_head, k, keep_probs, tap, name + ".self", head_mask)
    a = d.attention_output(context, x)  # [N, H]: LayerNorm(context·Wᵀ + b + x)
    if tap:
        a = tap(name + ".output", batch.unpack(a)).reshape(a.shape)
    return a, probs


def layer(x, batch: Batch, d: LayerDense, n_head, k, keep_probs=False, tap=None, name="", head_mask=None):
    # [N, H] -> [N, H], [B, nH, T, T] or None
    if d.whole is not None and x.shape[0] <= d.whole.max_rows and not (keep_probs or tap or head_mask is not None):
        # the steps below in one call, the same kernels in the same order (a few rows' Python counts)
        return d.whole(x, batch.starts, None if batch.is_packed else batch.mask, n_head), None
    a, probs = attention_block(x, batch, d, n_head, k, keep_probs, tap, name + ".attention", head_mask)  # [N, H]
    h = d.intermediate(a)  # [N, I]: act(a·Wᵀ + b)
    if tap:
        h = tap(name + ".intermediate", batch.unpack(h)).reshape(h.shape)
    out = d.output(h, a)  # [N, H]: LayerNorm(h·Wᵀ + b + a)
    if tap:
        out = tap(name + ".output", batch.unpack(out)).reshape(out.shape)
    return out, probs


def pooler(h, pooler_dense, tap=None):  # [B, T, H] -> [B, H]
    pre = pooler_dense(np.ascontiguousarray(h[:, 0]))  # [B, H]: h[:, 0]·Wᵀ + b
    if tap:
        pre = tap("pooler.dense", pre)
    return np.tanh(pre)


# -- task heads (BertForMaskedLM, ...): dropout is the identity at inference ----------------------
def lm_head(h, *, transform, decoder, bias, eps, act, k):  # [..., H] -> [..., V]
    # BertLMPredictionHead: dense + activation + LayerNorm, then the decoder. The decoder's weight
    # is the word embedding matrix and its bias is cls.predictions.bias (`bias` here) when tied,
    # as in most checkpoints; the caller puts whichever applies into `decoder`.
    t = k[act](linear(h, **transform["dense"]))  # [..., H]
    t = k["layernorm"](t, None, transform["LayerNorm"]["weight"], transform["LayerNorm"]["bias"], eps)
    return linear(t, **decoder)  # [..., V]


def bert(params: Dict, layers: List[LayerDense], pooler_dense, input_ids, attention_mask, token_type_ids,
         position_ids, *, n_head: int, eps: float, k: Dict, output_hidden_states: bool = False,
         output_attentions: bool = False, tap=None, skip_padding: bool = False, inputs_embeds=None, head_mask=None):
    """The whole BertModel. ``layers``: each layer's :class:`LayerDense`; ``pooler_dense``: the
    pooler's dense layer, or None for no pooler. Inputs are checked int64 [B, T] arrays
    (``attention_mask`` 0/1 in the compute dtype). Returns a dict of last_hidden_state [B, T, H],
    pooler_output [B, H] or None, hidden_states (L + 1 of [B, T, H]) or None, attentions (L of
    [B, nH, T, T]) or None, and captures ({tap name: array}) or None. ``inputs_embeds`` [B, T, H]
    stand in for the word embeddings of ``input_ids`` (then None), as in transformers.
    ``head_mask``: None or [L, nH] in the compute dtype, multiplying each layer's attention
    probabilities per head (transformers 4's ``head_mask``).

    ``skip_padding=False`` runs the dense batch as transformers does: padding positions hold values
    computed from the pad tokens. ``skip_padding=True``: a batch with padding runs packed (see
    :class:`Batch`) and the outputs hold zeros at padding positions; valid positions and the
    pooler are unchanged. Asking for attentions, captures, patches or a head mask always runs the
    dense batch."""
    dtype = params["embeddings"]["LayerNorm"]["weight"].dtype
    wanted, tap = tap, (tap or None)  # an empty Taps runs like None and still returns {}
    valid = attention_mask != 0  # [B, T]
    B, T = valid.shape
    padded = not valid.all()
    # packed: only the valid tokens run. Not when a pooler reads a padding position 0 (left padding):
    # transformers' pooler_output is computed from that pad token's hidden state
    if skip_padding and padded and not (output_attentions or tap or head_mask is not None) and \
            (pooler_dense is None or valid[:, 0].all()):
        batch = Batch.packed(valid)
        flat = lambda a: None if a is None else a.reshape(-1, *a.shape[2:])[batch.rows]  # noqa: E731  [N, ...]
    else:  # no additive mask at all without padding: adding zeros would change nothing
        batch = Batch(B, T, mask=additive_mask(attention_mask, dtype) if padded else None)
        flat = lambda a: None if a is None else a.reshape(-1, *a.shape[2:])  # noqa: E731  [B·T, ...]
    if tap:
        tap.batch = dict(valid=valid, n_head=n_head)
    x = embeddings(flat(input_ids), flat(token_type_ids), flat(position_ids), **params["embeddings"], eps=eps, k=k,
                   inputs_embeds=flat(inputs_embeds))  # [N, H]
    if tap:
        x = tap("embeddings", batch.unpack(x)).reshape(x.shape)
    # intermediates are kept only when asked for: nothing of a layer outlives the next one otherwise
    hidden: List[np.ndarray] = [batch.unpack(x)] if output_hidden_states else []
    attentions: List[np.ndarray] = []
    for i, d in enumerate(layers):
        x, probs = layer(x, batch, d, n_head, k, output_attentions, tap, f"encoder.layer.{i}",
                         None if head_mask is None else head_mask[i])
        if output_hidden_states:
            hidden.append(batch.unpack(x))
        if output_attentions:
            attentions.append(probs)
    last = hidden[-1] if output_hidden_states else batch.unpack(x)  # [B, T, H]
    pooled = pooler(last, pooler_dense, tap) if pooler_dense is not None else None
    return {
        "last_hidden_state": last,
        "pooler_output": pooled,
        "hidden_states": tuple(hidden) if output_hidden_states else None,
        "attentions": tuple(attentions) if output_attentions else None,
        "captures": wanted.captured if wanted is not None else None,
    }
