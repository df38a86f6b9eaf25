"""Bad input gets a clear error naming the argument and the bad value, never garbage."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY
from minibert import BertConfig, BertModel

V, P, TV = TINY["vocab_size"], TINY["max_position_embeddings"], TINY["type_vocab_size"]


@pytest.fixture(scope="module")
def model(tiny_dir):
    return BertModel.from_pretrained(tiny_dir)


IDS = np.array([[2, 5, 7, 9], [3, 4, 6, 8]])


@pytest.mark.parametrize("kwargs, exc, phrase", [
    (dict(input_ids=[[1, 2, V]]), ValueError, f"input_ids contains {V} at \\[0, 2\\]; expected 0 <= input_ids < {V}"),
    (dict(input_ids=[[1, -1, 2]]), ValueError, "input_ids contains -1 at \\[0, 1\\]"),
    (dict(input_ids=np.ones((1, P + 1), dtype=np.int64)), ValueError, f"{P + 1} tokens .*max_position_embeddings={P}"),
    (dict(input_ids=IDS, token_type_ids=[[0, 0, TV, 0], [0, 0, 0, 0]]), ValueError, f"token_type_ids contains {TV} at \\[0, 2\\]"),
    (dict(input_ids=IDS, token_type_ids=[[0, 0, 0, 0]]), ValueError, "token_type_ids has shape \\(1, 4\\); expected \\(2, 4\\)"),
    (dict(input_ids=IDS, attention_mask=[[1, 1, 1], [1, 1, 1]]), ValueError, "attention_mask has shape \\(2, 3\\); expected \\(2, 4\\)"),
    (dict(input_ids=IDS, attention_mask=[[1, 1, 2, 0], [1, 1, 1, 1]]), ValueError, "attention_mask contains 2 at \\[0, 2\\]"),
    (dict(input_ids=IDS, attention_mask=np.full((2, 4), 2)), ValueError, "attention_mask contains 2 at \\[0, 0\\]"),
    (dict(input_ids=IDS, position_ids=[[0, 1, 2]]), ValueError, "position_ids has shape"),
    (dict(input_ids=IDS, position_ids=[[0, 1, 2, P]]), ValueError, f"position_ids contains {P} at \\[0, 3\\]"),
    (dict(input_ids=np.ones((2, 3, 4), dtype=np.int64)), ValueError, "input_ids has 3 dimensions"),
    (dict(input_ids=[[1.5, 2.0]]), TypeError, "input_ids has dtype float64; expected integers"),
    (dict(input_ids=[[1, 2], [3]]), ValueError, "input_ids must be a rectangular array"),
    (dict(input_ids=IDS, attention_mask=[[1, 1, 1, 1], [1, 1]]), ValueError, "attention_mask must be a rectangular array"),
    (dict(input_ids=IDS, attention_mask=[["a"] * 4] * 2), TypeError, "attention_mask has dtype <U1"),
    (dict(input_ids=[["a", "b"]]), TypeError, "input_ids has dtype <U1"),
    (dict(input_ids=np.zeros((2, 0), dtype=np.int64)), ValueError, "sequences of 0 tokens"),
    (dict(input_ids=None), ValueError, "give either input_ids or inputs_embeds"),
])
def test_bad_input_raises_clear_error(model, kwargs, exc, phrase):
    with pytest.raises(exc, match=phrase):
        model(**kwargs)


def test_explicit_position_ids_may_exceed_sequence_length_but_not_the_table(model):
    # a short sequence placed at the end of the position table is fine
    out = model([[1, 2, 3]], position_ids=[[P - 3, P - 2, P - 1]])
    assert np.isfinite(out.last_hidden_state).all()


@pytest.mark.parametrize("kwargs, exc, phrase", [
    (dict(dtype="float16"), ValueError, "dtype='float16' is not supported; expected 'float32' or 'float64'"),
    (dict(dtype="int8"), ValueError, "dtype='int8'"),
    (dict(kernels="cuda"), ValueError, "kernels='cuda' is not a kernel set"),
])
def test_bad_from_pretrained_arguments(tiny_dir, kwargs, exc, phrase):
    with pytest.raises(exc, match=phrase):
        BertModel.from_pretrained(tiny_dir, **kwargs)


def _with_config(src, tmp_path, **changes):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors").symlink_to(src / "model.safetensors")
    return d


@pytest.mark.parametrize("changes, exc, phrase", [
    (dict(hidden_act="gelu_10"), ValueError, "hidden_act='gelu_10' is not supported"),
    (dict(hidden_act="quick_gelu"), ValueError, "hidden_act='quick_gelu'"),
    (dict(position_embedding_type="relative_key"), NotImplementedError, "position_embedding_type='relative_key'"),
    (dict(num_attention_heads=5), ValueError, "hidden_size=32 is not a multiple of num_attention_heads=5"),
    (dict(hidden_size=-4), ValueError, "hidden_size=-4; expected a positive integer"),
    (dict(layer_norm_eps=0), ValueError, "layer_norm_eps=0"),
    (dict(model_type="roberta"), ValueError, "model_type='roberta'"),
])
def test_bad_config_raises_clear_error(tiny_dir, tmp_path, changes, exc, phrase):
    d = _with_config(tiny_dir, tmp_path, **changes)
    with pytest.raises(exc, match=phrase):
        BertModel.from_pretrained(d)


def test_config_override_at_load_is_validated(tiny_dir):
    with pytest.raises(ValueError, match="hidden_act='nope'"):
        BertModel.from_pretrained(tiny_dir, hidden_act="nope")


def test_unknown_config_keys_are_kept_not_used(tiny_dir, tmp_path):
    d = _with_config(tiny_dir, tmp_path, my_flag=3)
    assert BertConfig.from_pretrained(d).my_flag == 3


def test_hidden_act_variants_accepted():
    for act in ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish"):
        assert BertConfig(hidden_act=act).hidden_act == act


def test_relative_positions_not_implemented_even_for_a_fresh_config():
    with pytest.raises(NotImplementedError, match="only 'absolute'"):
        BertConfig(position_embedding_type="relative_key_query")


def test_bool_mask_and_float_mask_accepted(model):
    ids = IDS
    a = model(ids, attention_mask=np.array([[1, 1, 1, 0], [1, 1, 1, 1]]))
    b = model(ids, attention_mask=np.array([[True, True, True, False], [True] * 4]))
    c = model(ids, attention_mask=np.array([[1.0, 1.0, 1.0, 0.0], [1.0] * 4]))
    np.testing.assert_array_equal(a.last_hidden_state, b.last_hidden_state)
    np.testing.assert_array_equal(a.last_hidden_state, c.last_hidden_state)



def test_unknown_from_pretrained_keyword_is_an_error(tiny_dir):
    with pytest.raises(TypeError, match=r"unknown config override\(s\) \['output_hidden_state'\]"):
        BertModel.from_pretrained(tiny_dir, output_hidden_state=True)


def test_transformers_loading_keywords(tiny_dir, caplog):
    import logging

    ids = IDS
    full = BertModel.from_pretrained(tiny_dir, attn_implementation="eager", dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="minibert"):
        bare = BertModel.from_pretrained(tiny_dir, add_pooling_layer=False)
    assert not caplog.records  # dropping the pooler on request is not worth a warning
    assert bare.pooler is None and bare(ids).pooler_output is None
    np.testing.assert_array_equal(bare(ids).last_hidden_state, full(ids).last_hidden_state)
    assert "pooler" not in repr(bare)
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2' is not supported"):
        BertModel.from_pretrained(tiny_dir, attn_implementation="flash_attention_2")


def test_local_files_only_with_an_uncached_repo_id(tmp_path):
    with pytest.raises(OSError, match="could not get model 'org/uncached-bert'.*local_files_only=True.*local directory"):
        BertModel.from_pretrained("org/uncached-bert", local_files_only=True, cache_dir=tmp_path)
