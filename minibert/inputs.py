"""Checking what a caller hands to the model, before any array indexing can go wrong.

NumPy would silently wrap an id of -1 to the last embedding row and a float id would be
truncated; here every such input raises an error naming the argument and the bad value.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .config import BertConfig


def _as_array(name: str, value) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except ValueError as e:  # ragged nested lists
        raise ValueError(f"{name} must be a rectangular array (were the sequences padded?): {e}") from None
    if arr.dtype == object:
        raise ValueError(f"{name} must be a rectangular array of numbers; got ragged or non-numeric data")
    return arr


def _as_int_array(name: str, value) -> np.ndarray:
    arr = _as_array(name, value)
    if arr.dtype.kind == "b":
        raise TypeError(f"{name} has dtype bool; expected integer ids")
    if arr.dtype.kind not in "iu" and arr.size:
        raise TypeError(f"{name} has dtype {arr.dtype}; expected integers")
    return arr


def _first_bad(arr: np.ndarray, bad: np.ndarray) -> Tuple[int, tuple]:
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    return arr[idx], idx


def _check_range(name: str, arr: np.ndarray, upper: int, what: str):
    if arr.size == 0:
        return
    bad = (arr < 0) | (arr >= upper)
    if bad.any():
        value, idx = _first_bad(arr, bad)
        raise ValueError(f"{name} contains {value} at {list(idx)}; expected 0 <= {name} < {upper} ({what})")


def prepare_inputs(config: BertConfig, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                   dtype=np.float32, inputs_embeds=None):
    """Checked ``(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)``: int64
    [B, T] (the mask in ``dtype``), and either ``input_ids`` or ``inputs_embeds`` ([B, T, H] in
    ``dtype``) None, as the caller gave one or the other. A single sequence becomes a batch of one."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give either input_ids or inputs_embeds" if input_ids is None else
                         "input_ids and inputs_embeds were both given; give one of them, as in transformers")
    embeds = None
    if inputs_embeds is not None:
        embeds = _as_array("inputs_embeds", inputs_embeds)
        if embeds.dtype.kind not in "iuf":
            raise TypeError(f"inputs_embeds has dtype {embeds.dtype}; expected floats")
        one = embeds.ndim == 2
        if one:
            embeds = embeds[None]
        if embeds.ndim != 3 or embeds.shape[2] != config.hidden_size:
            raise ValueError(f"inputs_embeds has shape {np.shape(inputs_embeds)}; expected [B, T, {config.hidden_size}] "
                             f"or [T, {config.hidden_size}] (hidden_size {config.hidden_size})")
        embeds = np.ascontiguousarray(embeds, dtype=dtype)
        ids = np.zeros(embeds.shape[:2], dtype=np.int64)  # stands in for the shape checks below; never looked up
        name = "inputs_embeds"
    else:
        ids = _as_int_array("input_ids", input_ids)
        one = ids.ndim == 1
        if one:
            ids = ids[None, :]
        if ids.ndim != 2:
            raise ValueError(f"input_ids has {ids.ndim} dimensions (shape {ids.shape}); expected [T] or [B, T]")
        _check_range("input_ids", ids, config.vocab_size, f"vocab_size is {config.vocab_size}")
        name = "input_ids"
    B, T = ids.shape
    if T == 0:
        raise ValueError(f"{name} has shape {np.shape(inputs_embeds if embeds is not None else input_ids)}: sequences "
                         "of 0 tokens; every sequence needs at least one token")

    def same_shape(what, value):
        arr = _as_int_array(what, value) if what != "attention_mask" else _as_array(what, value)
        if one and arr.ndim == 1:
            arr = arr[None, :]
        if arr.shape != ids.shape:
            raise ValueError(f"{what} has shape {arr.shape}; expected {ids.shape}, the shape of {name}")
        return arr

    if attention_mask is None:
        mask = np.ones((B, T), dtype=dtype)
    else:
        m = same_shape("attention_mask", attention_mask)
        if m.dtype.kind not in "biuf":
            raise TypeError(f"attention_mask has dtype {m.dtype}; expected 0/1 integers, bools or floats")
        bad = None if (m == 1).all() else (m != 0) & (m != 1)  # all ones, no padding: the common case
        if bad is not None and bad.any():
            value, idx = _first_bad(m, bad)
            raise ValueError(f"attention_mask contains {value} at {list(idx)}; expected only 0 (padding) and 1 (token)")
        mask = m.astype(dtype)

    if token_type_ids is None:
        tt = np.zeros((B, T), dtype=np.int64)
    else:
        tt = same_shape("token_type_ids", token_type_ids)
        _check_range("token_type_ids", tt, config.type_vocab_size, f"type_vocab_size is {config.type_vocab_size}")

    P = config.max_position_embeddings
    if position_ids is None:
        if T > P:
            raise ValueError(
                f"{name} has {T} tokens per sequence; the model takes at most max_position_embeddings={P} "
                "(truncate, e.g. tokenizer(..., truncation=True, max_length=...))"
            )
        pos = np.empty((B, T), dtype=np.int64)
        pos[:] = np.arange(T)  # a real [B, T] array: the model flattens it without a copy
    else:
        pos = _as_int_array("position_ids", position_ids)
        if pos.ndim == 1:
            pos = pos[None, :]
        if pos.ndim != 2 or pos.shape[1] != T or pos.shape[0] not in (1, B):
            raise ValueError(f"position_ids has shape {np.shape(position_ids)}; expected {ids.shape} or (1, {T})")
        _check_range("position_ids", pos, P, f"max_position_embeddings is {P}")
        pos = np.broadcast_to(pos, (B, T))

    ids = None if embeds is not None else ids.astype(np.int64, copy=False)
    return ids, mask, tt.astype(np.int64, copy=False), pos.astype(np.int64, copy=False), embeds


def check_head_mask(head_mask, n_layers: int, n_head: int, dtype):
    """``head_mask`` as [L, nH] in ``dtype``, or None: [nH] applies to every layer, [L, nH] per
    layer (transformers 4's shapes; 1 keeps a head, 0 removes it, other values weigh it)."""
    if head_mask is None:
        return None
    hm = _as_array("head_mask", head_mask)
    if not (np.issubdtype(hm.dtype, np.number) or hm.dtype == np.bool_) or np.iscomplexobj(hm):
        raise TypeError(f"head_mask must hold real numbers; got dtype {hm.dtype}")
    if hm.shape not in ((n_head,), (n_layers, n_head)):
        raise ValueError(f"head_mask has shape {hm.shape}; expected ({n_head},) (every layer) or "
                         f"({n_layers}, {n_head}) (one row per layer): the model has {n_layers} layers of "
                         f"{n_head} heads")
    hm = hm.astype(dtype)
    if not np.isfinite(hm).all():
        raise ValueError(f"head_mask holds a non-finite value ({hm[~np.isfinite(hm)][0]}); expected finite weights")
    return np.ascontiguousarray(np.broadcast_to(hm, (n_layers, n_head)))
