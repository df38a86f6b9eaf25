"""Results by name, used the ways transformers' ModelOutput is used.

``out.last_hidden_state``, ``out["pooler_output"]``, ``out[0]`` and
``last_hidden_state, pooler_output = out`` all work. Integer indexing, slicing, ``len`` and
iteration follow the fields' order with the None fields skipped, like ``to_tuple()`` in
transformers. (Iterating yields values, not keys — that is what makes tuple unpacking work;
``keys()``, ``items()``, ``dict(out)`` and ``"name" in out`` behave as on a dict.)
"""
from __future__ import annotations

from typing import Tuple


class ModelOutput:
    _fields: Tuple[str, ...] = ()

    def __init__(self, **values):
        unknown = set(values) - set(self._fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}; fields: {self._fields}")
        for name in self._fields:
            object.__setattr__(self, name, values.get(name))

    # -- dict-like ------------------------------------------------------------------------------
    def keys(self):
        return [n for n in self._fields if getattr(self, n) is not None]

    def values(self):
        return [getattr(self, n) for n in self.keys()]

    def items(self):
        return [(n, getattr(self, n)) for n in self.keys()]

    def to_tuple(self) -> tuple:
        return tuple(self.values())

    def __contains__(self, name):
        return name in self.keys()

    def get(self, name, default=None):
        return self[name] if name in self.keys() else default

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self._fields:
                raise KeyError(f"{key!r}; {type(self).__name__} has fields {self._fields}")
            value = getattr(self, key)
            if value is None:
                raise KeyError(f"{key!r} is None in this output (it was not computed)")
            return value
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        raise TypeError(f"{type(self).__name__} indices must be str, int or slice, not {type(key).__name__}")

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self):
        return len(self.keys())

    def __setattr__(self, name, value):
        if name not in self._fields:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        object.__setattr__(self, name, value)

    def __repr__(self):
        parts = []
        for name in self._fields:
            v = getattr(self, name)
            if v is None:
                desc = "None"
            elif hasattr(v, "shape"):
                desc = f"array(shape={tuple(v.shape)}, dtype={v.dtype})"
            elif isinstance(v, tuple):
                desc = f"tuple of {len(v)}" + (f" x {tuple(v[0].shape)}" if v and hasattr(v[0], "shape") else "")
            else:
                desc = repr(v)
            parts.append(f"  {name}={desc},")
        return f"{type(self).__name__}(\n" + "\n".join(parts) + "\n)"


class BaseModelOutputWithPooling(ModelOutput):
    """BertModel's result: last_hidden_state [B, T, H]; pooler_output [B, H] or None;
    hidden_states, L + 1 arrays [B, T, H] (embedding output first) or None;
    attentions, L arrays [B, nH, T, T] of softmax probabilities or None;
    captures, {tap name: array} for the taps asked for with ``capture=`` or None."""

    _fields = ("last_hidden_state", "pooler_output", "hidden_states", "attentions", "captures")



class MaskedLMOutput(ModelOutput):
    """BertForMaskedLM: loss (when labels were given), logits [B, T, V], hidden_states, attentions."""

    _fields = ("loss", "logits", "hidden_states", "attentions", "captures")


class NextSentencePredictorOutput(ModelOutput):
    """BertForNextSentencePrediction: loss, logits [B, 2] (index 0: B follows A), hidden_states, attentions."""

    _fields = ("loss", "logits", "hidden_states", "attentions", "captures")


class BertForPreTrainingOutput(ModelOutput):
    """BertForPreTraining: loss, prediction_logits [B, T, V], seq_relationship_logits [B, 2], hidden_states, attentions."""

    _fields = ("loss", "prediction_logits", "seq_relationship_logits", "hidden_states", "attentions", "captures")


class SequenceClassifierOutput(ModelOutput):
    """BertForSequenceClassification: loss, logits [B, num_labels], hidden_states, attentions."""

    _fields = ("loss", "logits", "hidden_states", "attentions", "captures")


class MultipleChoiceModelOutput(ModelOutput):
    """BertForMultipleChoice: loss, logits [B, num_choices], hidden_states and attentions of the
    [B·num_choices, T] batch the choices run as."""

    _fields = ("loss", "logits", "hidden_states", "attentions", "captures")


class TokenClassifierOutput(ModelOutput):
    """BertForTokenClassification: loss, logits [B, T, num_labels], hidden_states, attentions."""

    _fields = ("loss", "logits", "hidden_states", "attentions", "captures")


class QuestionAnsweringModelOutput(ModelOutput):
    """BertForQuestionAnswering: loss, start_logits [B, T], end_logits [B, T], hidden_states, attentions."""

    _fields = ("loss", "start_logits", "end_logits", "hidden_states", "attentions", "captures")


class LogitLensOutput(ModelOutput):
    """BertForMaskedLM.logit_lens: logits [L+1, B, T, V] (float32) of the MLM head on each of the
    L + 1 hidden states; top_ids and top_probs [L+1, B, T, k], best first; top_tokens, the same
    as nested lists of token strings (None without a tokenizer)."""

    _fields = ("logits", "top_ids", "top_tokens", "top_probs")
