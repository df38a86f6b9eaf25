"""BertModel: from_pretrained, the call, and the module tree's root."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from . import model as F
from . import runtime, taps
from .config import ACTIVATIONS, BertConfig
from .hub import resolve_model_dir
from .inputs import check_head_mask, prepare_inputs
from .kernels import select
from .modules import BertEmbeddings, BertEncoder, BertPooler, Module
from .outputs import BaseModelOutputWithPooling
from .weights import load_weights, nest, release_pages


DTYPES = {"float32": np.float32, "float64": np.float64}


def _resolve_dtype(dtype) -> np.dtype:
    """float32 or float64 by name, NumPy type or dtype; anything else (None, "", "bf16", float16
    ...) is an error, never a silent float64 (``np.dtype(None)`` is float64)."""
    if isinstance(dtype, str):
        if dtype in DTYPES:
            return np.dtype(DTYPES[dtype])
    elif dtype in (np.float32, np.float64) or (isinstance(dtype, np.dtype) and dtype in (np.float32, np.float64)):
        return np.dtype(dtype)
    raise ValueError(f"dtype={dtype!r} is not supported; expected 'float32' or 'float64' "
                     "(or np.float32, np.float64): minibert computes in float32 or float64 only")


def load_pretrained(name_or_path, *, dtype, kernels, pooler, revision, cache_dir, local_files_only,
                    attn_implementation, config_overrides, num_labels=None):
    """(config, params, heads, name) for ``from_pretrained`` of BertModel and the task models."""
    dt = _resolve_dtype(dtype)
    select(kernels)  # a bad kernel set fails before any file is read
    if attn_implementation not in (None, "eager", "sdpa"):
        raise ValueError(f"attn_implementation={attn_implementation!r} is not supported; "
                         "minibert computes exact attention ('eager' / 'sdpa')")
    model_dir = resolve_model_dir(name_or_path, revision=revision, cache_dir=cache_dir,
                                  local_files_only=local_files_only)
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    config = BertConfig.from_json_file(config_path, strict=True, **config_overrides)
    if num_labels is not None:  # transformers: keep the checkpoint's labels when their number is n
        config.extra["num_labels"] = num_labels
        if len(config.extra.get("id2label") or {}) != num_labels:
            config.extra["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_labels)}
            config.extra["label2id"] = {f"LABEL_{i}": i for i in range(num_labels)}
    params, heads = load_weights(model_dir, config, dt, pooler=pooler)
    # read-only: no one else holds these arrays, and a weight that cannot change in place can be
    # packed once for the dense layers' GEMM (kernels/gemm.py); a new value is assigned instead
    for arr in (*params.values(), *heads.values()):
        arr.flags.writeable = False
    name = os.fspath(name_or_path) if name_or_path is not None else str(model_dir)
    return config, params, heads, name


def _fuse_qkv(p):
    """Q, K and V of one layer as one GEMM: concatenate the weights (and biases) once and point
    query/key/value at row blocks of the result, so they stay in memory once; the file pages the
    originals were read from are handed back to the OS. Returns the (weight, bias) made."""
    w, b = F.fuse_qkv(p["query"], p["key"], p["value"])
    old = [p[n]["weight"] for n in ("query", "key", "value")]
    if not any(p[n][t].flags.writeable for n in ("query", "key", "value") for t in ("weight", "bias")):
        w.flags.writeable = b.flags.writeable = False  # read-only as the originals were (see load_pretrained)
    H = p["query"]["weight"].shape[0]
    for i, n in enumerate(("query", "key", "value")):
        p[n]["weight"], p[n]["bias"] = w[i * H:(i + 1) * H], b[i * H:(i + 1) * H]
    release_pages(*old)
    return w, b


class BertModel(Module):
    """BERT encoder with transformers' names, outputs and numbers.

    ``BertModel.from_pretrained(name_or_path, dtype="float32", kernels="numba", **config_overrides)``;
    ``model(input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
    output_hidden_states=None, output_attentions=None)``.
    """

    def __init__(self, config: BertConfig, params: Dict[str, np.ndarray], *, kernels: str = "numba",
                 heads: Optional[Dict[str, np.ndarray]] = None, name_or_path: Optional[str] = None,
                 skip_padding: bool = False):
        """``params``: ``{checkpoint name: array}`` as :func:`minibert.weights.load_weights` returns.
        ``skip_padding``: see :meth:`from_pretrained`."""
        nested = nest(params)
        fused = [_fuse_qkv(lp["attention"]["self"]) for lp in nested["encoder"]["layer"]]
        super().__init__(nested)
        self.config = config
        self.kernels = kernels
        self._k = select(kernels)
        self.dtype = nested["embeddings"]["LayerNorm"]["weight"].dtype
        self.heads = heads or {}
        self.name_or_path = name_or_path
        self.skip_padding = bool(skip_padding)
        self._add("embeddings", BertEmbeddings(nested["embeddings"], config, self._k))
        self._add("encoder", BertEncoder(nested["encoder"], config, self._k, fused))
        if "pooler" in nested:
            self._add("pooler", BertPooler(nested["pooler"], self._k))

    def __getattr__(self, name):
        if name == "pooler" and "pooler" not in self.__dict__["_children"]:
            return None  # a checkpoint without pooler weights (masked-LM): pooler is None, as in transformers
        return super().__getattr__(name)

    @classmethod
    def from_pretrained(cls, name_or_path=None, *, dtype="float32", kernels="numba", add_pooling_layer: bool = True,
                        revision: Optional[str] = None, cache_dir=None, local_files_only: bool = False,
                        attn_implementation: Optional[str] = None, skip_padding: bool = False,
                        **config_overrides) -> "BertModel":
        """Load a local directory or a Hub repo id (None: the default model).

        ``dtype``: "float32" (default) or "float64", the compute dtype. ``kernels``: "numba" (default)
        or "numpy". ``config_overrides`` set config fields, e.g. ``output_hidden_states=True``.
        As in transformers: ``add_pooling_layer=False`` drops the pooler; ``revision``, ``cache_dir``
        and ``local_files_only`` go to the Hub client; ``attn_implementation`` may be "eager" or
        "sdpa" (the same mathematics; minibert computes it one way).

        ``skip_padding=False`` (default): every position is computed as transformers does, padding
        included. ``skip_padding=True`` (or setting ``model.skip_padding = True``): a padded batch
        runs packed, on its valid tokens only, so padding costs no work; ``last_hidden_state`` and
        ``hidden_states`` then hold zeros at padding positions (valid positions, ``pooler_output``
        and the heads' outputs there match transformers); with a pooler, a batch with a row that
        starts with padding runs dense (the pooler reads position 0). Asking for attentions,
        captures, patches or a head mask always runs the dense batch.
        """
        config, params, heads, name = load_pretrained(
            name_or_path, dtype=dtype, kernels=kernels, pooler=add_pooling_layer, revision=revision,
            cache_dir=cache_dir, local_files_only=local_files_only, attn_implementation=attn_implementation,
            config_overrides=config_overrides)
        return cls(config, params, kernels=kernels, heads=heads, name_or_path=name, skip_padding=skip_padding)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states: Optional[bool] = None, output_attentions: Optional[bool] = None,
                return_dict: Optional[bool] = None, capture=None, inputs_embeds=None, head_mask=None,
                patch=None) -> BaseModelOutputWithPooling:
        """``capture``: tap names or glob patterns (see :meth:`tap_names`); the arrays come back in
        ``out.captures``, e.g. ``capture=["encoder.layer.*.attention.self.probs"]``.
        ``patch``: a dict from a tap name or pattern to an array (broadcast to the tap's shape) or a
        function ``f(value, name)`` returning one: the pass goes on with it in place of the tap's
        value, as with a torch forward hook that returns a replacement; ``capture`` then returns
        the patched values. ``head_mask`` [nH] or [L, nH]: multiplies each layer's attention
        probabilities per head (1 keeps a head, 0 removes it), transformers 4's ``head_mask``.
        ``inputs_embeds`` [B, T, H]: vectors used in place of the word embeddings of ``input_ids``
        (give one or the other), as transformers."""
        out = self.run(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states, output_attentions,
                       capture, inputs_embeds=inputs_embeds, head_mask=head_mask, patch=patch)
        result = BaseModelOutputWithPooling(**out)
        return result.to_tuple() if return_dict is False else result

    def run(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
            output_hidden_states: Optional[bool] = None, output_attentions: Optional[bool] = None,
            capture=None, skip_padding: Optional[bool] = None, inputs_embeds=None, head_mask=None,
            patch=None) -> Dict:
        """The checked inputs through :func:`minibert.model.bert`: a plain dict of its outputs.
        ``skip_padding`` None: the model's ``skip_padding``."""
        c = self.config
        tap = taps.select(capture, self.tap_names(), patch) if capture is not None or patch is not None else None
        head_mask = check_head_mask(head_mask, c.num_hidden_layers, c.num_attention_heads, self.dtype)
        ids, mask, tt, pos, embeds = prepare_inputs(c, input_ids, attention_mask, token_type_ids, position_ids,
                                                    self.dtype, inputs_embeds)
        pooler = self.pooler
        k, layers, pooler_dense = self._k, [layer.dense for layer in self.encoder.layer], \
            None if pooler is None else pooler._pooler_dense
        if self.kernels == "numba" and not runtime.kernels_ready(self.dtype):  # first use: see runtime
            k = select("numpy")
            act = ACTIVATIONS[c.hidden_act]
            layers = [F.layer_dense(layer._params, act, c.layer_norm_eps, k) for layer in self.encoder.layer]
            pooler_dense = None if pooler is None else F.dense(k, pooler.dense.weight, pooler.dense.bias)
        with runtime.running():
            out = F.bert(
                self._params, layers, pooler_dense,
                ids, mask, tt, pos, n_head=c.num_attention_heads, eps=c.layer_norm_eps, k=k,
                output_hidden_states=c.output_hidden_states if output_hidden_states is None else bool(output_hidden_states),
                output_attentions=c.output_attentions if output_attentions is None else bool(output_attentions),
                tap=tap, skip_padding=self.skip_padding if skip_padding is None else bool(skip_padding),
                inputs_embeds=embeds, head_mask=head_mask,
            )
        if capture is None:
            out["captures"] = None  # patches alone capture nothing
        return out

    def tap_names(self) -> List[str]:
        """Every name ``capture=`` and ``patch=`` accept, in the order the forward pass reaches them:
        ``embeddings``; per layer i ``encoder.layer.i.attention.self.{query,key,value}``
        [B, nH, T, dH], ``.scores`` (scaled, mask added, before softmax) and ``.probs`` [B, nH, T, T],
        ``.context`` [B, T, H] (heads merged), ``encoder.layer.i.attention.output`` [B, T, H],
        ``encoder.layer.i.intermediate`` [B, T, I], ``encoder.layer.i.output`` [B, T, H];
        ``pooler.dense`` [B, H] (before tanh) when the model has a pooler."""
        return taps.tap_names(self.config.num_hidden_layers, pooler=self.pooler is not None)
