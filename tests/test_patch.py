"""patch= and head_mask= against transformers with torch forward hooks that return the same
replacement, and, for the scores and probabilities (no module of their own in transformers), a
hook on the self-attention that recomputes its context from the hooked q, k, v."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import minibert
from conftest import TINY, TOL, assert_close, hf_model, make_checkpoint, random_batch

L, nH = TINY["num_hidden_layers"], TINY["num_attention_heads"]
dH = TINY["hidden_size"] // nH


def hf_patched(model, ids, mask, tt, edits, dtype="float32", head_mask=None):
    """transformers' outputs with ``edits`` ({tap name: f(value) -> value}, values in our tap layout,
    torch tensors) applied by forward hooks; ``head_mask`` [L, nH] applied to the probabilities
    as transformers 4 did."""
    fdt = getattr(torch, dtype)
    mask_t = torch.as_tensor(mask)
    add = torch.zeros(mask_t.shape, dtype=fdt).masked_fill(~mask_t.bool(), torch.finfo(fdt).min)[:, None, None, :]
    stash, handles = {}, []

    def heads(t):  # [B, T, H] -> [B, nH, T, dH]
        return t.view(t.shape[0], t.shape[1], nH, dH).transpose(1, 2)

    def merge(t):  # [B, nH, T, dH] -> [B, T, H]
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], nH * dH)

    def edit(name, to_ours=lambda t: t, from_ours=lambda t: t, key=None):
        def hook(module, args, out):
            ours = to_ours(out)
            if name in edits:
                ours = edits[name](ours)
            if key is not None:
                stash[key] = ours
            return from_ours(ours) if name in edits else None
        return hook

    def attention_hook(i):
        p = f"encoder.layer.{i}.attention.self."

        def hook(module, args, out):
            recompute = p + "scores" in edits or p + "probs" in edits or head_mask is not None
            if not (recompute or p + "context" in edits):
                return None
            ctx = out[0]
            if recompute:
                q, k, v = (stash[(i, n)] for n in ("query", "key", "value"))
                s = q @ k.transpose(-1, -2) * dH ** -0.5 + add
                if p + "scores" in edits:
                    s = edits[p + "scores"](s)
                probs = torch.softmax(s, dim=-1)
                if head_mask is not None:
                    probs = probs * torch.tensor(np.array(head_mask[i]), dtype=fdt)[None, :, None, None]
                if p + "probs" in edits:
                    probs = edits[p + "probs"](probs)
                ctx = merge(probs @ v)
            if p + "context" in edits:
                ctx = edits[p + "context"](ctx)
            return (ctx,) + tuple(out[1:])
        return hook

    handles.append(model.embeddings.register_forward_hook(edit("embeddings")))
    for i, layer in enumerate(model.encoder.layer):
        p = f"encoder.layer.{i}."
        for part in ("query", "key", "value"):
            handles.append(getattr(layer.attention.self, part).register_forward_hook(
                edit(p + "attention.self." + part, heads, merge, key=(i, part))))
        handles.append(layer.attention.self.register_forward_hook(attention_hook(i)))
        handles.append(layer.attention.output.register_forward_hook(edit(p + "attention.output")))
        handles.append(layer.intermediate.register_forward_hook(edit(p + "intermediate")))
        handles.append(layer.output.register_forward_hook(edit(p + "output")))
    if getattr(model, "pooler", None) is not None:
        handles.append(model.pooler.dense.register_forward_hook(edit("pooler.dense")))
    try:
        with torch.no_grad():
            return model(input_ids=torch.as_tensor(ids), attention_mask=mask_t, token_type_ids=torch.as_tensor(tt))
    finally:
        for h in handles:
            h.remove()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("patch"), seed=31)


@pytest.fixture(scope="module")
def batch():
    ids, mask, tt = random_batch(np.random.default_rng(31), TINY, B=3, T=9, pairs=True)
    return ids, mask, tt


TAPS = ["embeddings", "encoder.layer.1.attention.self.query", "encoder.layer.0.attention.self.key",
        "encoder.layer.1.attention.self.value", "encoder.layer.0.attention.self.scores",
        "encoder.layer.1.attention.self.probs", "encoder.layer.0.attention.self.context",
        "encoder.layer.1.attention.output", "encoder.layer.0.intermediate", "encoder.layer.0.output",
        "pooler.dense"]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kernels", ["numba", "numpy"])
@pytest.mark.parametrize("tap", TAPS)
def test_a_function_patch_matches_a_transformers_hook(checkpoint, batch, tap, kernels, dtype):
    """f(value, name) = value·1.5 − 0.25 at one tap (probs: value·0.7; scores: plus an offset per
    key, as a constant would not move the softmax); every output after it against transformers
    with a hook doing the same."""
    ids, mask, tt = batch
    kind = tap.rsplit(".", 1)[-1]
    offset = np.linspace(-1, 1, ids.shape[1]).astype(dtype)
    if kind == "scores":
        ours_f, theirs_f = (lambda v: v + offset), (lambda v: v + torch.as_tensor(offset))
    else:
        ours_f = theirs_f = (lambda v: v * 0.7) if kind == "probs" else (lambda v: v * 1.5 - 0.25)
    model = minibert.BertModel.from_pretrained(checkpoint, kernels=kernels, dtype=dtype)
    ours = model(ids, mask, tt, patch={tap: lambda v, name: ours_f(v)})
    theirs = hf_patched(hf_model(checkpoint, dtype), ids, mask, tt, {tap: theirs_f}, dtype)
    tol = TOL["fp32" if dtype == "float32" else "fp64"]
    assert_close(ours.last_hidden_state, theirs.last_hidden_state.numpy(), tol, f"{tap} last_hidden_state")
    assert_close(ours.pooler_output, theirs.pooler_output.numpy(), tol, f"{tap} pooler_output")
    clean = model(ids, mask, tt)
    moved = np.abs(ours.pooler_output - clean.pooler_output).max()
    assert moved > 1e-3, f"patching {tap} changed nothing ({moved:.2e})"


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
def test_array_patches_broadcast_as_numpy_does(checkpoint, batch, kernels):
    """Arrays of the tap's full shape and of shapes that broadcast to it, several taps at once."""
    ids, mask, tt = batch
    B, T = ids.shape
    rng = np.random.default_rng(3)
    q = rng.standard_normal((B, nH, T, dH)).astype(np.float32)  # the query of layer 0, whole
    v = rng.standard_normal(dH).astype(np.float32)  # one value vector for every head and token
    inter = rng.standard_normal(TINY["intermediate_size"]).astype(np.float32)
    key_bias = np.zeros(T, dtype=np.float32)
    key_bias[2] = -30.0  # key 2 nearly ignored in layer 1
    keep = np.array([1, 0, 1, 1], dtype=np.float32)[:, None, None]  # head 1's probabilities zeroed
    patch = {"encoder.layer.0.attention.self.query": q, "encoder.layer.1.attention.self.value": v,
             "encoder.layer.1.intermediate": inter, "encoder.layer.1.attention.self.scores": key_bias,
             "encoder.layer.0.attention.self.probs": keep}
    edits = {"encoder.layer.0.attention.self.query": lambda t: torch.as_tensor(q),
             "encoder.layer.1.attention.self.value": lambda t: torch.as_tensor(v).expand_as(t),
             "encoder.layer.1.intermediate": lambda t: torch.as_tensor(inter).expand_as(t),
             "encoder.layer.1.attention.self.scores": lambda t: torch.as_tensor(key_bias).expand_as(t),
             "encoder.layer.0.attention.self.probs": lambda t: torch.as_tensor(keep).expand_as(t)}
    model = minibert.BertModel.from_pretrained(checkpoint, kernels=kernels)
    ours = model(ids, mask, tt, patch=patch)
    theirs = hf_patched(hf_model(checkpoint), ids, mask, tt, edits)
    assert_close(ours.last_hidden_state, theirs.last_hidden_state.numpy(), TOL["fp32"], "array patches")
    assert_close(ours.pooler_output, theirs.pooler_output.numpy(), TOL["fp32"], "array patches, pooler")
    np.testing.assert_array_equal(q, patch["encoder.layer.0.attention.self.query"])  # the caller's array untouched


def test_patched_values_come_back_in_captures_and_attentions(checkpoint, batch):
    ids, mask, tt = batch
    model = minibert.BertModel.from_pretrained(checkpoint)
    keep = np.array([1, 0, 0.5, 1], dtype=np.float32)[:, None, None]
    probs = "encoder.layer.1.attention.self.probs"
    out = model(ids, mask, tt, patch={probs: lambda p, name: p * keep, "encoder.layer.0.output": 0.5},
                capture=[probs, "encoder.layer.0.output"], output_attentions=True)
    clean = model(ids, mask, tt, output_attentions=True)
    assert np.all(out.captures["encoder.layer.0.output"] == 0.5)
    np.testing.assert_array_equal(out.captures[probs], out.attentions[1])
    assert np.all(out.attentions[1][:, 1] == 0)
    # a patch holds for its call only: the next call is the clean one, bit for bit
    again = model(ids, mask, tt, output_attentions=True)
    np.testing.assert_array_equal(again.last_hidden_state, clean.last_hidden_state)
    assert model(ids, mask, tt, patch={"encoder.layer.0.output": 0.5}).captures is None


def test_glob_patterns_patch_every_match_and_the_function_gets_each_name(checkpoint, batch):
    ids, mask, tt = batch
    model = minibert.BertModel.from_pretrained(checkpoint)
    seen = []

    def f(value, name):
        seen.append((name, value.shape))
        with pytest.raises(ValueError):
            value[...] = 0  # the tap's value is read-only: a patch returns a new array
        return value * 0.9

    model(ids, mask, tt, patch={"encoder.layer.*.attention.self.probs": f})
    B, T = ids.shape
    assert seen == [(f"encoder.layer.{i}.attention.self.probs", (B, nH, T, T)) for i in range(L)]


def test_patch_on_a_task_model_and_in_packed_mode(checkpoint, batch, tmp_path):
    """A task head sees the patched encoder (logits against transformers); a model in packed
    mode runs a patched call dense, as a captured one."""
    ids, mask, tt = batch
    path = make_checkpoint(tmp_path / "cls", "BertForSequenceClassification", seed=32, num_labels=3)
    g = lambda v: v * 1.5 - 0.25  # noqa: E731
    ours = minibert.BertForSequenceClassification.from_pretrained(path)(
        ids, mask, tt, patch={"encoder.layer.1.output": lambda v, n: g(v)})
    theirs = hf_patched(hf_model(path, cls_name="BertForSequenceClassification").bert, ids, mask, tt,
                        {"encoder.layer.1.output": g})
    hf_cls = hf_model(path, cls_name="BertForSequenceClassification")
    with torch.no_grad():
        logits = hf_cls.classifier(theirs.pooler_output).numpy()
    assert_close(ours.logits, logits, TOL["fp32"], "classifier logits under a patch")
    packed = minibert.BertModel.from_pretrained(checkpoint, skip_padding=True)
    dense = minibert.BertModel.from_pretrained(checkpoint)
    p = {"encoder.layer.0.intermediate": lambda v, n: v * 2}
    np.testing.assert_array_equal(packed(ids, mask, tt, patch=p).last_hidden_state,
                                  dense(ids, mask, tt, patch=p).last_hidden_state)


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
@pytest.mark.parametrize("shape", ["per-layer", "every-layer"])
def test_head_mask_is_transformers_4s(checkpoint, batch, kernels, shape):
    """transformers 4: probs = softmax(scores) · head_mask[layer][head], before P·V; the returned
    attentions are the masked ones."""
    ids, mask, tt = batch
    hm = np.array([[1, 0, 1, 0.5], [0, 1, 1, 1]], dtype=np.float32) if shape == "per-layer" else \
        np.array([1, 1, 0, 1], dtype=np.float32)
    model = minibert.BertModel.from_pretrained(checkpoint, kernels=kernels)
    ours = model(ids, mask, tt, head_mask=hm, output_attentions=True)
    theirs = hf_patched(hf_model(checkpoint), ids, mask, tt, {}, head_mask=np.broadcast_to(hm, (L, nH)))
    assert_close(ours.last_hidden_state, theirs.last_hidden_state.numpy(), TOL["fp32"], "head_mask")
    full = np.broadcast_to(hm, (L, nH))
    for i in range(L):
        for h in range(nH):
            if full[i, h] == 0:
                assert np.all(ours.attentions[i][:, h] == 0), f"layer {i} head {h} not masked"
    ones = model(ids, mask, tt, head_mask=np.ones(nH)).last_hidden_state
    # a head mask runs attention on the NumPy route (BLAS products, the softmax kernel), without
    # it the fused kernel: two kernels' summation orders through two layers, hence kernel_fp32
    assert_close(ones, model(ids, mask, tt).last_hidden_state, TOL["kernel_fp32"], "head_mask of ones")


def test_bad_patches_and_head_masks_are_named(checkpoint, batch):
    ids, mask, tt = batch
    B, T = ids.shape
    model = minibert.BertModel.from_pretrained(checkpoint)
    cases = [
        (dict(patch={"encoder.layer.7.output": 0}), ValueError, "matches no tap"),
        (dict(patch={"encoder.layer.0.output": np.zeros(5)}), ValueError,
         rf"'encoder.layer.0.output'.*\(5,\).*\({B}, {T}, 32\)"),
        (dict(patch={"encoder.layer.0.output": lambda v, n: v[:, :1]}), ValueError,
         rf"returned shape \({B}, 1, 32\); expected .*\({B}, {T}, 32\)"),
        (dict(patch={"encoder.layer.0.output": lambda v, n: "zero"}), TypeError, "dtype <U4"),
        (dict(patch={"encoder.layer.0.output": None}), TypeError, "is None"),
        (dict(patch=["encoder.layer.0.output"]), TypeError, "must be a dict"),
        (dict(patch={3: 0}), TypeError, "strings"),
        (dict(patch={"encoder.layer.*.output": 0, "encoder.layer.0.output": 1}), ValueError, "two patch patterns"),
        (dict(head_mask=np.ones(3)), ValueError, r"shape \(3,\); expected \(4,\).*\(2, 4\)"),
        (dict(head_mask=np.ones((3, 4))), ValueError, r"shape \(3, 4\)"),
        (dict(head_mask=[1, np.nan, 1, 1]), ValueError, "non-finite"),
        (dict(head_mask=["a", "b", "c", "d"]), TypeError, "real numbers"),
    ]
    for kwargs, err, match in cases:
        with pytest.raises(err, match=match):
            model(ids, mask, tt, **kwargs)
