"""minibert: BERT inference in NumPy and Numba that loads Hugging Face checkpoints and matches transformers."""
from . import runtime as _runtime

_runtime.configure()  # the thread pools' environment, before NumPy or Numba load them

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
from . import pooling
from .sentence import SentenceEncoder
from .runtime import get_num_threads, set_num_threads
from .outputs import BaseModelOutputWithPooling, ModelOutput
from .tokenizer import BatchEncoding, BertTokenizer
from .auto import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForNextSentencePrediction,
    AutoModelForPreTraining,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

BertTokenizerFast = BertTokenizer  # transformers' name for the tokenizers-backed class, which this is
SentenceTransformer = SentenceEncoder  # sentence-transformers' name

__version__ = "0.1.0"
__all__ = ["BertModel", "BertForMaskedLM", "BertForNextSentencePrediction", "BertForPreTraining",
           "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
           "SentenceEncoder", "pooling", "set_num_threads", "get_num_threads", "BertConfig", "BertTokenizer",
           "BertTokenizerFast", "BatchEncoding", "BaseModelOutputWithPooling", "ModelOutput", "AutoConfig",
           "AutoTokenizer", "AutoModel", "AutoModelForMaskedLM", "AutoModelForSequenceClassification",
           "AutoModelForTokenClassification", "AutoModelForQuestionAnswering", "AutoModelForPreTraining",
           "AutoModelForNextSentencePrediction", "SentenceTransformer", "BertForMultipleChoice",
           "AutoModelForMultipleChoice"]
