"""BertConfig: the fields of a Hugging Face ``config.json`` that BertModel's computation uses."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict

# hidden_act names -> the kernel op that computes them. "gelu" is the exact erf form; the tanh
# approximation has three spellings in transformers that differ only in rounding.
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}

# transformers config keys that a checkpoint's config.json may leave out but a caller may set
KNOWN_EXTRAS = ("num_labels", "id2label", "label2id", "problem_type", "tie_word_embeddings")

_POSITIVE_INTS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    output_hidden_states: bool = False
    output_attentions: bool = False
    # Every other key of config.json (architectures, id2label, dropout rates, ...) is kept here
    # untouched so heads and tools can read it; the encoder computation does not use it.
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.validate()

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Dict[str, Any], *, strict: bool = False, **overrides) -> "BertConfig":
        """``strict=True``: an override must name a field or a key of ``d`` (catches typos such as
        ``output_hidden_state=True``, which would otherwise be kept as an unused extra)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if strict:
            unknown = sorted(k for k in overrides if k not in names and k not in d and k not in KNOWN_EXTRAS)
            if unknown:
                raise TypeError(f"unknown config override(s) {unknown}; config fields: {sorted(names)}")
        d = {**d, **overrides}
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        extra.update(d.get("extra", {}) or {})
        return cls(**known, extra=extra)

    @classmethod
    def from_json_file(cls, path, *, strict: bool = False, **overrides) -> "BertConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in (None, "bert"):
            raise ValueError(f"{path} has model_type={model_type!r}; minibert loads only model_type 'bert'")
        return cls.from_dict(d, strict=strict, **overrides)

    @classmethod
    def from_pretrained(cls, name_or_path, **overrides) -> "BertConfig":
        from .hub import resolve_model_dir

        d = resolve_model_dir(name_or_path)
        return cls.from_json_file(os.path.join(d, "config.json"), **overrides)

    def to_dict(self) -> Dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **d, "model_type": "bert"}

    def __getattr__(self, name):
        # config.id2label, config.architectures, ... as in transformers
        extra = self.__dict__.get("extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"BertConfig has no attribute {name!r}")

    # -- checks ---------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self):
        for name in _POSITIVE_INTS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"config {name}={v!r}; expected a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"config hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"config hidden_act={self.hidden_act!r} is not supported; expected one of {sorted(ACTIVATIONS)}"
            )
        if isinstance(self.layer_norm_eps, bool) or not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            raise ValueError(f"config layer_norm_eps={self.layer_norm_eps!r}; expected a positive number")
        if self.position_embedding_type not in (None, "absolute"):
            raise NotImplementedError(
                f"config position_embedding_type={self.position_embedding_type!r} is not implemented; "
                "minibert supports only 'absolute' position embeddings"
            )
        if self.extra.get("is_decoder"):
            raise NotImplementedError("config is_decoder=True (causal BERT) is not implemented; minibert runs the bidirectional encoder")
