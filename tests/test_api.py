"""The transformers idioms of the public API work with only the import changed."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import TINY, TOL, assert_close, hf_forward, hf_model, random_batch
from minibert import BaseModelOutputWithPooling, BertConfig, BertModel


@pytest.fixture(scope="module")
def model(tiny_dir):
    return BertModel.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids, mask, _ = random_batch(rng, TINY, B=2, T=8)
    return dict(input_ids=ids, attention_mask=mask)


def test_output_access_by_name_key_index_and_unpacking(model, batch):
    out = model(**batch, output_hidden_states=True, output_attentions=True)
    assert isinstance(out, BaseModelOutputWithPooling)
    assert out[0] is out.last_hidden_state is out["last_hidden_state"]
    assert out[1] is out.pooler_output is out["pooler_output"]
    assert out[2] is out.hidden_states and out[3] is out.attentions
    assert out.hidden_states[-2].shape == (2, 8, TINY["hidden_size"])
    assert out.attentions[0].shape == (2, TINY["num_attention_heads"], 8, 8)
    assert list(out.keys()) == ["last_hidden_state", "pooler_output", "hidden_states", "attentions"]
    assert set(dict(out)) == set(out.keys())
    h, p, hs, at = out
    assert h is out.last_hidden_state and p is out.pooler_output and hs is out.hidden_states and at is out.attentions


def test_none_fields_are_skipped_like_transformers(model, batch):
    out = model(**batch)
    assert out.hidden_states is None and out.attentions is None
    assert len(out) == 2 and out.to_tuple() == (out[0], out[1])
    with pytest.raises(IndexError):
        out[2]
    with pytest.raises(KeyError, match="hidden_states"):
        out["hidden_states"]
    assert "hidden_states" not in out and "pooler_output" in out


def test_flags_set_at_load_allow_four_way_unpacking(tiny_dir, batch):
    model = BertModel.from_pretrained(tiny_dir, output_hidden_states=True, output_attentions=True)
    assert model.config.output_hidden_states and model.config.output_attentions
    last_hidden_state, pooler_output, all_hidden_states, all_attentions = model(batch["input_ids"])
    assert len(all_hidden_states) == TINY["num_hidden_layers"] + 1
    assert len(all_attentions) == TINY["num_hidden_layers"]
    # an explicit False at call time wins over the config
    assert model(batch["input_ids"], output_attentions=False).attentions is None


def test_pooler_by_hand_and_recomputed_bit_identical(model, batch):
    out = model(**batch)
    W, b = model.pooler.dense.weight, model.pooler.dense.bias
    assert isinstance(W, np.ndarray) and W.shape == (TINY["hidden_size"],) * 2
    assert_close(np.tanh(out.last_hidden_state[:, 0] @ W.T + b), out.pooler_output, TOL["route_fp32"], "pooler by hand")
    np.testing.assert_array_equal(model.pooler(out.last_hidden_state), out.pooler_output)


def test_parts_reachable_with_transformers_names(tiny_dir, model):
    theirs = hf_model(tiny_dir)
    pairs = {
        "embeddings.word_embeddings.weight": model.embeddings.word_embeddings.weight,
        "encoder.layer.1.attention.self.query.weight": model.encoder.layer[1].attention.self.query.weight,
        "encoder.layer.0.intermediate.dense.bias": model.encoder.layer[0].intermediate.dense.bias,
        "encoder.layer.1.output.LayerNorm.weight": model.encoder.layer[1].output.LayerNorm.weight,
        "pooler.dense.bias": model.pooler.dense.bias,
    }
    sd = theirs.state_dict()
    for name, arr in pairs.items():
        assert isinstance(arr, np.ndarray)
        np.testing.assert_array_equal(arr, sd[name].numpy(), err_msg=name)
    assert model.config.hidden_size == TINY["hidden_size"]
    assert len(model.encoder.layer) == TINY["num_hidden_layers"]
    assert set(model.state_dict()) == set(sd) - {"embeddings.position_ids", "embeddings.token_type_ids"}
    assert model.num_parameters() == sum(p.numel() for p in theirs.parameters())


def test_submodules_run_the_same_functions(model, batch):
    ids = batch["input_ids"]
    out = model(ids, output_hidden_states=True)
    emb = model.embeddings(ids, np.zeros_like(ids), np.broadcast_to(np.arange(ids.shape[1]), ids.shape))
    np.testing.assert_array_equal(emb, out.hidden_states[0])
    mask = np.zeros(ids.shape, dtype=np.float32)  # additive mask: nothing masked
    h1, _ = model.encoder.layer[0](out.hidden_states[0], mask)
    # a layer called alone returns its attention probabilities, so it takes the dense path (q·kᵀ
    # by BLAS, the probabilities kept) where the forward pass runs the attention kernel: the same
    # arithmetic, summed in another order
    assert_close(h1, out.hidden_states[1], TOL["kernel_fp32"], "layer[0] called alone vs the forward pass")
    x = out.hidden_states[1]
    assert_close(model.encoder.layer[1].attention.self.query(x),
                 x @ model.encoder.layer[1].attention.self.query.weight.T + model.encoder.layer[1].attention.self.query.bias,
                 TOL["route_fp32"], "query module")


def test_assigning_a_weight_changes_the_forward_pass(tiny_dir, batch):
    model = BertModel.from_pretrained(tiny_dir)
    before = model(**batch).pooler_output
    model.pooler.dense.bias = model.pooler.dense.bias + 1
    after = model(**batch).pooler_output
    assert not np.allclose(before, after)
    with pytest.raises(ValueError, match="shape"):
        model.pooler.dense.bias = np.zeros(3)


def test_print_model_shows_the_tree_with_shapes(model):
    text = repr(model)
    H, I, V = TINY["hidden_size"], TINY["intermediate_size"], TINY["vocab_size"]
    for piece in [
        "BertModel(",
        f"(word_embeddings): Embedding({V}, {H}, padding_idx=0)",
        f"(LayerNorm): LayerNorm(({H},), eps=1e-12, elementwise_affine=True)",
        f"(0-{TINY['num_hidden_layers'] - 1}): {TINY['num_hidden_layers']} x BertLayer(",
        f"(query): Linear(in_features={H}, out_features={H}, bias=True)",
        f"(dense): Linear(in_features={H}, out_features={I}, bias=True)",
        "(pooler): BertPooler(",
        "(activation): Tanh()",
    ]:
        assert piece in text, f"{piece!r} not in:\n{text}"


def test_config_fields_and_extras(tiny_dir, model):
    cfg = BertConfig.from_pretrained(tiny_dir)
    assert cfg.hidden_size == TINY["hidden_size"] and cfg.head_dim == TINY["hidden_size"] // TINY["num_attention_heads"]
    assert cfg.architectures == ["BertModel"]  # unknown keys stay reachable, as in transformers
    assert model.config.to_dict()["vocab_size"] == TINY["vocab_size"]


def test_return_dict_false_gives_a_tuple(model, batch):
    t = model(**batch, return_dict=False)
    assert isinstance(t, tuple) and len(t) == 2


def test_float64_model_matches_its_own_module_arrays(tiny_dir, batch):
    model = BertModel.from_pretrained(tiny_dir, dtype="float64")
    assert model.encoder.layer[0].attention.self.key.weight.dtype == np.float64
    out = model(**batch)
    theirs = hf_forward(hf_model(tiny_dir, "float64"), **batch)
    assert_close(out.pooler_output, theirs.pooler_output.numpy(), TOL["fp64"], "float64 pooler")
