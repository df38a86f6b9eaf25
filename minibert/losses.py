"""The losses transformers' task models return when given labels, in NumPy (float64 accumulation).

Each checks its labels first: an out-of-range class id would index garbage, and a batch whose
labels are all ``ignore_index`` has no defined mean (torch returns NaN there; we raise).
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


def log_softmax(logits):  # [N, C] -> [N, C], float64
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def class_labels(name: str, labels, shape, num_classes: int, ignore_index=IGNORE_INDEX) -> np.ndarray:
    """``labels`` as int64 of ``shape``, each in [0, num_classes) or ``ignore_index``."""
    arr = np.asarray(labels)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} has dtype {arr.dtype}; expected integer class ids")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} has shape {arr.shape}; expected {tuple(shape)}")
    bad = ((arr < 0) | (arr >= num_classes)) & (arr != ignore_index)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} contains {arr[idx]} at {list(idx)}; expected a class id in "
                         f"[0, {num_classes}) or {ignore_index} (ignored)")
    return arr.astype(np.int64)


def cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, what="labels") -> np.float64:
    """Mean over the positions whose label is not ``ignore_index``: [..., C], [...] -> scalar."""
    C = logits.shape[-1]
    logp = log_softmax(logits.reshape(-1, C))
    y = labels.reshape(-1)
    keep = y != ignore_index
    if not keep.any():
        raise ValueError(f"every entry of {what} is {ignore_index} (ignored): the mean loss is undefined")
    return -logp[keep, y[keep]].mean()


def mse(pred, target) -> np.float64:
    return np.mean((pred.astype(np.float64) - target.astype(np.float64)) ** 2)


def bce_with_logits(logits, target) -> np.float64:
    x, y = logits.astype(np.float64), target.astype(np.float64)
    # max(x, 0) - x·y + log(1 + e^-|x|): the stable form torch uses
    return np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
