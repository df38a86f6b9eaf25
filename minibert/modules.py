"""The module tree: a thin view over the nested params, named as in transformers.

``model.encoder.layer[3].attention.self.query.weight`` reads
``params["encoder"]["layer"][3]["attention"]["self"]["query"]["weight"]`` — the same array, no
copy — and assigning to it writes there and remakes the layer's dense layers
(:func:`minibert.model.layer_dense`), so the next pass uses the new array. Each module is callable
and runs the same function from :mod:`minibert.model` that the forward pass runs.
"""
from __future__ import annotations

import operator
from typing import Dict, Iterator, List, Tuple

import numpy as np

from . import model as F
from . import runtime
from .config import ACTIVATIONS, BertConfig


class Module:
    """A node of the tree: named children, and parameters that live in a params dict."""

    _param_names: Tuple[str, ...] = ()

    def __call__(self, *args, **kwargs):
        """``forward`` inside the runtime's call boundary (minibert.runtime.running), as torch's nn.Module."""
        with runtime.running():
            return self.forward(*args, **kwargs)

    def __init__(self, params: Dict | None = None):
        object.__setattr__(self, "_params", params if params is not None else {})
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_on_change", None)  # called after a parameter is assigned

    def __getattr__(self, name):
        d = self.__dict__
        if name in type(self)._param_names:
            return d["_params"][name]
        children = d.get("_children", {})
        if name in children:
            return children[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in type(self)._param_names:
            old = self._params[name]
            value = np.asarray(value)
            if value.shape != old.shape:
                raise ValueError(f"{name} must keep shape {old.shape}; got {value.shape}")
            self._params[name] = value.astype(old.dtype, copy=False)
            if self._on_change is not None:
                self._on_change()
        elif isinstance(value, Module):
            self._children[name] = value
        else:
            object.__setattr__(self, name, value)

    def _add(self, name: str, child: "Module") -> "Module":
        self._children[name] = child
        return child

    def _watch(self, callback) -> None:
        """Call ``callback()`` after any parameter of this module or below it is assigned."""
        object.__setattr__(self, "_on_change", callback)
        for child in self._children.values():
            child._watch(callback)

    def named_children(self) -> Iterator[Tuple[str, "Module"]]:
        return iter(self._children.items())

    def named_parameters(self, prefix: str = "") -> Iterator[Tuple[str, np.ndarray]]:
        """(checkpoint name, array) for every parameter under this module."""
        for name in self._param_names:
            yield prefix + name, self._params[name]
        for cname, child in self._children.items():
            yield from child.named_parameters(f"{prefix}{cname}.")

    def state_dict(self) -> Dict[str, np.ndarray]:
        return dict(self.named_parameters())

    def num_parameters(self) -> int:
        return int(sum(a.size for _, a in self.named_parameters()))

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._children.items():
            sub = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {sub}")
        if len(lines) == 1:
            return lines[0] + ")"
        return "\n".join(lines) + "\n)"


class ModuleList(Module):
    def __init__(self, modules: List[Module]):
        super().__init__()
        for i, m in enumerate(modules):
            self._add(str(i), m)

    def __getitem__(self, i):
        items = list(self._children.values())
        return items[i]

    def __len__(self):
        return len(self._children)

    def __iter__(self):
        return iter(self._children.values())

    def __repr__(self):
        # transformers prints identical layers once, as "(0-11): 12 x BertLayer(...)"
        if not self._children:
            return "ModuleList()"
        first = repr(self[0]).replace("\n", "\n  ")
        n = len(self)
        label = "0" if n == 1 else f"0-{n - 1}"
        return f"ModuleList(\n  ({label}): {n} x {first}\n)"


class Linear(Module):
    _param_names = ("weight", "bias")

    def forward(self, x):  # [..., in] -> [..., out]
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        out_f, in_f = self.weight.shape
        return f"in_features={in_f}, out_features={out_f}, bias=True"


class Embedding(Module):
    _param_names = ("weight",)

    def __init__(self, params, padding_idx=None):
        super().__init__(params)
        self.padding_idx = padding_idx

    def forward(self, ids):  # [...] -> [..., H]
        return self.weight[np.asarray(ids)]

    def extra_repr(self):
        n, d = self.weight.shape
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{n}, {d}{pad}"


class LayerNorm(Module):
    _param_names = ("weight", "bias")

    def __init__(self, params, eps, k):
        super().__init__(params)
        self.eps = eps
        self._k = k

    def forward(self, x, residual=None):  # [..., H] -> [..., H]; LayerNorm(x + residual)
        return self._k["layernorm"](x, residual, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"({self.weight.shape[0]},), eps={self.eps}, elementwise_affine=True"


class Activation(Module):
    def __init__(self, name: str, fn):
        super().__init__()
        self.name, self._fn = name, fn

    def forward(self, x):
        return self._fn(x)

    def __repr__(self):
        return {"tanh": "Tanh()"}.get(self.name, f"Activation({self.name})")


class BertEmbeddings(Module):
    def __init__(self, p, config: BertConfig, k):
        super().__init__(p)
        self._cfg, self._k = config, k
        self._add("word_embeddings", Embedding(p["word_embeddings"], config.pad_token_id))
        self._add("position_embeddings", Embedding(p["position_embeddings"]))
        self._add("token_type_embeddings", Embedding(p["token_type_embeddings"]))
        self._add("LayerNorm", LayerNorm(p["LayerNorm"], config.layer_norm_eps, k))

    def forward(self, input_ids, token_type_ids, position_ids):  # [B, T] x3 -> [B, T, H]
        return F.embeddings(input_ids, token_type_ids, position_ids, **self._params, eps=self._cfg.layer_norm_eps, k=self._k)


def _on_batch(fn, x, mask, dtype, *args):  # a [B, T, H] batch with its additive mask through an encoder function
    x = np.asarray(x)
    B, T, H = x.shape
    y, probs = fn(np.ascontiguousarray(x, dtype=dtype).reshape(B * T, H), F.Batch.dense(np.asarray(mask, dtype=dtype)),
                  *args, True)
    return y.reshape(B, T, H), probs


class BertSelfAttention(Module):
    def __init__(self, p, config, k, dense):
        super().__init__(p)
        self._cfg, self._k, self._dense = config, k, dense
        for name in ("query", "key", "value"):
            self._add(name, Linear(p[name]))

    def forward(self, x, mask):  # [B, T, H], [B, T] additive -> [B, T, H], [B, nH, T, T]
        return _on_batch(F.self_attention, x, mask, self.query.weight.dtype, self._dense[0].qkv,
                         self._cfg.num_attention_heads, self._k)


class BertSelfOutput(Module):
    def __init__(self, p, config, k):
        super().__init__(p)
        self._add("dense", Linear(p["dense"]))
        self._add("LayerNorm", LayerNorm(p["LayerNorm"], config.layer_norm_eps, k))


class BertAttention(Module):
    def __init__(self, p, config, k, dense):
        super().__init__(p)
        self._cfg, self._k, self._dense = config, k, dense
        self._add("self", BertSelfAttention(p["self"], config, k, dense))
        self._add("output", BertSelfOutput(p["output"], config, k))

    def forward(self, x, mask):  # [B, T, H], [B, T] additive -> [B, T, H], [B, nH, T, T]
        return _on_batch(F.attention_block, x, mask, self.output.dense.weight.dtype, self._dense[0],
                         self._cfg.num_attention_heads, self._k)


class BertIntermediate(Module):
    def __init__(self, p, config, k):
        super().__init__(p)
        op = ACTIVATIONS[config.hidden_act]
        self._add("dense", Linear(p["dense"]))
        self._add("intermediate_act_fn", Activation(config.hidden_act, k[op]))

    def forward(self, x):  # [B, T, H] -> [B, T, I]
        return self.intermediate_act_fn(self.dense(x))


class BertOutput(BertSelfOutput):
    pass


class BertLayer(Module):
    """transformers: BertLayer. Holds the layer's dense layers (``dense``, a :class:`minibert.
    model.LayerDense`), made at load and again whenever a parameter below it is assigned."""

    def __init__(self, p, config, k, fused=None):
        super().__init__(p)
        self._cfg, self._k = config, k
        # Q/K/V's concatenated (weight, bias) from load, while query/key/value are its row blocks
        self._fused = fused
        self._fused_parts = self._qkv_parts() if fused is not None else None
        self._dense = [None]  # shared with the attention modules below, which run the same callables
        self._add("attention", BertAttention(p["attention"], config, k, self._dense))
        self._add("intermediate", BertIntermediate(p["intermediate"], config, k))
        self._add("output", BertOutput(p["output"], config, k))
        self._remake()
        self._watch(self._remake)

    def _qkv_parts(self):
        s = self._params["attention"]["self"]
        return tuple(s[n][t] for n in ("query", "key", "value") for t in ("weight", "bias"))

    def _remake(self):
        c = self._cfg
        same = self._fused_parts is not None and all(map(operator.is_, self._qkv_parts(), self._fused_parts))
        self._dense[0] = F.layer_dense(self._params, ACTIVATIONS[c.hidden_act], c.layer_norm_eps, self._k,
                                       self._fused if same else None)

    @property
    def dense(self) -> F.LayerDense:
        return self._dense[0]

    def forward(self, x, mask):  # [B, T, H], [B, T] additive -> [B, T, H], [B, nH, T, T]
        return _on_batch(F.layer, x, mask, self.output.dense.weight.dtype, self._dense[0],
                         self._cfg.num_attention_heads, self._k)


class BertEncoder(Module):
    def __init__(self, p, config, k, fused=None):
        super().__init__(p)
        fused = fused or [None] * len(p["layer"])
        self._add("layer", ModuleList([BertLayer(lp, config, k, f) for lp, f in zip(p["layer"], fused)]))


class BertPooler(Module):
    """transformers: BertPooler. ``dense`` runs the pass's kernel, so calling it gives the pass's bits."""

    def __init__(self, p, k):
        super().__init__(p)
        self._k = k
        self._add("dense", Linear(p["dense"]))
        self._add("activation", Activation("tanh", np.tanh))
        self._remake()
        self._watch(self._remake)

    def _remake(self):
        self._pooler_dense = F.dense(self._k, self.dense.weight, self.dense.bias)

    def forward(self, hidden_states):  # [B, T, H] -> [B, H]
        return F.pooler(np.asarray(hidden_states, dtype=self.dense.weight.dtype), self._pooler_dense)
