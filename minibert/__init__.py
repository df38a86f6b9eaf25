"""minibert: BERT inference in NumPy and Numba that loads Hugging Face checkpoints and matches transformers."""
from . import runtime as _runtime

_runtime.configure()  # the thread pools' environment, before NumPy or Numba load them

from .bert import BertModel
from .config import BertConfig
from .heads import (
    BertForMaskedLM,
    BertForNextSentencePrediction,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
)
from . import pooling
from .sentence import SentenceEncoder
from .runtime import get_num_threads, set_num_threads
from .outputs import BaseModelOutputWithPooling, ModelOutput
from .tokenizer import BatchEncoding, BertTokenizer

__version__ = "0.1.0"
__all__ = ["BertModel", "BertForMaskedLM", "BertForNextSentencePrediction", "BertForPreTraining",
           "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
           "SentenceEncoder", "pooling", "set_num_threads", "get_num_threads", "BertConfig", "BertTokenizer", "BatchEncoding", "BaseModelOutputWithPooling", "ModelOutput"]
