"""transformers' ``Auto*`` names, for BERT checkpoints: ported code keeps its imports.

Each ``AutoX.from_pretrained(name_or_path, ...)`` is the matching minibert class's
``from_pretrained``; a checkpoint whose config.json names another ``model_type`` is an error that
says so (minibert runs BERT only).
"""
from __future__ import annotations

import json

from .bert import BertModel
from .config import BertConfig
from .heads import (
    BertForMaskedLM,
    BertForMultipleChoice,
    BertForNextSentencePrediction,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
)
from .hub import resolve_model_dir
from .tokenizer import BertTokenizer


def _check_bert(name_or_path, kwargs) -> None:
    """A ValueError naming the model_type when the checkpoint's config.json is not BERT's."""
    d = resolve_model_dir(name_or_path, **{k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only")
                                          if k in kwargs})
    path = d / "config.json"
    if not path.is_file():
        return  # the class's own from_pretrained says what is missing
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return
    if model_type not in (None, "bert"):
        raise ValueError(f"{path} has model_type={model_type!r}; minibert's Auto classes load BERT checkpoints "
                         "only (model_type 'bert')")


class _Auto:
    _cls = None  # the minibert class it stands for

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is not instantiated directly; use "
                        f"{type(self).__name__}.from_pretrained(name_or_path)")

    @classmethod
    def from_pretrained(cls, name_or_path=None, *args, **kwargs):
        _check_bert(name_or_path, kwargs)
        return cls._cls.from_pretrained(name_or_path, *args, **kwargs)


def _auto(name, target, doc):
    return type(name, (_Auto,), {"_cls": target, "__doc__": doc, "__module__": __name__})


AutoConfig = _auto("AutoConfig", BertConfig, "transformers.AutoConfig for BERT: a :class:`minibert.BertConfig`.")
AutoTokenizer = _auto("AutoTokenizer", BertTokenizer, "transformers.AutoTokenizer for BERT: a :class:`minibert.BertTokenizer`.")
AutoModel = _auto("AutoModel", BertModel, "transformers.AutoModel for BERT: a :class:`minibert.BertModel`.")
AutoModelForMaskedLM = _auto("AutoModelForMaskedLM", BertForMaskedLM, "A :class:`minibert.BertForMaskedLM`.")
AutoModelForSequenceClassification = _auto("AutoModelForSequenceClassification", BertForSequenceClassification,
                                           "A :class:`minibert.BertForSequenceClassification`.")
AutoModelForTokenClassification = _auto("AutoModelForTokenClassification", BertForTokenClassification,
                                        "A :class:`minibert.BertForTokenClassification`.")
AutoModelForQuestionAnswering = _auto("AutoModelForQuestionAnswering", BertForQuestionAnswering,
                                      "A :class:`minibert.BertForQuestionAnswering`.")
AutoModelForMultipleChoice = _auto("AutoModelForMultipleChoice", BertForMultipleChoice,
                                   "A :class:`minibert.BertForMultipleChoice`.")
AutoModelForPreTraining = _auto("AutoModelForPreTraining", BertForPreTraining, "A :class:`minibert.BertForPreTraining`.")
AutoModelForNextSentencePrediction = _auto("AutoModelForNextSentencePrediction", BertForNextSentencePrediction,
                                           "A :class:`minibert.BertForNextSentencePrediction`.")
