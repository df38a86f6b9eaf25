"""minibert: BERT inference in NumPy and Numba that loads Hugging Face checkpoints and matches transformers."""
import os as _os
import sys as _sys

# OpenBLAS's idle worker threads spin for 2^28 cycles (~0.1 s) after every GEMM, on the very core a
# parallel Numba kernel (softmax, GELU, LayerNorm, the small-N GEMM) runs on next, which then goes
# at one core's speed. 2^20 cycles (~0.3 ms) still bridges back-to-back BLAS calls. Measured on 2
# cores, bert-base: (1, 512) 714 -> 623 ms, 32 mixed-length sentences 780 -> 729 ms, (8, 128)
# 1103 -> 1081 ms, (1, 16) 59.5 -> 36.4 ms. OpenBLAS reads OPENBLAS_THREAD_TIMEOUT when NumPy
# loads it: if NumPy is not imported yet, setting the variable is enough; if it is, see
# threads.bound_openblas_spinning. A value the user set is kept either way.
from .threads import SPIN_TIMEOUT as _SPIN  # noqa: E402  (threads.py imports nothing heavy)

if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", str(_SPIN))
else:  # does nothing if the user set the variable
    from .threads import bound_openblas_spinning as _bound

    _bound()

# Numba's OpenMP workers: spin briefly between kernels when OpenBLAS's jobs can share their pool
# (minibert.blaspool), else sleep at once so they leave the cores to OpenBLAS's threads. Set before
# any parallel kernel starts the pool; a value the user set is kept.
from .threads import configure_omp_waiting as _omp_waiting  # noqa: E402
from .threads import prefer_openmp_layer as _prefer_omp  # noqa: E402

_prefer_omp()  # the one pool needs Numba's OpenMP layer, which it would not pick with tbb installed
_omp_waiting()

from .affinity import enabled as _pinning  # noqa: E402
from .affinity import keep_numba_thread_count as _keep_count  # noqa: E402

_pinning()  # MINIBERT_PIN_THREADS read now, so a mistyped value fails at import, not in a forward pass
_keep_count()  # so that Numba compiling during a pinned pass does not count the narrowed CPUs

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
from .threads import get_num_threads, set_num_threads
from .outputs import BaseModelOutputWithPooling, ModelOutput
from .tokenizer import BatchEncoding, BertTokenizer

__version__ = "0.1.0"
__all__ = ["BertModel", "BertForMaskedLM", "BertForNextSentencePrediction", "BertForPreTraining",
           "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
           "SentenceEncoder", "pooling", "set_num_threads", "get_num_threads", "BertConfig", "BertTokenizer", "BatchEncoding", "BaseModelOutputWithPooling", "ModelOutput"]
