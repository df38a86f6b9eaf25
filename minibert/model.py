"""BERT's forward pass as plain functions over NumPy arrays.

Shape glossary: B batch, T tokens, H hidden, nH heads, dH head dim (H / nH), I intermediate,
L layers, V vocabulary, N rows of the encoder's activations: B·T for a dense batch, the number of
valid tokens when a padded batch runs packed (see :class:`Batch`).

Taps: every function takes ``tap`` (a :class:`Taps`, or None for none) and the module path
``name`` it runs under, and hands its named intermediates to ``tap`` (see :func:`tap_names`).

Parameters are nested dicts whose keys are the checkpoint's own names, splatted into the
functions (``layer(x, mask, **params["encoder"]["layer"][3], ...)``), so
``encoder.layer.3.attention.self.query.weight`` is ``params["encoder"]["layer"][3]["attention"]
["self"]["query"]["weight"]``. Linear weights keep the checkpoint's [out, in] layout.

``k`` is the kernel set, ``{op: function}`` from :func:`minibert.kernels.select`: the only
difference between ``kernels="numpy"`` and ``kernels="numba"``. The encoder's dense layers and the
pooler call ``k["dense_act"]`` (Q/K/V, the intermediate layer) and ``k["dense_layernorm"]`` (the
two output layers): the GEMM with its bias and what follows it in one kernel (kernels/dense.py)
on a copy of each read-only weight packed once into panels (kernels/gemm.py); a writable weight
goes through ``k["gemm"]`` (BLAS, or for a few rows a Numba kernel that reads it in place) and
the activation or LayerNorm kernel. The attention kernel does the per-head products
(kernels/attention.py), and the task heads' layers go to NumPy's BLAS. In the plain case (no
taps, no attentions) BertModel runs each layer from a plan, :func:`layer_planned`: the same
kernels with their arguments prepared once (see :func:`planned`).

This is transformers' BertModel with eager attention, post-LN:
  embeddings: LayerNorm(word + token_type + position)
  each layer: a = LayerNorm(dense(attention(x)) + x); LayerNorm(dense(act(dense(a))) + a)
  pooler:     tanh(dense(h[:, 0]))
"""
from __future__ import annotations

import weakref
from operator import is_
from typing import Dict, List, Optional

import numpy as np

from .kernels import dense as _dense


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
               token_type_embeddings, LayerNorm, eps, k):  # [...] x3 -> [..., H]
    # np.asarray: the tables are views of the memory-mapped file, and a gather from an np.memmap
    # runs its Python __getitem__ and __array_finalize__ (~10 µs a pass)
    x = np.asarray(word_embeddings["weight"])[input_ids]  # [..., H]
    x += np.asarray(token_type_embeddings["weight"])[token_type_ids]
    pos = np.asarray(position_embeddings["weight"])[position_ids]  # [..., H]
    # LayerNorm((word + token_type) + position): transformers' order of adds, the last in the kernel
    return k["layernorm"](x, pos, LayerNorm["weight"], LayerNorm["bias"], eps)


def split_heads(x, n_head):  # [B, T, H] -> [B, nH, T, dH]
    B, T, H = x.shape
    return x.reshape(B, T, n_head, H // n_head).transpose(0, 2, 1, 3)


def fuse_qkv(query, key, value):  # -> (weight [3H, H], bias [3H]) as one array each
    """Concatenate Q, K and V once so they run as one GEMM; the caller then points query, key and
    value at row blocks of the result (see :func:`fused_qkv`), so the weights stay in memory once."""
    return (np.concatenate([query["weight"], key["weight"], value["weight"]]),
            np.concatenate([query["bias"], key["bias"], value["bias"]]))


def _blocks_of(parts):  # the [3H, ...] array whose consecutive row blocks the three parts are, or None
    base = parts[0].base
    if base is None or base.shape[0] != sum(p.shape[0] for p in parts) or base.shape[1:] != parts[0].shape[1:]:
        return None
    addr = base.__array_interface__["data"][0]
    for p in parts:
        if p.base is not base or p.__array_interface__["data"][0] != addr or not p.flags.c_contiguous:
            return None
        addr += p.nbytes
    return base


def fused_qkv(query, key, value):  # -> (weight [3H, H], bias [3H]) or None
    """The fused Q/K/V weight and bias when query, key and value are still row blocks of them (as
    BertModel sets up at load); None after one was replaced, e.g. ``...query.weight = w``.

    The answer depends only on which six arrays the dicts hold (an array's base, offset and
    layout never change), so it is kept per set of arrays: the check took ~23 µs a layer (two
    ``_blocks_of``, mostly ``__array_interface__``; cProfile), ~4 % of a MiniLM (1, 16) pass."""
    parts = (query["weight"], key["weight"], value["weight"], query["bias"], key["bias"], value["bias"])
    ids = tuple(map(id, parts))
    hit = _FUSED.get(ids)
    if hit is not None and all(ref() is p for ref, p in zip(hit[0], parts)):
        return hit[1]
    w, b = _blocks_of(parts[:3]), _blocks_of(parts[3:])
    found = (w, b) if w is not None and b is not None else None
    forget = lambda _, ids=ids: _FUSED.pop(ids, None)  # noqa: E731  (an id is reused once its array is gone)
    _FUSED[ids] = (tuple(weakref.ref(p, forget) for p in parts), found)
    return found


_FUSED: Dict = {}  # ids of query/key/value weight and bias -> (weakrefs to them, fused_qkv's answer)


def project_qkv(x, query, key, value, k):  # [N, H] -> [N, 3H]: q | k | v, biases added
    fused = fused_qkv(query, key, value)
    if fused is not None:
        return k["dense_act"](x, *fused)  # one GEMM, the bias added to each tile as it is written
    gemm = k["gemm"]
    H = query["weight"].shape[0]
    qkv = np.empty((x.shape[0], 3 * H), dtype=x.dtype)
    for i, p in enumerate((query, key, value)):  # three GEMMs writing straight into the column blocks
        gemm(x, p["weight"], out=qkv[:, i * H:(i + 1) * H])
    qkv += np.concatenate([query["bias"], key["bias"], value["bias"]])
    return qkv


def attention(qkv, batch: Batch, n_head, k, keep_probs=False):
    # [N, 3H] -> context [N, H], probs [B, nH, T, T] (dense batch and keep_probs) or None
    N, H = qkv.shape[0], qkv.shape[1] // 3
    dH = H // n_head
    scale = dH ** -0.5
    if not keep_probs:  # the attention kernel, one sequence at a time (kernels/attention.py):
        # packed sequences attend to their own rows only; a dense batch uses its mask rows
        return k["attention"](qkv, batch.starts, n_head, scale, None if batch.is_packed else batch.mask), None
    # attentions or taps asked for: the whole dense batch at once, the probabilities kept
    B, T = batch.B, batch.T
    t = qkv.reshape(B, T, 3, n_head, dH)
    q, kk, v = (t[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B, nH, T, dH] views, no copy
    scores = q @ kk.transpose(0, 1, 3, 2)  # [B, nH, T, T]
    probs = k["masked_softmax"](scores, batch.mask, scale, out=scores)  # normalized in place
    context = np.empty((N, H), dtype=qkv.dtype)
    # P·V written straight into the [N, H] layout: no merge-heads copy
    np.matmul(probs, v, out=context.reshape(B, T, n_head, dH).transpose(0, 2, 1, 3))
    return context, probs


def self_attention(x, batch: Batch, *, query, key, value, n_head, k, keep_probs=False, tap=None, name=""):
    # [N, H] -> [N, H], [B, nH, T, T] or None
    qkv = project_qkv(x, query, key, value, k)  # [N, 3H]
    context, probs = attention(qkv, batch, n_head, k, keep_probs=keep_probs or bool(tap))
    if tap:  # taps run on dense batches only (see bert)
        B, T, H = batch.B, batch.T, x.shape[-1]
        q, kk, v = (split_heads(qkv[:, i * H:(i + 1) * H].reshape(B, T, H), n_head) for i in range(3))
        tap(name + ".query", q)  # [B, nH, T, dH]
        tap(name + ".key", kk)
        tap(name + ".value", v)
        if tap.wants(name + ".scores"):  # the one intermediate the fused softmax never materializes
            scale = q.dtype.type(q.shape[-1] ** -0.5)
            scores = (q @ kk.transpose(0, 1, 3, 2)) * scale
            tap(name + ".scores", scores if batch.mask is None else scores + batch.mask[:, None, None, :])
        tap(name + ".probs", probs)
        tap(name + ".context", context.reshape(B, T, H))
    return context, probs


def attention_block(x, batch: Batch, *, self, output, n_head, eps, k, keep_probs=False, tap=None, name=""):
    # [N, H] -> [N, H], [B, nH, T, T] or None
    # `self` is the checkpoint's name of the sub-module (attention.self.query...), not an instance
    context, probs = self_attention(x, batch, **self, n_head=n_head, k=k, keep_probs=keep_probs, tap=tap,
                                    name=name + ".self")
    dense, ln = output["dense"], output["LayerNorm"]
    # LayerNorm(context·Wᵀ + b + x) in one kernel: the GEMM normalizes each row block it finishes
    a = k["dense_layernorm"](context, dense["weight"], dense["bias"], x, ln["weight"], ln["bias"], eps)  # [N, H]
    if tap:
        tap(name + ".output", batch.unpack(a))
    return a, probs


def layer(x, batch: Batch, *, attention: Dict, intermediate: Dict, output: Dict, n_head, eps, act, k,
          keep_probs=False, tap=None, name=""):
    # [N, H] -> [N, H], [B, nH, T, T] or None
    a, probs = attention_block(x, batch, **attention, n_head=n_head, eps=eps, k=k, keep_probs=keep_probs, tap=tap,
                               name=name + ".attention")
    inter, dense, ln = intermediate["dense"], output["dense"], output["LayerNorm"]
    h = k["dense_act"](a, inter["weight"], inter["bias"], act)  # [N, I]: act(a·Wᵀ + b)
    out = k["dense_layernorm"](h, dense["weight"], dense["bias"], a, ln["weight"], ln["bias"], eps)  # [N, H]
    if tap:
        tap(name + ".intermediate", batch.unpack(h))
        tap(name + ".output", batch.unpack(out))
    return out, probs


# -- layer plans: the plain case without the per-call lookups -----------------------------------------
def _sources(lp):  # the arrays a layer plan is made from, in a fixed order
    s, o, it, ou = lp["attention"]["self"], lp["attention"]["output"], lp["intermediate"]["dense"], lp["output"]
    return (s["query"]["weight"], s["query"]["bias"], s["key"]["weight"], s["key"]["bias"], s["value"]["weight"],
            s["value"]["bias"], o["dense"]["weight"], o["dense"]["bias"], o["LayerNorm"]["weight"],
            o["LayerNorm"]["bias"], it["weight"], it["bias"], ou["dense"]["weight"], ou["dense"]["bias"],
            ou["LayerNorm"]["weight"], ou["LayerNorm"]["bias"])


def layer_plan(lp, act, eps):
    """The four dense layers of layer ``lp`` as prepared kernels (kernels/dense.py's Prepared:
    Q/K/V + bias, output + LayerNorm, intermediate + activation, output + LayerNorm), or None if
    one cannot run that way (Q/K/V no longer fused, a writable weight: then ``layer`` runs)."""
    prepare = _dense.prepare
    s, o, it, ou = lp["attention"]["self"], lp["attention"]["output"], lp["intermediate"]["dense"], lp["output"]
    fused = fused_qkv(s["query"], s["key"], s["value"])
    if fused is None:
        return None
    steps = (prepare(*fused),
             prepare(o["dense"]["weight"], o["dense"]["bias"], ln=(o["LayerNorm"]["weight"], o["LayerNorm"]["bias"], eps)),
             prepare(it["weight"], it["bias"], act),
             prepare(ou["dense"]["weight"], ou["dense"]["bias"], ln=(ou["LayerNorm"]["weight"], ou["LayerNorm"]["bias"], eps)))
    return None if any(p is None for p in steps) else steps


def planned(plans: Dict, i: int, lp, act, eps):
    """Layer ``i``'s plan from ``plans`` (made on first use), or None: valid while the layer holds
    the very arrays it was made from, read-only (checked every pass: ~1 µs a layer)."""
    src = _sources(lp)
    hit = plans.get(i)
    if (hit is None or hit[0] != (act, eps) or not all(map(is_, src, hit[1]))
            or (hit[2] is not None and any(p.weight.flags.writeable for p in hit[2]))):
        hit = plans[i] = ((act, eps), src, layer_plan(lp, act, eps))
    return hit[2]


def layer_planned(x, batch: Batch, steps, n_head, k):  # [N, H] -> [N, H]: ``layer`` with a plan
    qkv_dense, attn_out, inter, out = steps
    qkv = qkv_dense(x)  # [N, 3H], biases added
    dH = x.shape[1] // n_head
    context = k["attention"](qkv, batch.starts, n_head, dH ** -0.5, None if batch.is_packed else batch.mask)  # [N, H]
    a = attn_out(context, x)  # LayerNorm(context·Wᵀ + b + x)
    return out(inter(a), a)  # LayerNorm(act(a·Wᵀ + b)·Wᵀ + b + a)


def pooler(h, *, dense, k, tap=None):  # [B, T, H] -> [B, H]
    pre = k["dense_act"](np.ascontiguousarray(h[:, 0]), dense["weight"], dense["bias"])  # [B, H]: h[:, 0]·Wᵀ + b
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
         tap: Optional[Taps] = None, skip_padding: bool = True, plans: Optional[Dict] = None):
    """The whole BertModel. Inputs are checked int64 [B, T] arrays (``attention_mask`` 0/1 in the
    compute dtype). Returns a dict of last_hidden_state [B, T, H], pooler_output [B, H] or None,
    hidden_states (L + 1 of [B, T, H]) or None, attentions (L of [B, nH, T, T]) or None, and
    captures ({tap name: array}) or None.

    ``skip_padding`` (the default): a batch with padding runs packed (see :class:`Batch`), and
    the outputs hold zeros at padding positions; valid positions are unchanged. Asking for
    attentions or captures, or ``skip_padding=False``, runs the dense batch as transformers does,
    whose padding positions hold values computed from the pad tokens.

    ``plans``: a dict the caller keeps between calls (BertModel does), for layer plans: when
    neither attentions nor captures are asked for and ``k``'s dense ops are the prepared-kernel
    versions, each layer runs :func:`layer_planned`, the same kernels without the per-call
    Python of :func:`layer` (~0.3 ms of a MiniLM (1, 16) pass, measured)."""
    dtype = params["embeddings"]["LayerNorm"]["weight"].dtype
    wanted, tap = tap, (tap or None)  # an empty Taps runs like None and still returns {}
    valid = attention_mask != 0  # [B, T]
    B, T = valid.shape
    padded = not valid.all()
    if skip_padding and padded and not (output_attentions or tap):
        batch = Batch.packed(valid)
        ids, tt, pos = (a.reshape(-1)[batch.rows] for a in (input_ids, token_type_ids, position_ids))  # [N]
    else:  # no additive mask at all without padding: adding zeros would change nothing
        batch = Batch(B, T, mask=additive_mask(attention_mask, dtype) if padded else None)
        ids, tt, pos = (a.reshape(-1) for a in (input_ids, token_type_ids, position_ids))  # [B·T]
    x = embeddings(ids, tt, pos, **params["embeddings"], eps=eps, k=k)  # [N, H]
    if tap:
        tap("embeddings", batch.unpack(x))
    # intermediates are kept only when asked for: nothing of a layer outlives the next one otherwise
    hidden: List[np.ndarray] = [batch.unpack(x)] if output_hidden_states else []
    attentions: List[np.ndarray] = []
    use_plans = plans is not None and not (output_attentions or tap) and x.shape[0] > 0 and _preparable(k)
    for i, lp in enumerate(params["encoder"]["layer"]):
        steps = planned(plans, i, lp, act, eps) if use_plans else None
        if steps is not None:
            x, probs = layer_planned(x, batch, steps, n_head, k), None
        else:
            x, probs = layer(x, batch, **lp, n_head=n_head, eps=eps, act=act, k=k, keep_probs=output_attentions,
                             tap=tap, name=f"encoder.layer.{i}")
        if output_hidden_states:
            hidden.append(batch.unpack(x))
        if output_attentions:
            attentions.append(probs)
    last = hidden[-1] if output_hidden_states else batch.unpack(x)  # [B, T, H]
    pooled: Optional[np.ndarray] = pooler(last, **params["pooler"], k=k, tap=tap) if params.get("pooler") else None
    return {
        "last_hidden_state": last,
        "pooler_output": pooled,
        "hidden_states": tuple(hidden) if output_hidden_states else None,
        "attentions": tuple(attentions) if output_attentions else None,
        "captures": wanted.captured if wanted is not None else None,
    }


def _preparable(k):  # whether k's dense ops are the versions layer plans stand for
    return k.get("dense_act") is _dense.dense_act_numba_packed and k.get("dense_layernorm") is \
        _dense.dense_layernorm_numba_packed


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
