"""minibert.interventions: head ablation and activation patching, on cases whose answers are known."""
from __future__ import annotations

import numpy as np
import pytest

import minibert
from conftest import TINY, TOL, assert_close, make_checkpoint, random_batch
from minibert.interventions import ablate_heads, activation_patching, rows

L, nH = TINY["num_hidden_layers"], TINY["num_attention_heads"]
dH = TINY["hidden_size"] // nH


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return minibert.BertModel.from_pretrained(make_checkpoint(tmp_path_factory.mktemp("iv"), seed=41))


@pytest.fixture(scope="module")
def batch():
    ids, mask, tt = random_batch(np.random.default_rng(41), TINY, B=3, T=8)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))


def test_zero_ablation_is_a_head_mask_of_zeros(model, batch):
    out = model(**batch, patch=ablate_heads({0: [1, 2], 1: 3}), output_attentions=True)
    hm = np.ones((L, nH))
    hm[0, [1, 2]] = 0
    hm[1, 3] = 0
    ref = model(**batch, head_mask=hm, output_attentions=True)  # held to transformers 4 in test_patch.py
    np.testing.assert_array_equal(out.last_hidden_state, ref.last_hidden_state)
    assert np.all(out.attentions[0][:, [1, 2]] == 0) and np.all(out.attentions[1][:, 3] == 0)


def test_mean_ablation_is_the_head_context_averaged_over_valid_positions(model, batch):
    layer, head = 1, 2
    name = f"encoder.layer.{layer}.attention.self.context"
    ctx = model(**batch, capture=name).captures[name]  # [B, T, H]: the layer's context before the patch
    valid = batch["attention_mask"].astype(bool)
    want = ctx.copy()
    cols = slice(head * dH, (head + 1) * dH)
    for b in range(ctx.shape[0]):
        want[b, :, cols] = ctx[b, valid[b], cols].mean(axis=0)
    out = model(**batch, patch=ablate_heads({layer: [head]}, how="mean"), capture=name)
    assert_close(out.captures[name], want, TOL["route_fp32"], "mean-ablated context")
    ref = model(**batch, patch={name: out.captures[name]})
    np.testing.assert_array_equal(out.last_hidden_state, ref.last_hidden_state)


def test_ablate_heads_errors(model, batch):
    for heads, how, err, match in [
        ({}, "zero", TypeError, "non-empty dict"),
        ([1, 2], "zero", TypeError, "non-empty dict"),
        ({-1: [0]}, "zero", ValueError, "layer -1"),
        ({0: []}, "zero", ValueError, r"heads\[0\]"),
        ({0: [1.5]}, "zero", ValueError, r"heads\[0\]"),
        ({0: [1]}, "max", ValueError, "how='max'"),
    ]:
        with pytest.raises(err, match=match):
            ablate_heads(heads, how)
    with pytest.raises(ValueError, match="matches no tap"):
        model(**batch, patch=ablate_heads({5: [0]}))
    for how in ("zero", "mean"):
        with pytest.raises(ValueError, match=f"layer 0 has heads 0..{nH - 1}; got head 7"):
            model(**batch, patch=ablate_heads({0: [7]}, how))


def _corrupt(batch):
    x = {k: v.copy() for k, v in batch.items()}
    x["input_ids"][:, 2] = 7  # one token changed in every sequence
    return x


def test_patching_the_last_layer_output_restores_the_clean_metric_exactly(model, batch):
    last = f"encoder.layer.{L - 1}.output"
    metric = lambda out: float(out.last_hidden_state[0, 3].sum() + out.pooler_output[1].sum())  # noqa: E731
    r = activation_patching(model, batch, _corrupt(batch), metric, taps=last, per_position=False)
    assert r.taps == [last] and r.grid.shape == (1,)
    assert r.grid[0] == r.clean != r.corrupted
    # per position, a metric of position 3 alone moves only when position 3 is patched
    metric3 = lambda out: float(out.last_hidden_state[:, 3].sum())  # noqa: E731
    r = activation_patching(model, batch, _corrupt(batch), metric3, taps=last)
    T = batch["input_ids"].shape[1]
    assert r.grid.shape == (1, T)
    assert r.grid[0, 3] == r.clean
    assert all(r.grid[0, t] == r.corrupted for t in range(T) if t != 3)
    assert r.normalized()[0, 3] == 1.0


def test_patching_cells_equal_single_patched_runs(model, batch):
    """Each cell of the batched grid against one call with that one patch; batch sizes that split
    the cells differently give the same grid."""
    x = _corrupt(batch)
    metric = lambda out: float(out.pooler_output[:, 0].sum())  # noqa: E731
    taps = "encoder.layer.*.attention.self.value"
    r = activation_patching(model, batch, x, metric, taps=taps, batch_size=7)
    names = [f"encoder.layer.{i}.attention.self.value" for i in range(L)]
    assert r.taps == names
    B, T = x["input_ids"].shape
    clean = model(**batch, capture=names).captures
    for i, name in enumerate(names):
        for t in (0, 2, T - 1):
            v = model(**x, capture=name).captures[name].copy()
            v[:, :, t] = clean[name][:, :, t]
            want = metric(model(**x, patch={name: v}))
            assert_close(r.grid[i, t], want, TOL["route_fp32"], f"{name} at {t}")
    cells = L * T
    assert r.calls == 2 + -(-cells // (7 // B))
    again = activation_patching(model, batch, x, metric, taps=taps, batch_size=64)
    assert again.calls == 2 + -(-cells // (64 // B))
    assert_close(again.grid, r.grid, TOL["route_fp32"], "grid at another batch size")


def test_the_default_taps_and_rows(model, batch):
    r = activation_patching(model, batch, _corrupt(batch), lambda o: float(o.last_hidden_state.mean()))
    # the glob matches as capture= does: attention.output too
    assert r.taps == [n for i in range(L) for n in (f"encoder.layer.{i}.attention.output", f"encoder.layer.{i}.output")]
    out = model(**batch, output_hidden_states=True)
    part = rows(out, 1, 3)
    assert type(part) is type(out) and part.last_hidden_state.shape[0] == 2 and len(part.hidden_states) == L + 1
    np.testing.assert_array_equal(part.pooler_output, out.pooler_output[1:3])


def test_activation_patching_errors(model, batch):
    x = _corrupt(batch)
    ok = lambda o: 0.0  # noqa: E731
    short = {k: v[:, :5] for k, v in x.items()}
    cases = [
        (dict(clean=batch, corrupted=short, metric=ok), ValueError, "same inputs of the same shapes"),
        (dict(clean=[1, 2], corrupted=x, metric=ok), TypeError, "tokenizer output"),
        (dict(clean=batch, corrupted=x, metric=lambda o: o.last_hidden_state), TypeError, "one number"),
        (dict(clean=batch, corrupted=x, metric=lambda o: "x"), TypeError, "a number"),
        (dict(clean=batch, corrupted=x, metric=ok, taps="pooler.dense"), ValueError, "no position axis"),
        (dict(clean=batch, corrupted=x, metric=ok, taps="encoder.layer.9.output"), ValueError, "matches no tap"),
        (dict(clean=batch, corrupted=x, metric=ok, batch_size=0), ValueError, "batch_size"),
    ]
    for kwargs, err, match in cases:
        with pytest.raises(err, match=match):
            activation_patching(model, **kwargs)
