"""An attention viewer in one self-contained HTML file: head view, model view, neuron view.

``attention_html(model, tokenizer, text)`` returns the page; ``show(...)`` wraps it for Jupyter.
Everything is inline (script, style, data), so the page works opened from ``file://`` with no
network. The data: attention probabilities as bytes (p·255 rounded: within 2e-3 of the model's),
queries and keys as float16 (within 2^-11 relative), base64 in the page. ``window.minibert`` gives
scripts and tests ``tokens``, ``segments``, ``layers``, ``heads``, ``attention(l, h)``,
``query(l, h)`` and ``key(l, h)``.
"""
from __future__ import annotations

import base64
import html
import json
from importlib import resources
from typing import Optional, Sequence

import numpy as np

__all__ = ["attention_html", "show", "AttentionView"]


def _layers(layers, L) -> list:
    if layers is None:
        return list(range(L))
    try:
        chosen = [int(i) for i in layers]
    except (TypeError, ValueError):
        raise TypeError(f"layers must be a list of layer indices; got {layers!r}") from None
    bad = [i for i in chosen if not -L <= i < L]
    if bad or not chosen:
        raise ValueError(f"layers {layers!r}: the model has {L} layers (0 .. {L - 1}); give at least one of them")
    return sorted({i % L for i in chosen})


def _label(name) -> str:  # the model's name for the page: the repo id of the packaged default, not its folder
    from pathlib import Path

    from .hub import DEFAULT_MODEL, packaged_model_dir

    if not name:
        return ""
    packaged = packaged_model_dir()
    if packaged is not None and Path(name).resolve() == packaged.resolve():
        return DEFAULT_MODEL
    return str(name)


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def attention_data(model, tokenizer, text: str, text_pair: Optional[str] = None,
                   layers: Optional[Sequence[int]] = None, max_length: Optional[int] = None) -> dict:
    """What the page shows, as JSON-ready values: the tokens, their segments, and per chosen layer
    the attention [nH, T, T] (uint8), queries and keys [nH, T, dH] (float16), base64."""
    if not isinstance(text, str) or (text_pair is not None and not isinstance(text_pair, str)):
        raise TypeError("text and text_pair must be strings")
    bert = getattr(model, "bert", model)  # a task model's encoder
    c = bert.config
    L, nH = c.num_hidden_layers, c.num_attention_heads
    chosen = _layers(layers, L)
    limit = min(tokenizer.model_max_length, c.max_position_embeddings)
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
            raise ValueError(f"max_length must be an integer of at least 2; got {max_length!r}")
        limit = min(limit, int(max_length))
    x = tokenizer(text, text_pair, truncation=True, max_length=limit)
    names = [f"encoder.layer.{i}.attention.self.{n}" for i in chosen for n in ("query", "key", "probs")]
    out = bert(**x, capture=names)
    cap = out.captures
    att = np.stack([cap[f"encoder.layer.{i}.attention.self.probs"][0] for i in chosen])  # [nL, nH, T, T]
    q = np.stack([cap[f"encoder.layer.{i}.attention.self.query"][0] for i in chosen])  # [nL, nH, T, dH]
    k = np.stack([cap[f"encoder.layer.{i}.attention.self.key"][0] for i in chosen])
    tokens = tokenizer.convert_ids_to_tokens(x["input_ids"][0])
    tt = x.get("token_type_ids")
    segments = [int(s) for s in (tt[0] if tt is not None else np.zeros(len(tokens), dtype=int))]
    return {
        "model": _label(getattr(bert, "name_or_path", None)),
        "text": text, "text_pair": text_pair,
        "tokens": tokens, "segments": segments, "layers": chosen, "heads": [list(range(nH)) for _ in chosen],
        "T": len(tokens), "dH": int(q.shape[-1]), "scale": float(q.shape[-1] ** -0.5),
        "attention": _b64(np.rint(np.clip(att, 0, 1) * 255).astype(np.uint8)),
        "query": _b64(q.astype("<f2")), "key": _b64(k.astype("<f2")),
    }


def attention_html(model, tokenizer, text: str, text_pair: Optional[str] = None,
                   layers: Optional[Sequence[int]] = None, max_length: Optional[int] = None) -> str:
    """One self-contained HTML page showing ``model``'s attention on ``text`` (and ``text_pair``):
    head view, model view, neuron view, and a sentence-pair filter. ``layers``: the layer indices
    to include (default all; fewer make a smaller file). ``max_length``: truncate the tokens there
    (default the model's limit); bert-base at 128 tokens, all 144 heads, is about 10 MB."""
    data = attention_data(model, tokenizer, text, text_pair, layers, max_length)
    page = resources.files("minibert").joinpath("viz.html").read_text(encoding="utf-8")
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")  # safe inside <script>
    title = html.escape(f"attention: {text[:60]}" + (f" / {text_pair[:40]}" if text_pair else ""))
    return page.replace("__TITLE__", title).replace("__DATA__", payload)


class AttentionView:
    """The page, shown by Jupyter (``_repr_html_``) or saved with :meth:`save`."""

    def __init__(self, page: str):
        self.html = page

    def _repr_html_(self) -> str:  # an iframe: the page's script and ids stay out of the notebook's
        return (f'<iframe srcdoc="{html.escape(self.html, quote=True)}" style="width:100%;height:720px;'
                f'border:1px solid #ddd" sandbox="allow-scripts"></iframe>')

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.html)


def show(model, tokenizer, text: str, text_pair: Optional[str] = None,
         layers: Optional[Sequence[int]] = None, max_length: Optional[int] = None) -> AttentionView:
    """:func:`attention_html` for a notebook: the returned object displays itself."""
    return AttentionView(attention_html(model, tokenizer, text, text_pair, layers, max_length))
