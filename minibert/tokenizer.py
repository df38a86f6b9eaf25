"""BertTokenizer: transformers' tokenizer call on top of the ``tokenizers`` library.

Built from tokenizer.json when the checkpoint has one, else from vocab.txt (+ tokenizer_config.json)
with the library's own BERT normalizer, pre-tokenizer, WordPiece model and post-processor.
A padding or truncation setting stored inside tokenizer.json (all-MiniLM-L6-v2 pads everything to
128) is dropped at load: as in transformers, each call's arguments decide.

Calls return :class:`BatchEncoding`: int64 NumPy arrays [B, T] (a single string is a batch of one,
as transformers gives with ``return_tensors="np"``).
"""
from __future__ import annotations

import json
import os
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from .hub import resolve_model_dir

# transformers treats a model_max_length above this as "no limit"
_NO_LIMIT = int(1e20)
_TRUNCATION = {"longest_first", "only_first", "only_second"}
_SPECIALS = ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token")
_DEFAULT_SPECIALS = {"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]",
                     "mask_token": "[MASK]"}


class BatchEncoding(dict):
    """A dict of int64 arrays (input_ids, token_type_ids, attention_mask) that also allows
    attribute access: ``x.attention_mask``. ``model(**x)`` passes it straight to the model."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no field {name!r}; fields: {list(self)}") from None

    def __setattr__(self, name, value):
        self[name] = value

    def __repr__(self):
        return "BatchEncoding(" + ", ".join(f"{k}: shape {tuple(v.shape)}" for k, v in self.items()) + ")"

    def to(self, device):
        """``self`` for the CPU (``"cpu"`` or a ``torch.device("cpu")``), as transformers' ``.to``;
        minibert runs on the CPU only, so any other device is an error."""
        kind = getattr(device, "type", device)
        if kind != "cpu" or (not isinstance(device, str) and getattr(device, "index", None) not in (None, 0)):
            raise ValueError(f"BatchEncoding.to({device!r}): minibert runs on the CPU only; use 'cpu' "
                             "(or drop the .to call)")
        return self


def _read_json(path: Path) -> Dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        d = json.load(f)
    return d if isinstance(d, dict) else {}


def _side(name: str, value) -> str:
    if value not in ("right", "left"):
        raise ValueError(f"{name}={value!r}; expected 'right' or 'left'")
    return value


def _token_str(v) -> Optional[str]:
    # special tokens are saved as plain strings or as {"content": "[CLS]", ...}
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


class BertTokenizer:
    """WordPiece tokenizer with transformers' call: ``tokenizer(text, text_pair=None, padding=False,
    truncation=None, max_length=None, return_tensors=None, ...)``."""

    def __init__(self, backend, *, model_max_length: Optional[int] = None, special_tokens: Optional[Dict] = None,
                 name_or_path: Optional[str] = None, padding_side: str = "right", truncation_side: str = "right"):
        from tokenizers import Tokenizer

        if not isinstance(backend, Tokenizer):
            raise TypeError(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        backend.no_padding()
        backend.no_truncation()
        self._tok = backend  # never reconfigured: each padding/truncation setting has a copy (_configured)
        self._configs: Dict = {}
        self._lock = threading.Lock()
        self.model_max_length = model_max_length if model_max_length is not None else _NO_LIMIT
        self.name_or_path = name_or_path
        # transformers' attributes, settable later as there: which end gets the padding, which the cut
        self.padding_side, self.truncation_side = _side("padding_side", padding_side), \
            _side("truncation_side", truncation_side)
        specials = {**_DEFAULT_SPECIALS, **(special_tokens or {})}
        for name in _SPECIALS:
            setattr(self, name, specials.get(name))

    # -- loading --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path=None, **kwargs) -> "BertTokenizer":
        """Load from a directory with tokenizer.json or vocab.txt, or a Hub repo id (None: the default model).

        Keyword arguments override tokenizer_config.json (e.g. ``model_max_length=256``,
        ``do_lower_case=False`` for a vocab.txt-only checkpoint)."""
        d = resolve_model_dir(name_or_path)
        cfg = {**_read_json(d / "tokenizer_config.json"), **kwargs}
        specials = {}
        for source in (cfg, _read_json(d / "special_tokens_map.json")):
            for name in _SPECIALS:
                s = _token_str(source.get(name))
                if s is not None:
                    specials.setdefault(name, s)
        specials = {**_DEFAULT_SPECIALS, **specials}
        if (d / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            try:
                backend = Tokenizer.from_file(str(d / "tokenizer.json"))
            except Exception as e:  # the Rust library raises a bare Exception
                raise ValueError(f"{d / 'tokenizer.json'} could not be read as a tokenizer: {e}") from None
        elif (d / "vocab.txt").is_file():
            backend = _from_vocab(d / "vocab.txt", cfg, specials)
        else:
            raise FileNotFoundError(f"{d} has neither tokenizer.json nor vocab.txt")
        mml = cfg.get("model_max_length")
        if not isinstance(mml, int) or isinstance(mml, bool) or mml <= 0 or mml > _NO_LIMIT:
            mml = None
        name = os.fspath(name_or_path) if name_or_path is not None else str(d)
        return cls(backend, model_max_length=mml, special_tokens=specials, name_or_path=name,
                   padding_side=cfg.get("padding_side", "right"), truncation_side=cfg.get("truncation_side", "right"))

    # -- vocabulary -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> Dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)

    def __getattr__(self, name):
        # cls_token_id, sep_token_id, pad_token_id, unk_token_id, mask_token_id
        if name.endswith("_token_id") and name[: -len("_id")] in _SPECIALS:
            token = self.__dict__.get(name[: -len("_id")])
            return None if token is None else self._tok.token_to_id(token)
        raise AttributeError(f"BertTokenizer has no attribute {name!r}")

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        if isinstance(ids, (int, np.integer)):
            return self._tok.id_to_token(int(ids))
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tok.id_to_token(int(i)) for i in ids if int(i) not in special]

    def convert_tokens_to_ids(self, tokens):
        unk = self.unk_token_id
        if isinstance(tokens, str):
            i = self._tok.token_to_id(tokens)
            return unk if i is None else i
        return [self.convert_tokens_to_ids(t) for t in tokens]

    @property
    def all_special_tokens(self) -> List[str]:
        return [getattr(self, n) for n in _SPECIALS if getattr(self, n) is not None]

    @property
    def all_special_ids(self) -> List[int]:
        return [i for i in (self._tok.token_to_id(t) for t in self.all_special_tokens) if i is not None]

    # -- text -> ids ----------------------------------------------------------------------------
    def tokenize(self, text: str, text_pair: Optional[str] = None) -> List[str]:
        """Word pieces without special tokens."""
        _check_text("text", text, single=True)
        enc = self._tok.encode(text, text_pair, add_special_tokens=False)
        return enc.tokens

    def encode(self, text: str, text_pair: Optional[str] = None, add_special_tokens: bool = True,
               truncation=None, max_length: Optional[int] = None) -> List[int]:
        """Ids of one text (or pair), with [CLS]/[SEP] unless ``add_special_tokens=False``."""
        _check_text("text", text, single=True)
        if text_pair is not None:
            _check_text("text_pair", text_pair, single=True)
        x = self(text, text_pair, add_special_tokens=add_special_tokens, truncation=truncation, max_length=max_length)
        return [int(i) for i in x["input_ids"][0]]

    def __call__(self, text: Union[str, Sequence[str]], text_pair: Union[str, Sequence[str], None] = None, *,
                 add_special_tokens: bool = True, padding: Union[bool, str] = False, truncation=None,
                 max_length: Optional[int] = None, pad_to_multiple_of: Optional[int] = None,
                 return_tensors: Optional[str] = None, return_token_type_ids: Optional[bool] = None,
                 return_attention_mask: Optional[bool] = None) -> BatchEncoding:
        if return_tensors not in (None, "np"):
            raise ValueError(
                f"return_tensors={return_tensors!r} is not supported: minibert returns NumPy arrays; "
                "use return_tensors='np' or leave it out"
            )
        texts, pairs = _batch(text, text_pair)
        pad, trunc, max_length = self._strategies(padding, truncation, max_length, pad_to_multiple_of)

        if pad and self.pad_token_id is None:
            raise ValueError(f"padding={padding!r} needs a pad token, and {self.pad_token!r} is not in the vocabulary")
        tok = self._configured(trunc, max_length, pad, pad_to_multiple_of)
        inputs = texts if pairs is None else list(zip(texts, pairs))
        try:
            encs = tok.encode_batch(inputs, add_special_tokens=add_special_tokens)
        except Exception as e:  # the Rust library raises a bare Exception (e.g. pair truncation impossible)
            raise ValueError(f"tokenization failed: {e}") from None

        lengths = {len(e.ids) for e in encs}
        if len(lengths) > 1:
            raise ValueError(
                f"the texts have different lengths in tokens ({min(lengths)} to {max(lengths)}) and padding is off; "
                "minibert returns arrays, so pass padding=True (or padding='max_length')"
            )
        T = lengths.pop() if lengths else 0
        out = BatchEncoding()
        out["input_ids"] = np.array([e.ids for e in encs], dtype=np.int64).reshape(len(encs), T)
        if return_token_type_ids is not False:
            out["token_type_ids"] = np.array([e.type_ids for e in encs], dtype=np.int64).reshape(len(encs), T)
        if return_attention_mask is not False:
            out["attention_mask"] = np.array([e.attention_mask for e in encs], dtype=np.int64).reshape(len(encs), T)
        return out

    def lengths(self, texts: List[str]) -> np.ndarray:
        """Each text's length in tokens, special tokens included, before any truncation: int64 [N]
        (no padding, so one long text costs no memory for the others)."""
        try:
            encs = self._tok.encode_batch(list(texts))
        except Exception as e:  # the Rust library raises a bare Exception
            raise ValueError(f"tokenization failed: {e}") from None
        return np.array([len(e.ids) for e in encs], dtype=np.int64)

    def token_spans(self, texts: Sequence[str], add_special_tokens: bool = True) -> List[List[Dict]]:
        """Per text, its tokens as ``{"id", "text", "special", "start", "stop"}`` (text-embeddings-
        inference's /tokenize shape): ``text`` the characters ``start:stop`` of the input a word piece
        came from; special tokens have their own text and no span. No truncation."""
        texts = list(texts)
        for i, t in enumerate(texts):
            _check_text(f"texts[{i}]", t, single=True)
        encs = self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        out = []
        for text, e in zip(texts, encs):
            out.append([{"id": int(i), "text": tok, "special": True, "start": None, "stop": None} if sp else
                        {"id": int(i), "text": text[a:b], "special": False, "start": int(a), "stop": int(b)}
                        for i, tok, (a, b), sp in zip(e.ids, e.tokens, e.offsets, e.special_tokens_mask)])
        return out

    def _configured(self, trunc, max_length, pad, pad_to_multiple_of):
        """A copy of the backend with these truncation and padding settings, made once and never
        changed after: the settings live on the Rust tokenizer, so switching them on one shared
        tokenizer per call would race between threads tokenizing at once."""
        sides = _side("padding_side", self.padding_side), _side("truncation_side", self.truncation_side)
        key = (trunc, max_length, pad, pad_to_multiple_of, sides)
        tok = self._configs.get(key)
        if tok is not None:
            return tok
        tok = _sharing_copy(self._tok)
        if trunc:
            tok.enable_truncation(max_length, strategy=trunc, direction=sides[1])
        if pad:
            tok.enable_padding(pad_id=self.pad_token_id, pad_token=self.pad_token, pad_type_id=0,
                               length=max_length if pad == "max_length" else None,
                               pad_to_multiple_of=pad_to_multiple_of, direction=sides[0])
        with self._lock:
            if len(self._configs) >= 64:  # many distinct max_length values: start over
                self._configs.clear()
            return self._configs.setdefault(key, tok)

    def _strategies(self, padding, truncation, max_length, pad_to_multiple_of):
        """(padding: None/"longest"/"max_length", truncation: None/strategy, max_length), as transformers decides."""
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length <= 0):
            raise ValueError(f"max_length={max_length!r}; expected a positive integer or None")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of <= 0):
            raise ValueError(f"pad_to_multiple_of={pad_to_multiple_of!r}; expected a positive integer or None")
        # transformers: max_length alone (no padding, truncation unset) turns truncation on
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"
        if padding is True or padding == "longest":
            pad = "longest"
            if max_length is not None and truncation in (None, False, "do_not_truncate"):
                warnings.warn("max_length is ignored when padding=True and truncation is off; "
                              "to pad to max_length use padding='max_length', to cut use truncation=True",
                              stacklevel=3)
        elif padding is False or padding is None or padding == "do_not_pad":
            pad = None
        elif padding == "max_length":
            pad = "max_length"
        else:
            raise ValueError(f"padding={padding!r}; expected True, False, 'longest', 'max_length' or 'do_not_pad'")
        if truncation is True:
            trunc = "longest_first"
        elif truncation in (False, None, "do_not_truncate"):
            trunc = None
        elif truncation in _TRUNCATION:
            trunc = truncation
        else:
            raise ValueError(f"truncation={truncation!r}; expected True, False or one of {sorted(_TRUNCATION)}")
        if max_length is None:
            limit = self.model_max_length if self.model_max_length < _NO_LIMIT else None
            if pad == "max_length":
                if limit is None:
                    pad = None
                max_length = limit
            if trunc:
                if limit is None:
                    trunc = None
                max_length = limit
        return pad, trunc, None if max_length is None else int(max_length)

    # -- ids -> text ----------------------------------------------------------------------------
    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode takes one sequence of ids (1-D); got shape {ids.shape}. Use batch_decode for a batch")
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> List[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def __repr__(self):
        return (f"BertTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"model_max_length={self.model_max_length})")


def _check_text(name, value, single=False):
    if isinstance(value, str):
        return
    raise TypeError(f"{name} must be a string{'' if single else ' or a list of strings'}, got {type(value).__name__}")


def _batch(text, text_pair):
    if isinstance(text, str):
        texts = [text]
        if text_pair is not None and not isinstance(text_pair, str):
            raise TypeError(f"text is one string, so text_pair must be one string too; got {type(text_pair).__name__}")
        pairs = None if text_pair is None else [text_pair]
        return texts, pairs
    if not isinstance(text, (list, tuple)):
        raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
    for i, t in enumerate(text):
        if not isinstance(t, str):
            raise TypeError(f"text[{i}] is {type(t).__name__}; expected a string")
    texts = list(text)
    if text_pair is None:
        return texts, None
    if isinstance(text_pair, str) or not isinstance(text_pair, (list, tuple)):
        raise TypeError(f"text is a list, so text_pair must be a list of the same length; got {type(text_pair).__name__}")
    if len(text_pair) != len(texts):
        raise ValueError(f"text has {len(texts)} items but text_pair has {len(text_pair)}; they must match")
    for i, t in enumerate(text_pair):
        if not isinstance(t, str):
            raise TypeError(f"text_pair[{i}] is {type(t).__name__}; expected a string")
    return texts, list(text_pair)


def _from_vocab(vocab: Path, cfg: Dict, specials: Dict):
    """A BERT WordPiece tokenizer built from vocab.txt with the tokenizers library's components."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    backend = Tokenizer(WordPiece.from_file(str(vocab), unk_token=specials["unk_token"]))
    lower = cfg.get("do_lower_case", True)
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=cfg.get("tokenize_chinese_chars", True),
        strip_accents=cfg.get("strip_accents"),
        lowercase=lower,
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_tok, sep_tok = specials["cls_token"], specials["sep_token"]
    cls_id, sep_id = backend.token_to_id(cls_tok), backend.token_to_id(sep_tok)
    if cls_id is None or sep_id is None:
        raise ValueError(f"{vocab} lacks the special tokens {cls_tok!r} / {sep_tok!r}")
    backend.post_processor = processors.BertProcessing((sep_tok, sep_id), (cls_tok, cls_id))
    backend.decoder = decoders.WordPiece(prefix="##")
    # special tokens are matched whole in the input text, as transformers does
    backend.add_special_tokens([t for t in specials.values() if t is not None and backend.token_to_id(t) is not None])
    return backend


def checkpoint_tokenizer(name_or_path) -> Optional[BertTokenizer]:
    """The tokenizer stored with a checkpoint, or None when it has no tokenizer files."""
    try:
        return BertTokenizer.from_pretrained(name_or_path)
    except OSError:
        return None


def _sharing_copy(backend):
    """A copy of ``backend`` (a tokenizers.Tokenizer) whose settings can change apart, sharing its
    model and other parts (read-only while encoding): a full copy holds its own vocabulary, ~6 MB
    for BERT's. Checked against the original's JSON (every part and added token); if that differs,
    a full copy from the JSON."""
    from tokenizers import Tokenizer

    text = backend.to_str()
    tok = Tokenizer(backend.model)
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        value = getattr(backend, part)
        if value is not None:
            setattr(tok, part, value)
    for _, token in sorted(backend.get_added_tokens_decoder().items()):
        (tok.add_special_tokens if token.special else tok.add_tokens)([token])
    return tok if tok.to_str() == text else Tokenizer.from_str(text)
