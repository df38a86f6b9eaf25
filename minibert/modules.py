"""The module tree: a thin view over the nested params, named as in transformers.

``model.encoder.layer[3].attention.self.query.weight`` reads
``params["encoder"]["layer"][3]["attention"]["self"]["query"]["weight"]`` — the same array, no
copy — and assigning to it writes there, so the forward pass sees the change. Each module is
callable and runs the same function from :mod:`minibert.model` that the forward pass runs.
"""
from __future__ import annotations

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
        elif isinstance(value, Module):
            self._children[name] = value
        else:
            object.__setattr__(self, name, value)

    def _add(self, name: str, child: "Module") -> "Module":
        self._children[name] = child
        return child

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


def _dense(fn, x, mask, **kw):  # a [B, T, H] batch with its additive mask through an encoder function
    x = np.asarray(x)
    B, T, H = x.shape
    y, probs = fn(np.ascontiguousarray(x).reshape(B * T, H), F.Batch.dense(np.asarray(mask)), keep_probs=True, **kw)
    return y.reshape(B, T, H), probs


class BertSelfAttention(Module):
    def __init__(self, p, config, k):
        super().__init__(p)
        self._cfg, self._k = config, k
        for name in ("query", "key", "value"):
            self._add(name, Linear(p[name]))

    def forward(self, x, mask):  # [B, T, H], [B, T] additive -> [B, T, H], [B, nH, T, T]
        return _dense(F.self_attention, x, mask, **self._params, n_head=self._cfg.num_attention_heads, k=self._k)


class BertSelfOutput(Module):
    def __init__(self, p, config, k):
        super().__init__(p)
        self._add("dense", Linear(p["dense"]))
        self._add("LayerNorm", LayerNorm(p["LayerNorm"], config.layer_norm_eps, k))


class BertAttention(Module):
    def __init__(self, p, config, k):
        super().__init__(p)
        self._cfg, self._k = config, k
        self._add("self", BertSelfAttention(p["self"], config, k))
        self._add("output", BertSelfOutput(p["output"], config, k))

    def forward(self, x, mask):  # [B, T, H], [B, T] additive -> [B, T, H], [B, nH, T, T]
        c = self._cfg
        return _dense(F.attention_block, x, mask, **self._params, n_head=c.num_attention_heads, eps=c.layer_norm_eps,
                      k=self._k)


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
    def __init__(self, p, config, k):
        super().__init__(p)
        self._cfg, self._k = config, k
        self._add("attention", BertAttention(p["attention"], config, k))
        self._add("intermediate", BertIntermediate(p["intermediate"], config, k))
        self._add("output", BertOutput(p["output"], config, k))

    def forward(self, x, mask):  # [B, T, H], [B, T] additive -> [B, T, H], [B, nH, T, T]
        c = self._cfg
        return _dense(F.layer, x, mask, **self._params, n_head=c.num_attention_heads, eps=c.layer_norm_eps,
                      act=ACTIVATIONS[c.hidden_act], k=self._k)


class BertEncoder(Module):
    def __init__(self, p, config, k):
        super().__init__(p)
        self._add("layer", ModuleList([BertLayer(lp, config, k) for lp in p["layer"]]))


class BertPooler(Module):
    def __init__(self, p, k):
        super().__init__(p)
        self._k = k
        self._add("dense", Linear(p["dense"]))
        self._add("activation", Activation("tanh", np.tanh))

    def forward(self, hidden_states):  # [B, T, H] -> [B, H]
        return F.pooler(np.asarray(hidden_states), **self._params, k=self._k)  # the pass's kernel: the same bits
