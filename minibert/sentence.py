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
    """{"pooling": [modes], "normalize": bool, "max_seq_length": int or None, "prompts": {name: text},
    "default_prompt_name": str or None} from the sentence-transformers files in ``model_dir``
    (defaults: mean, no normalize, no prompts)."""
    d = Path(model_dir)
    cfg = {"pooling": ["mean"], "normalize": False, "max_seq_length": None, "prompts": {}, "default_prompt_name": None}
    sbert = d / "sentence_bert_config.json"
    if sbert.is_file():
        cfg["max_seq_length"] = _read_json(sbert).get("max_seq_length")
    st = d / "config_sentence_transformers.json"
    if st.is_file():
        st_cfg = _read_json(st)
        cfg["prompts"] = st_cfg.get("prompts") or {}
        cfg["default_prompt_name"] = st_cfg.get("default_prompt_name")
    modules_file = d / "modules.json"
    if not modules_file.is_file():
        return cfg
    for m in _read_json(modules_file):
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        if kind == "Transformer":
            continue
        if kind == "Pooling":
            pcfg = _read_json(d / m.get("path", "") / "config.json")
            bad = [k for k in _ST_UNSUPPORTED if pcfg.get(k)] + ["include_prompt=false"] * (
                pcfg.get("include_prompt", True) is False)  # the prompt's tokens left out of the pooling
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


def warn_truncated(lengths, limit: int) -> int:
    """Log how many of the texts (``lengths`` in tokens) are longer than ``limit``, i.e. truncated."""
    n = int((np.asarray(lengths) > limit).sum())
    if n:
        logger.warning("%d of %d text(s) are longer than %d tokens (the longest %d) and were truncated to %d",
                       n, len(lengths), limit, int(np.max(lengths)), limit)
    return n


def _texts(sentences, batch_size):  # -> (the texts as a list, whether one str was given); checked
    single = isinstance(sentences, str)
    texts: List[str] = [sentences] if single else list(sentences)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"sentences[{i}] is {type(t).__name__}; expected str")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size={batch_size!r}; expected a positive integer")
    return texts, single


class SentenceEncoder:
    """``SentenceEncoder(name_or_path).encode(sentences)`` -> float32 [N, H], as sentence-transformers'
    ``SentenceTransformer`` (also importable under that name). ``SentenceEncoder(model, tokenizer,
    pooling, normalize, max_seq_length)`` wraps a loaded BertModel and tokenizer instead."""

    def __init__(self, model=None, tokenizer: Optional[BertTokenizer] = None, pooling: Sequence[str] = ("mean",),
                 normalize: bool = False, max_seq_length: Optional[int] = None,
                 prompts: Optional[Dict[str, str]] = None, default_prompt_name: Optional[str] = None, **load_kwargs):
        if not isinstance(model, BertModel):  # a name or path (None: the default model), as sentence-transformers
            if tokenizer is not None:
                raise TypeError("SentenceEncoder(name_or_path) loads its own tokenizer; pass a BertModel to give one")
            loaded = type(self).from_pretrained(model, **load_kwargs)
            self.__dict__.update(loaded.__dict__)
            return
        if load_kwargs:
            raise TypeError(f"SentenceEncoder(model, ...) got loading options {sorted(load_kwargs)}; they apply to "
                            "SentenceEncoder(name_or_path, ...)")
        if tokenizer is None:
            raise TypeError("SentenceEncoder(model, tokenizer, ...): the tokenizer is missing")
        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.normalize = list(pooling), bool(normalize)
        limit = min(tokenizer.model_max_length, model.config.max_position_embeddings)
        self.max_seq_length = min(max_seq_length or limit, limit)
        # sentence-transformers' prompts: text put before each sentence, by name ("query": "query: ")
        prompts = {} if prompts is None else prompts
        if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
            raise TypeError(f"prompts={prompts!r}; expected a dict of prompt name -> prompt text (str -> str)")
        self.prompts, self.default_prompt_name = dict(prompts), default_prompt_name
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise ValueError(f"Default prompt name '{default_prompt_name}' not found in the configured prompts "
                             f"dictionary with keys {list(self.prompts)!r}.")

    @classmethod
    def from_pretrained(cls, name_or_path=None, *, dtype="float32", kernels="numba", **kwargs) -> "SentenceEncoder":
        """The model, its tokenizer and its sentence-transformers pipeline (defaults: mean pooling,
        no normalization, the model's length limit). Keyword arguments go to BertModel.from_pretrained."""
        model_dir = resolve_model_dir(name_or_path, **{k: kwargs.pop(k) for k in
                                                       ("revision", "cache_dir", "local_files_only") if k in kwargs})
        st = read_st_config(model_dir)
        model = BertModel.from_pretrained(model_dir, dtype=dtype, kernels=kernels, add_pooling_layer=False, **kwargs)
        tokenizer = BertTokenizer.from_pretrained(model_dir)
        enc = cls.__new__(cls)
        SentenceEncoder.__init__(enc, model, tokenizer, st["pooling"], st["normalize"], st["max_seq_length"],
                                 st["prompts"], st["default_prompt_name"])
        logger.debug("SentenceEncoder %s: pooling %s, normalize %s, max_seq_length %d", model_dir, enc.pooling,
                     enc.normalize, enc.max_seq_length)
        return enc

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size * len(self.pooling)

    def encode(self, sentences: Union[str, Sequence[str]], batch_size: int = 32,
               show_progress_bar: Optional[bool] = None, output_value: str = "sentence_embedding",
               convert_to_numpy: bool = True, convert_to_tensor: bool = False, normalize_embeddings: bool = False,
               pooling: Optional[str] = None, normalize: Optional[bool] = None, prompt_name: Optional[str] = None,
               prompt: Optional[str] = None):
        """float32 [N, H], rows in input order (a single string gives [H]), as sentence-transformers.

        sentence-transformers' arguments: ``normalize_embeddings=True`` normalizes to unit length
        (the checkpoint's Normalize module applies either way); ``convert_to_numpy=False`` gives a
        list of [H] arrays; ``output_value="token_embeddings"`` gives each sentence's [n_i, H] token
        vectors (its valid tokens). ``convert_to_tensor=True`` is an error: minibert returns NumPy.
        ``prompt`` (text) or ``prompt_name`` (a key of ``prompts``, from the checkpoint's
        config_sentence_transformers.json) goes before every sentence; neither: the checkpoint's
        ``default_prompt_name``, if any.
        minibert's own: ``pooling`` None (the checkpoint's), "mean", "cls", "max" or
        "mean_sqrt_len"; ``normalize`` None (the checkpoint's), True or False. Sentences longer
        than ``max_seq_length`` tokens are truncated, as sentence-transformers does. Batches are
        formed from sentences sorted by length, so little is spent on padding."""
        if convert_to_tensor:
            raise ValueError("convert_to_tensor=True: minibert has no torch; its embeddings are NumPy arrays "
                             "(torch.from_numpy(emb) makes a tensor of them)")
        if output_value not in ("sentence_embedding", "token_embeddings"):
            raise ValueError(f"output_value={output_value!r}; expected 'sentence_embedding' or 'token_embeddings'")
        if normalize_embeddings and normalize is None:
            normalize = True
        texts, single = _texts(sentences, batch_size)
        texts = self.with_prompt(texts, prompt_name, prompt)
        if output_value == "token_embeddings":
            return self._token_embeddings(texts, single, batch_size)
        out = self._encode(texts, single, batch_size, pooling, normalize, bool(show_progress_bar))
        return out if convert_to_numpy or out.ndim == 1 else list(out)

    def with_prompt(self, texts: List[str], prompt_name: Optional[str] = None,
                    prompt: Optional[str] = None) -> List[str]:
        """``texts`` with the prompt before each, chosen as sentence-transformers chooses it:
        ``prompt``, else the prompt named ``prompt_name``, else the default prompt (if any)."""
        if prompt is not None:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt={prompt!r}; expected a str (the text put before each sentence)")
            if prompt_name is not None:
                logger.warning("Encode with either a `prompt`, a `prompt_name`, or neither, but not both. "
                               "Ignoring the `prompt_name` in favor of `prompt`.")
        elif prompt_name is not None:
            if not isinstance(prompt_name, str):
                raise TypeError(f"prompt_name={prompt_name!r}; expected a str, one of {list(self.prompts)!r}")
            if prompt_name not in self.prompts:
                raise ValueError(f"Prompt name '{prompt_name}' not found in the configured prompts dictionary with "
                                 f"keys {list(self.prompts)!r}.")
            prompt = self.prompts[prompt_name]
        elif self.default_prompt_name is not None:
            prompt = self.prompts[self.default_prompt_name]
        return [prompt + t for t in texts] if prompt else texts

    def _token_embeddings(self, texts, single, batch_size):
        out = []
        for s in range(0, len(texts), batch_size):
            x = self.tokenizer(texts[s:s + batch_size], padding=True, truncation=True, max_length=self.max_seq_length)
            h = self.model.run(**x, skip_padding=True)["last_hidden_state"]
            out += [h[i, m.astype(bool)].astype(np.float32) for i, m in enumerate(x["attention_mask"])]
        return out[0] if single else out

    def _encode(self, texts, single, batch_size, pooling, normalize, show_progress_bar) -> np.ndarray:
        if pooling is not None and pooling not in POOLINGS:
            raise ValueError(f"pooling={pooling!r}; expected one of {POOLINGS} or None (the checkpoint's)")
        modes = [pooling] if pooling is not None else self.pooling
        norm = self.normalize if normalize is None else bool(normalize)
        dim = self.model.config.hidden_size * len(modes)
        if not texts:
            return np.zeros((0, dim), dtype=np.float32)

        lengths = self._lengths(texts)
        warn_truncated(lengths, self.max_seq_length)
        # longest first (as truncated): equal lengths share a batch
        order = np.argsort(-np.minimum(lengths, self.max_seq_length), kind="stable")
        result = np.empty((len(texts), dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        if show_progress_bar:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="batches", unit="batch")
        for s in starts:
            idx = order[s:s + batch_size]
            x = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_seq_length)
            result[idx] = self._pooled(x, modes, norm)
        return result[0] if single else result

    def _pooled(self, x, modes, norm) -> np.ndarray:
        """A tokenized batch (``input_ids``, ``token_type_ids``, ``attention_mask`` [b, T]) -> [b, dim]."""
        # packed (skip_padding): the pooling below never reads padding positions
        h = self.model.run(**x, skip_padding=True)["last_hidden_state"]  # [b, T, H]
        v = np.concatenate([pool(m, h, x["attention_mask"]) for m in modes], axis=-1)  # [b, dim]
        return P.normalize(v) if norm else v

    def _lengths(self, texts: List[str], chunk: int = 4096) -> np.ndarray:
        """Each text's length in tokens before truncation (tokenized in chunks to bound memory)."""
        parts = [self.tokenizer.lengths(texts[s:s + chunk]) for s in range(0, len(texts), chunk)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def similarity(self, a, b=None) -> np.ndarray:
        """Cosine similarity matrix [N, M] between ``a`` and ``b`` (default: ``a``), each either
        embeddings ([N, H] or [H], as sentence-transformers' ``similarity``) or texts to encode."""
        ea = P.normalize(self._as_embeddings(a, "a"))
        eb = ea if b is None else P.normalize(self._as_embeddings(b, "b"))
        return ea @ eb.T

    def _as_embeddings(self, x, name) -> np.ndarray:  # -> float64 [N, H]
        if isinstance(x, str):
            return self.encode([x]).astype(np.float64)
        if isinstance(x, np.ndarray) or (isinstance(x, (list, tuple)) and x and not isinstance(x[0], str)):
            e = np.asarray(x, dtype=np.float64)
            if e.ndim == 1:
                e = e[None]
            if e.ndim != 2 or e.shape[1] != self.dim:
                raise ValueError(f"similarity: {name} has shape {e.shape}; expected embeddings [N, {self.dim}] "
                                 "(or [H]) or a list of texts")
            return e
        return self.encode(list(x)).astype(np.float64)

    def __repr__(self):
        return (f"SentenceEncoder({self.model.name_or_path!r}, pooling={self.pooling}, normalize={self.normalize}, "
                f"max_seq_length={self.max_seq_length})")
