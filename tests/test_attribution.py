"""minibert.attribution against straightforward reference implementations written here."""
from __future__ import annotations

import numpy as np
import pytest

import minibert
from conftest import TINY, TOL, assert_close, make_checkpoint, random_batch
from minibert.attribution import attention_rollout, occlusion, value_zeroing
from test_cli_heads import VOCAB, _with_vocab

L = TINY["num_hidden_layers"]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return _with_vocab(make_checkpoint(tmp_path_factory.mktemp("attr"), seed=61, vocab_size=len(VOCAB)))


@pytest.fixture(scope="module")
def model(path):
    return minibert.BertModel.from_pretrained(path)


@pytest.fixture(scope="module")
def x():
    ids, mask, _ = random_batch(np.random.default_rng(61), {"vocab_size": len(VOCAB)}, B=3, T=7)
    return dict(input_ids=ids, attention_mask=mask)


def rollout_reference(attentions, mask, add_residual):
    """Abnar & Zuidema's recipe, one sequence at a time on its valid tokens."""
    B, _, T, _ = attentions[0].shape
    out = np.zeros((B, T, T))
    for b in range(B):
        n = int(mask[b].sum())
        r = np.eye(n)
        for a in attentions:
            m = a[b, :, :n, :n].astype(np.float64).mean(axis=0)
            if add_residual:
                m = 0.5 * m + 0.5 * np.eye(n)
            m = m / m.sum(axis=1, keepdims=True)
            r = m @ r
        out[b, :n, :n] = r
    return out


@pytest.mark.parametrize("add_residual", [True, False])
def test_rollout_matches_the_recipe(model, x, add_residual):
    att = model(**x, output_attentions=True).attentions
    got = attention_rollout(att, x["attention_mask"], add_residual=add_residual)
    assert got.shape == (3, 7, 7) and got.dtype == np.float32
    assert_close(got, rollout_reference(att, x["attention_mask"], add_residual), TOL["route_fp32"], "rollout")
    valid = x["attention_mask"].astype(bool)
    assert_close(got.sum(-1)[valid], np.ones(valid.sum()), TOL["route_fp32"], "rollout rows sum to 1")
    assert np.all(got[~valid] == 0)
    stacked = attention_rollout(np.stack(att), x["attention_mask"], add_residual=add_residual)  # [L, B, nH, T, T]
    np.testing.assert_array_equal(stacked, got)


def test_rollout_errors():
    a = np.full((2, 4, 5, 5), 0.2)
    for args, err, match in [
        (([],), ValueError, "non-empty"),
        (([a, a[:, :, :4, :4]],), ValueError, "one shape"),
        (([a[0]],), ValueError, "one shape"),
        ((5,), TypeError, "sequence"),
        (([a], np.ones((2, 4))), ValueError, r"attention_mask has shape \(2, 4\); expected \(2, 5\)"),
    ]:
        with pytest.raises(err, match=match):
            attention_rollout(*args)


def test_value_zeroing_matches_single_zeroed_runs(model, x):
    C = value_zeroing(model, x, batch_size=5)  # cells split over several calls
    B, T = x["input_ids"].shape
    assert C.shape == (L, B, T, T)
    valid = x["attention_mask"].astype(bool)
    outs = [f"encoder.layer.{l}.output" for l in range(L)]
    ref = model(**x, capture=outs).captures
    for l in range(L):
        for j in (0, 3, 6):
            def zero(v, name, j=j):
                v = v.copy()
                v[:, :, j] = 0
                return v
            got = model(**x, patch={f"encoder.layer.{l}.attention.self.value": zero}, capture=outs[l]).captures[outs[l]]
            a, b = got.astype(np.float64), ref[outs[l]].astype(np.float64)
            want = 1 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
            want = want * valid * valid[:, j][:, None]
            assert_close(C[l, :, :, j], want, TOL["route_fp32"], f"value zeroing layer {l}, token {j}")
    assert np.all(C[:, ~valid] == 0) and np.all(C.transpose(0, 1, 3, 2)[:, ~valid] == 0)
    assert C[:, valid].max() > 1e-3  # zeroing a value moves the outputs
    assert_close(value_zeroing(model, x, batch_size=64), C, TOL["route_fp32"], "another batch size")


def test_occlusion_matches_a_loop(model, x, path):
    metric = lambda out: out.pooler_output[:, 0].astype(np.float64)  # noqa: E731
    S = occlusion(model, x, metric)  # "[MASK]" from the checkpoint's vocab.txt
    mask_id = VOCAB.index("[MASK]")
    base = metric(model(**x))
    B, T = x["input_ids"].shape
    want = np.zeros((B, T))
    for t in range(T):
        ids = x["input_ids"].copy()
        ids[:, t] = mask_id
        want[:, t] = base - metric(model(input_ids=ids, attention_mask=x["attention_mask"]))
    want *= x["attention_mask"]
    assert_close(S, want, TOL["batching_fp32"], "occlusion")
    assert np.abs(S).max() > 1e-3
    by_id = occlusion(model, x, metric, replace_with=mask_id, batch_size=4)
    assert_close(by_id, S, TOL["batching_fp32"], "occlusion by id, other batches")


def test_occlusion_and_value_zeroing_errors(model, x, tmp_path):
    ok = lambda out: out.pooler_output[:, 0]  # noqa: E731
    cases = [
        (dict(metric=ok, replace_with="[NOPE]"), ValueError, "not a token"),
        (dict(metric=ok, replace_with=len(VOCAB)), ValueError, "outside the vocabulary"),
        (dict(metric=ok, replace_with=True), TypeError, "token string or an id"),
        (dict(metric=lambda out: out.pooler_output), ValueError, r"one number per sequence, shape \(3,\)"),
        (dict(metric=ok, batch_size=0), ValueError, "batch_size"),
    ]
    for kwargs, err, match in cases:
        with pytest.raises(err, match=match):
            occlusion(model, x, **kwargs)
    bare = minibert.BertModel.from_pretrained(make_checkpoint(tmp_path / "bare", seed=62))
    with pytest.raises(ValueError, match="no tokenizer files"):
        occlusion(bare, x, ok)
    with pytest.raises(TypeError, match="tokenizer output"):
        value_zeroing(model, [1, 2, 3])
    with pytest.raises(ValueError, match="batch_size"):
        value_zeroing(model, x, batch_size=-1)
