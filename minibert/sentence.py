"""SentenceEncoder: sentence embeddings the way a sentence-transformers checkpoint says to make them.

A sentence-transformers checkpoint lists its pipeline in ``modules.json``: the Transformer, a
Pooling module (``1_Pooling/config.json``: which of cls / mean / max / mean-sqrt-len tokens) and
often a Normalize module; ``sentence_bert_config.json`` sets ``max_seq_length``. SentenceEncoder
reads the same files and runs the same steps with :mod:`minibert.pooling`, so all-MiniLM-L6-v2
gives the sentence-transformers vectors. A plain BERT checkpoint (no modules.json) gets mean pooling
and no normalization, as sentence-transformers does. Other modules (Dense, ...) are an error.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from . import pooling as P
from .bert import BertModel
from .hub import resolve_model_dir
from .tokenizer import BertTokenizer

logger = logging.getLogger(__name__)

# sentence-transformers' Pooling flags, in the order it concatenates them
_ST_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
_ST_UNSUPPORTED = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
POOLINGS = ("mean", "cls", "max", "mean_sqrt_len")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def read_st_config(model_dir) -> Dict:
    """{"pooling": [modes], "normalize": bool, "max_seq_length": int or None} from the
    sentence-transformers files in ``model_dir`` (defaults: mean, no normalize)."""
    d = Path(model_dir)
    cfg = {"pooling": ["mean"], "normalize": False, "max_seq_length": None}
    sbert = d / "sentence_bert_config.json"
    if sbert.is_file():
        cfg["max_seq_length"] = _read_json(sbert).get("max_seq_length")
    modules_file = d / "modules.json"
    if not modules_file.is_file():
        return cfg
    for m in _read_json(modules_file):
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Pooling":
            pcfg = _read_json(d / m.get("path", "") / "config.json")
            bad = [k for k in _ST_UNSUPPORTED if pcfg.get(k)]
            if bad:
                raise NotImplementedError(f"{modules_file}: Pooling with {bad[0]} is not implemented; "
                                          f"supported: {list(_ST_MODES)}")
            modes = [mode for key, mode in _ST_MODES.items() if pcfg.get(key)]
            if not modes:
                raise ValueError(f"{d / m.get('path', '')}/config.json enables no pooling mode")
            cfg["pooling"] = modes
        elif kind == "Normalize":
            cfg["normalize"] = True
        else:
            raise NotImplementedError(f"{modules_file} lists a {m.get('type')} module; SentenceEncoder runs "
                                      "only Transformer, Pooling and Normalize")
    return cfg


def pool(mode: str, hidden, attention_mask):  # [B, T, H], [B, T] -> [B, H]
    if mode == "mean":
        return P.mean(hidden, attention_mask)
    if mode == "max":
        return P.max(hidden, attention_mask)
    if mode == "cls":
        return P.cls(hidden)
    if mode == "mean_sqrt_len":  # the sum over valid tokens / sqrt(count)
        n = np.asarray(attention_mask).sum(axis=1, keepdims=True)
        return (P.mean(hidden, attention_mask) * np.sqrt(n)).astype(hidden.dtype)
    raise ValueError(f"pooling={mode!r}; expected one of {POOLINGS}")


class SentenceEncoder:
    """``SentenceEncoder.from_pretrained(name_or_path).encode(sentences)`` -> float32 [N, H]."""

    def __init__(self, model: BertModel, tokenizer: BertTokenizer, pooling: Sequence[str] = ("mean",),
                 normalize: bool = False, max_seq_length: Optional[int] = None):
        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.normalize = list(pooling), bool(normalize)
        limit = min(tokenizer.model_max_length, model.config.max_position_embeddings)
        self.max_seq_length = min(max_seq_length or limit, limit)

    @classmethod
    def from_pretrained(cls, name_or_path=None, *, dtype="float32", kernels="numba", **kwargs) -> "SentenceEncoder":
        """The model, its tokenizer and its sentence-transformers pipeline (defaults: mean pooling,
        no normalization, the model's length limit). Keyword arguments go to BertModel.from_pretrained."""
        model_dir = resolve_model_dir(name_or_path, **{k: kwargs.pop(k) for k in
                                                       ("revision", "cache_dir", "local_files_only") if k in kwargs})
        st = read_st_config(model_dir)
        model = BertModel.from_pretrained(model_dir, dtype=dtype, kernels=kernels, add_pooling_layer=False, **kwargs)
        tokenizer = BertTokenizer.from_pretrained(model_dir)
        enc = cls(model, tokenizer, st["pooling"], st["normalize"], st["max_seq_length"])
        logger.debug("SentenceEncoder %s: pooling %s, normalize %s, max_seq_length %d", model_dir, enc.pooling,
                     enc.normalize, enc.max_seq_length)
        return enc

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size * len(self.pooling)

    def encode(self, sentences: Union[str, Sequence[str]], batch_size: int = 32, pooling: Optional[str] = None,
               normalize: Optional[bool] = None, show_progress_bar: bool = False) -> np.ndarray:
        """float32 [N, H], rows in input order (a single string gives [H], as in sentence-transformers).

        ``pooling``: None (the checkpoint's), "mean", "cls", "max" or "mean_sqrt_len";
        ``normalize``: None (the checkpoint's), True or False. Sentences longer than
        ``max_seq_length`` tokens are truncated, as sentence-transformers does. Batches are formed
        from sentences sorted by length, so little is spent on padding."""
        single = isinstance(sentences, str)
        texts: List[str] = [sentences] if single else list(sentences)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"sentences[{i}] is {type(t).__name__}; expected str")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r}; expected a positive integer")
        if pooling is not None and pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}; expected one of {POOLINGS} or None (the checkpoint's)")
        modes = [pooling] if pooling is not None else self.pooling
        norm = self.normalize if normalize is None else bool(normalize)
        dim = self.model.config.hidden_size * len(modes)
        if not texts:
            return np.zeros((0, dim), dtype=np.float32)

        lengths = self._lengths(texts)
        order = np.argsort(-lengths, kind="stable")  # longest first: equal lengths share a batch
        result = np.empty((len(texts), dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        if show_progress_bar:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="batches", unit="batch")
        for s in starts:
            idx = order[s:s + batch_size]
            x = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_seq_length)
            h = self.model(**x).last_hidden_state  # [b, T, H]
            v = np.concatenate([pool(m, h, x["attention_mask"]) for m in modes], axis=-1)  # [b, dim]
            if norm:
                v = P.normalize(v)
            result[idx] = v
        return result[0] if single else result

    def _lengths(self, texts: List[str], chunk: int = 4096) -> np.ndarray:
        """Each text's length in tokens after truncation (tokenized in chunks to bound memory)."""
        out = []
        for s in range(0, len(texts), chunk):
            x = self.tokenizer(texts[s:s + chunk], padding=True, truncation=True, max_length=self.max_seq_length)
            out.append(x["attention_mask"].sum(axis=1))
        return np.concatenate(out)

    def similarity(self, a, b=None) -> np.ndarray:
        """Cosine similarity matrix [N, M] between the embeddings of ``a`` and ``b`` (default: ``a``)."""
        ea = P.normalize(self.encode(list(a)).astype(np.float64))
        eb = ea if b is None else P.normalize(self.encode(list(b)).astype(np.float64))
        return ea @ eb.T

    def __repr__(self):
        return (f"SentenceEncoder({self.model.name_or_path!r}, pooling={self.pooling}, normalize={self.normalize}, "
                f"max_seq_length={self.max_seq_length})")
