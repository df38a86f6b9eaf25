"""Parity with transformers' BertModel (eager attention) on random-weight checkpoints: every output,
both kernel sets, float32 and float64."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY, TOL, assert_close, hf_forward, hf_model, make_checkpoint, random_batch
from minibert import BertModel

CONFIGS = {
    "tiny": {},
    # bert-base widths (fewer layers and a small vocabulary to keep the suite fast)
    "base-shapes": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072, vocab_size=300),
    # heads that are not a power of two, the tanh GELU, eps 1e-5, three token types
    "odd": dict(hidden_size=60, num_attention_heads=5, intermediate_size=50, hidden_act="gelu_new",
                layer_norm_eps=1e-5, type_vocab_size=3, num_hidden_layers=3),
    "relu": dict(hidden_act="relu", num_attention_heads=2),
    "silu": dict(hidden_act="silu", num_attention_heads=8),
    "gelu_pytorch_tanh": dict(hidden_act="gelu_pytorch_tanh", hidden_size=48, num_attention_heads=6),
    "gelu_fast": dict(hidden_act="gelu_fast", hidden_size=36, num_attention_heads=3, type_vocab_size=3),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    cfg = CONFIGS[request.param]
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), seed=len(request.param), **cfg)
    return request.param, path, {**TINY, **cfg}


def compare_all(ours, theirs, tol, what):
    assert_close(ours.last_hidden_state, theirs.last_hidden_state.numpy(), tol, f"{what} last_hidden_state")
    assert_close(ours.pooler_output, theirs.pooler_output.numpy(), tol, f"{what} pooler_output")
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        assert_close(a, b.numpy(), tol, f"{what} hidden_states[{i}]")
    assert len(ours.attentions) == len(theirs.attentions)
    for i, (a, b) in enumerate(zip(ours.attentions, theirs.attentions)):
        assert_close(a, b.numpy(), tol, f"{what} attentions[{i}]")


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("inputs", ["padded", "pairs", "position_ids", "defaults"])
def test_parity_with_transformers(checkpoint, kernels, dtype, inputs):
    name, path, cfg = checkpoint
    rng = np.random.default_rng(1)
    ids, mask, tt = random_batch(rng, cfg, B=3, T=13, pairs=(inputs == "pairs"))
    pos = None
    if inputs == "position_ids":
        pos = rng.integers(0, cfg["max_position_embeddings"], size=ids.shape)
    if inputs == "defaults":
        mask = None
    ours_model = BertModel.from_pretrained(path, dtype=dtype, kernels=kernels)
    ours = ours_model(ids, attention_mask=mask, token_type_ids=tt, position_ids=pos,
                      output_hidden_states=True, output_attentions=True)
    theirs = hf_forward(hf_model(path, dtype), input_ids=ids, attention_mask=mask, token_type_ids=tt, position_ids=pos)
    assert ours.last_hidden_state.dtype == np.dtype(dtype)
    compare_all(ours, theirs, TOL["fp32" if dtype == "float32" else "fp64"], f"{name}/{kernels}/{dtype}/{inputs}")


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("inputs", ["padded", "pairs", "position_ids"])
def test_packed_batches_match_transformers_at_valid_positions(checkpoint, kernels, dtype, inputs):
    """The default path on a padded batch: valid tokens packed, attention per sequence. Every valid
    position matches transformers; padding positions are exactly zero."""
    name, path, cfg = checkpoint
    rng = np.random.default_rng(2)
    ids, mask, tt = random_batch(rng, cfg, B=4, T=13, pairs=(inputs == "pairs"))
    pos = rng.integers(0, cfg["max_position_embeddings"], size=ids.shape) if inputs == "position_ids" else None
    ours = BertModel.from_pretrained(path, dtype=dtype, kernels=kernels, skip_padding=True)(
        ids, attention_mask=mask, token_type_ids=tt, position_ids=pos, output_hidden_states=True)
    theirs = hf_forward(hf_model(path, dtype), input_ids=ids, attention_mask=mask, token_type_ids=tt, position_ids=pos)
    tol, valid, what = TOL["fp32" if dtype == "float32" else "fp64"], mask == 1, f"{name}/{kernels}/{dtype}/{inputs}"
    assert (~valid).any() and ours.attentions is None
    assert_close(ours.last_hidden_state[valid], theirs.last_hidden_state.numpy()[valid], tol, f"{what} packed")
    assert_close(ours.pooler_output, theirs.pooler_output.numpy(), tol, f"{what} packed pooler")
    for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        assert_close(a[valid], b.numpy()[valid], tol, f"{what} packed hidden_states[{i}]")
        assert not a[~valid].any(), f"{what}: hidden_states[{i}] is not zero at padding positions"


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
def test_packed_left_padding_and_holes(tiny_dir, kernels):
    """Valid tokens need not be a prefix: left padding and a mask with holes pack the same way
    (without a pooler). With a pooler, a row that starts with padding makes the batch run dense:
    the pooler reads position 0, whose value transformers computes from the pad token."""
    rng = np.random.default_rng(5)
    ids = rng.integers(0, TINY["vocab_size"], size=(4, 8))
    mask = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [1, 0, 1, 1, 0, 1, 1, 1], [1] * 8, [1, 1, 0, 0, 0, 0, 0, 0]])
    theirs = hf_forward(hf_model(tiny_dir), input_ids=ids, attention_mask=mask)
    ours = BertModel.from_pretrained(tiny_dir, kernels=kernels, skip_padding=True, add_pooling_layer=False)(
        ids, attention_mask=mask)
    valid = mask == 1
    assert_close(ours.last_hidden_state[valid], theirs.last_hidden_state.numpy()[valid], TOL["fp32"], "packed holes")
    assert not ours.last_hidden_state[~valid].any()
    pooled = BertModel.from_pretrained(tiny_dir, kernels=kernels, skip_padding=True)(ids, attention_mask=mask)
    assert_close(pooled.last_hidden_state, theirs.last_hidden_state.numpy(), TOL["fp32"], "dense: left padding, pooler")
    assert_close(pooled.pooler_output, theirs.pooler_output.numpy(), TOL["fp32"], "pooler_output, left padding")


def test_outputs_at_padding_positions_match_with_skip_padding_off(tiny_dir):
    """skip_padding=False computes every position, padding included, as transformers does."""
    rng = np.random.default_rng(3)
    ids, mask, _ = random_batch(rng, TINY, B=4, T=9)
    assert (mask == 0).any()
    theirs = hf_forward(hf_model(tiny_dir), input_ids=ids, attention_mask=mask)
    pad = mask == 0
    model = BertModel.from_pretrained(tiny_dir, skip_padding=False)
    assert model.skip_padding is False
    for ours in (model(ids, attention_mask=mask), model(ids, attention_mask=mask, output_attentions=True)):
        assert_close(ours.last_hidden_state, theirs.last_hidden_state.numpy(), TOL["fp32"], "padding positions")
    model.skip_padding = True  # the attribute is the switch
    assert not model(ids, attention_mask=mask).last_hidden_state[pad].any()


def test_all_zero_mask_row_packed_is_zero_not_nan(tiny_dir):
    ids = np.arange(14).reshape(2, 7) % TINY["vocab_size"]
    mask = np.ones((2, 7), dtype=np.int64)
    mask[1] = 0
    out = BertModel.from_pretrained(tiny_dir, skip_padding=True)(ids, attention_mask=mask)
    assert np.isfinite(out.last_hidden_state).all() and np.isfinite(out.pooler_output).all()
    out = BertModel.from_pretrained(tiny_dir, skip_padding=True, add_pooling_layer=False)(ids, attention_mask=mask)
    assert not out.last_hidden_state[1].any()
    theirs = hf_forward(hf_model(tiny_dir), input_ids=ids[:1], attention_mask=mask[:1])
    assert_close(out.last_hidden_state[:1], theirs.last_hidden_state.numpy(), TOL["fp32"], "row beside an empty one")


def test_replacing_q_k_or_v_unfuses_the_projection(tiny_dir):
    """Q/K/V run as one GEMM over weights fused at load; assigning one of them must take effect,
    also after a forward pass has seen (and remembered) the fused arrays."""
    import torch

    rng = np.random.default_rng(6)
    ids, mask, _ = random_batch(rng, TINY, B=2, T=6)
    ours = BertModel.from_pretrained(tiny_dir)
    hf = hf_model(tiny_dir)
    valid = mask == 1
    ours(ids, attention_mask=mask)  # Q/K/V as one GEMM on the fused weight made at load
    attn = ours.encoder.layer[0].attention.self
    w = rng.standard_normal(attn.key.weight.shape).astype(np.float32) * 0.1
    b = rng.standard_normal(attn.value.bias.shape).astype(np.float32) * 0.1
    for what in ("key.weight", "value.bias"):
        if what == "key.weight":
            attn.key.weight = w
            with torch.no_grad():
                hf.encoder.layer[0].attention.self.key.weight.copy_(torch.from_numpy(w))
        else:
            attn.value.bias = b
            with torch.no_grad():
                hf.encoder.layer[0].attention.self.value.bias.copy_(torch.from_numpy(b))
        theirs = hf_forward(hf, input_ids=ids, attention_mask=mask)
        assert_close(ours(ids, attention_mask=mask).last_hidden_state[valid], theirs.last_hidden_state.numpy()[valid],
                     TOL["fp32"], f"after replacing {what}")


def test_loaded_weights_are_read_only_and_a_new_one_takes_effect(tiny_dir):
    """from_pretrained's weights are read-only (the dense layers run on panels packed from them
    once: kernels/gemm.py), so editing one in place fails loudly instead of being ignored;
    assigning a new array takes effect, and so do later in-place edits of that (writable) array."""
    import torch

    rng = np.random.default_rng(7)
    ids, mask, _ = random_batch(rng, TINY, B=2, T=6)
    ours = BertModel.from_pretrained(tiny_dir)
    ours(ids, attention_mask=mask)  # the panels exist now
    dense = ours.encoder.layer[1].intermediate.dense
    assert not any(a.flags.writeable for _, a in ours.named_parameters())
    with pytest.raises(ValueError, match="read-only"):
        dense.weight[0, 0] = 1.0
    hf = hf_model(tiny_dir)
    valid = mask == 1
    w = rng.standard_normal(dense.weight.shape).astype(np.float32) * 0.1
    for step in ("assigned", "edited in place"):
        if step == "assigned":
            dense.weight = w
        else:
            w[:3] *= -2.0  # the model holds w itself (same dtype and shape): the edit is seen
        with torch.no_grad():
            hf.encoder.layer[1].intermediate.dense.weight.copy_(torch.from_numpy(w))
        theirs = hf_forward(hf, input_ids=ids, attention_mask=mask)
        assert_close(ours(ids, attention_mask=mask).last_hidden_state[valid], theirs.last_hidden_state.numpy()[valid],
                     TOL["fp32"], f"intermediate.dense.weight {step}")


def test_dense_layers_made_at_load_give_the_per_call_kernels_values_and_follow_assigned_weights(tiny_dir):
    """Each layer's dense layers are made once, at load (packed weights, kernel arguments ready:
    model.layer_dense; up to 256 rows a layer runs in one call, kernels/layer.py). They must give
    exactly what the kernel set's own ops give when called on the arrays each pass, packed and
    dense batches alike (with and without padding keys masked, and above 256 rows, where the
    activation is a pass of its own and the layer runs op by op), and must be made again when a
    weight or LayerNorm parameter is assigned: a read-only one packed, a writable one read as is."""
    import torch

    from minibert import model as F
    from minibert.config import ACTIVATIONS
    from minibert.inputs import prepare_inputs
    from minibert.kernels.dense import Prepared
    from minibert.kernels.layer import PreparedLayer

    rng = np.random.default_rng(8)
    ids, mask, _ = random_batch(rng, TINY, B=2, T=6)
    big_ids, big_mask, _ = random_batch(rng, TINY, B=6, T=50, pad=False)  # 300 rows
    ours = BertModel.from_pretrained(tiny_dir)
    assert all(isinstance(f, Prepared) for layer in ours.encoder.layer for f in layer.dense[:4])
    assert all(isinstance(layer.dense.whole, PreparedLayer) for layer in ours.encoder.layer)  # up to 256 rows
    c = ours.config
    k = {op: (lambda f: lambda *a, **kw: f(*a, **kw))(f) for op, f in ours._k.items()}  # the same ops, not prepared
    per_call_layers = [F.layer_dense(layer._params, ACTIVATIONS[c.hidden_act], c.layer_norm_eps, k, layer._fused)
                       for layer in ours.encoder.layer]
    assert not any(isinstance(f, (Prepared, PreparedLayer)) for d in per_call_layers for f in d)
    cases = [(ids, mask, False), (ids, np.ones_like(mask), False), (big_ids, big_mask, False),
             (ids, mask, True)]  # the last: a dense batch with its padding keys masked (skip_padding=False)
    for i, m, dense in cases:
        made = ours.run(i, attention_mask=m, skip_padding=not dense)["last_hidden_state"]
        ii, mm, tt, pos, _ = prepare_inputs(c, i, m, None, None, ours.dtype)
        per_call = F.bert(ours._params, per_call_layers, None, ii, mm, tt, pos,
                          n_head=c.num_attention_heads, eps=c.layer_norm_eps, k=k,
                          skip_padding=not dense)["last_hidden_state"]
        assert np.array_equal(made, per_call), f"max abs difference {np.abs(made - per_call).max():.3e}"
    hf = hf_model(tiny_dir)
    valid = mask == 1
    layer, hf_layer = ours.encoder.layer[1], hf.encoder.layer[1]
    H = TINY["hidden_size"]
    new = [("output.dense.weight", (rng.standard_normal(layer.output.dense.weight.shape) * 0.1).astype(np.float32),
            False),
           ("attention.output.LayerNorm.weight", (1 + 0.1 * rng.standard_normal(H)).astype(np.float32), False),
           ("intermediate.dense.weight", (rng.standard_normal(layer.intermediate.dense.weight.shape) * 0.1)
            .astype(np.float32), True)]
    for name, value, writable in new:
        value.flags.writeable = writable  # read-only as loaded weights are: packed when assigned
        *path, leaf = name.split(".")
        mod, hf_mod = layer, hf_layer
        for part in path:
            mod, hf_mod = getattr(mod, part), getattr(hf_mod, part)
        setattr(mod, leaf, value)
        with torch.no_grad():
            getattr(hf_mod, leaf).copy_(torch.from_numpy(value.copy()))
        theirs = hf_forward(hf, input_ids=ids, attention_mask=mask)
        assert_close(ours(ids, attention_mask=mask).last_hidden_state[valid], theirs.last_hidden_state.numpy()[valid],
                     TOL["fp32"], f"after assigning {name}")
        assert isinstance(layer.dense.output, Prepared) and isinstance(layer.dense.attention_output, Prepared)
    assert not isinstance(layer.dense.intermediate, Prepared), "a writable weight must be read as is, not packed"


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
def test_all_zero_mask_row_is_finite_and_matches(tiny_dir, kernels):
    rng = np.random.default_rng(4)
    ids = rng.integers(0, TINY["vocab_size"], size=(3, 7))
    mask = np.ones((3, 7), dtype=np.int64)
    mask[1] = 0
    mask[2, 4:] = 0
    ours = BertModel.from_pretrained(tiny_dir, kernels=kernels)(ids, attention_mask=mask, output_attentions=True)
    theirs = hf_forward(hf_model(tiny_dir), input_ids=ids, attention_mask=mask)
    assert np.isfinite(ours.last_hidden_state).all()
    assert all(np.isfinite(a).all() for a in ours.attentions)
    compare_all_fields = ["last_hidden_state", "pooler_output"]
    for f in compare_all_fields:
        assert_close(getattr(ours, f), getattr(theirs, f).numpy(), TOL["fp32"], f"all-zero mask row {f}")
    for i, (a, b) in enumerate(zip(ours.attentions, theirs.attentions)):
        assert_close(a, b.numpy(), TOL["fp32"], f"all-zero mask row attentions[{i}]")


def test_one_sequence_1d_and_nested_lists(tiny_dir):
    model = BertModel.from_pretrained(tiny_dir)
    ids = [5, 17, 3, 42, 8]
    a = model(ids)
    b = model(np.array([ids]))
    c = model([ids], attention_mask=[[1, 1, 1, 1, 1]], token_type_ids=[[0, 0, 0, 1, 1]])
    theirs = hf_forward(hf_model(tiny_dir), input_ids=np.array([ids]), token_type_ids=np.array([[0, 0, 0, 1, 1]]))
    assert a.last_hidden_state.shape == (1, 5, TINY["hidden_size"])
    np.testing.assert_array_equal(a.last_hidden_state, b.last_hidden_state)
    assert_close(c.last_hidden_state, theirs.last_hidden_state.numpy(), TOL["fp32"], "nested lists with token types")


def test_empty_batch_gives_empty_outputs(tiny_dir):
    model = BertModel.from_pretrained(tiny_dir)
    out = model(np.zeros((0, 6), dtype=np.int64), output_hidden_states=True, output_attentions=True)
    H, nH, L = TINY["hidden_size"], TINY["num_attention_heads"], TINY["num_hidden_layers"]
    assert out.last_hidden_state.shape == (0, 6, H)
    assert out.pooler_output.shape == (0, H)
    assert len(out.hidden_states) == L + 1 and out.hidden_states[0].shape == (0, 6, H)
    assert len(out.attentions) == L and out.attentions[0].shape == (0, nH, 6, 6)


def test_float64_is_closer_to_transformers_float64_than_float32(tiny_dir):
    """dtype='float64' really computes in float64 (exact inspection), not float32 upcast."""
    rng = np.random.default_rng(5)
    ids, mask, _ = random_batch(rng, TINY)
    theirs = hf_forward(hf_model(tiny_dir, "float64"), input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    d64 = np.abs(BertModel.from_pretrained(tiny_dir, dtype="float64", skip_padding=False)(ids, mask).last_hidden_state - theirs).max()
    d32 = np.abs(BertModel.from_pretrained(tiny_dir, dtype="float32", skip_padding=False)(ids, mask).last_hidden_state - theirs).max()
    assert d64 < TOL["fp64"] < d32, f"float64 diff {d64:.2e}, float32 diff {d32:.2e}"


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
@pytest.mark.parametrize("where", ["word_embeddings", "query_weight", "key_inf"])
def test_nan_weights_propagate_as_in_transformers(tmp_path, kernels, where):
    """A NaN weight gives NaN exactly where transformers has NaN, the other values as usual, and no
    exception from inside a kernel."""
    import torch
    import transformers

    from conftest import TINY, randomize

    hf = randomize(transformers.BertModel(transformers.BertConfig(**TINY))).eval()
    with torch.no_grad():
        if where == "word_embeddings":  # token 7's row: only the sequences holding it turn NaN
            hf.embeddings.word_embeddings.weight[7, 3] = float("nan")
        elif where == "query_weight":  # one query feature of layer 1: every score NaN from there on
            hf.encoder.layer[1].attention.self.query.weight[5, :] = float("nan")
        else:  # infinite keys: inf - inf in the scores
            hf.encoder.layer[0].attention.self.key.weight[:, 2] = float("inf")
    hf.save_pretrained(tmp_path)
    ref = hf_model(tmp_path)
    ids = np.random.default_rng(0).integers(10, 99, size=(3, 9))
    ids[1, 4] = 7
    mask = np.ones_like(ids)
    mask[2, 6:] = 0
    theirs = hf_forward(ref, input_ids=ids, attention_mask=mask)
    ours = BertModel.from_pretrained(tmp_path, kernels=kernels, skip_padding=False)(ids, mask)
    for name in ("last_hidden_state", "pooler_output"):
        a, b = getattr(ours, name), getattr(theirs, name).numpy()
        assert np.isnan(b).any(), f"{name}: the case puts no NaN in transformers' output"
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{name}: NaN in other places")
        ok = ~np.isnan(b)
        assert_close(a[ok], b[ok], TOL["fp32"], f"{name} where finite")
