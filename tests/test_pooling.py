"""minibert.pooling and SentenceEncoder against transformers' outputs pooled in torch, the way
sentence-transformers pools them."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

import minibert
from conftest import TINY, TOL, assert_close, hf_forward, hf_model, make_checkpoint, random_batch
from minibert import pooling as P


# -- torch references ------------------------------------------------------------------------------
def t_mean(h, m):
    w = m[..., None].to(h.dtype)
    return (h * w).sum(1) / w.sum(1).clamp(min=1e-9)


def t_max(h, m):
    return h.masked_fill(~m[..., None].bool(), -1e9).max(1).values


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("pool"), seed=31, num_hidden_layers=4)
    ids, mask, tt = random_batch(np.random.default_rng(8), TINY, B=4, T=12)
    ours = minibert.BertModel.from_pretrained(path)(ids, mask, output_hidden_states=True)
    theirs = hf_forward(hf_model(path), input_ids=ids, attention_mask=mask)
    return ours, theirs, mask, torch.as_tensor(mask)


def test_pooling_matches_torch(both):
    o, t, m, tm = both
    h, th = o.last_hidden_state, t.last_hidden_state
    assert_close(P.cls(h), th[:, 0].numpy(), TOL["fp32"], "cls")
    assert_close(P.mean(h, m), t_mean(th, tm).numpy(), TOL["fp32"], "mean")
    assert_close(P.max(h, m), t_max(th, tm).numpy(), TOL["fp32"], "max")
    ths = t.hidden_states
    assert_close(P.first_last_avg(o.hidden_states, m), t_mean((ths[1] + ths[-1]) / 2, tm).numpy(), TOL["fp32"],
                 "first_last_avg")
    last4 = [t_mean(ths[i], tm) for i in (-1, -2, -3, -4)]
    assert_close(P.layers(o.hidden_states, m), (sum(last4) / len(last4)).numpy(), TOL["fp32"], "layers mean")
    assert_close(P.layers(o.hidden_states, m, which=(-1, 0), pool="max", combine="concat"),
                 torch.cat([t_max(ths[-1], tm), t_max(ths[0], tm)], -1).numpy(), TOL["fp32"], "layers concat max")
    assert_close(P.layers(o.hidden_states, m, which=(1, 2), pool="cls"),
                 ((ths[1][:, 0] + ths[2][:, 0]) / 2).numpy(), TOL["fp32"], "layers cls")
    v = P.mean(h, m)
    assert_close(P.normalize(v), torch.nn.functional.normalize(torch.as_tensor(v), dim=-1).numpy(), TOL["route_fp32"], "normalize")
    assert P.mean(h, m).shape == (4, TINY["hidden_size"]) and P.mean(h, m).dtype == np.float32


def test_padding_never_counts(tmp_path):
    # a sentence alone, and inside a batch padded to 128 tokens, pools to the same vector
    path = make_checkpoint(tmp_path, seed=32, max_position_embeddings=128, num_hidden_layers=4)
    model = minibert.BertModel.from_pretrained(path)
    rng = np.random.default_rng(9)
    ids = rng.integers(5, TINY["vocab_size"], size=9)
    alone = model(ids[None], output_hidden_states=True)
    batch = np.zeros((3, 128), dtype=np.int64)
    mask = np.zeros((3, 128), dtype=np.int64)
    batch[0, :9], mask[0, :9] = ids, 1
    batch[1, :40], mask[1, :40] = rng.integers(5, 99, 40), 1
    batch[2, :], mask[2, :] = rng.integers(5, 99, 128), 1
    padded = model(batch, mask, output_hidden_states=True)
    one = np.ones((1, 9), dtype=np.int64)
    for name, a, b in [
        ("mean", P.mean(alone.last_hidden_state, one), P.mean(padded.last_hidden_state, mask)[:1]),
        ("max", P.max(alone.last_hidden_state, one), P.max(padded.last_hidden_state, mask)[:1]),
        ("cls", P.cls(alone.last_hidden_state), P.cls(padded.last_hidden_state)[:1]),
        ("first_last_avg", P.first_last_avg(alone.hidden_states, one), P.first_last_avg(padded.hidden_states, mask)[:1]),
        ("layers", P.layers(alone.hidden_states, one, combine="concat"),
         P.layers(padded.hidden_states, mask, combine="concat")[:1]),
    ]:
        assert_close(a, b, TOL["batching_fp32"], f"{name} alone vs padded to 128")


@pytest.mark.parametrize("call,match", [
    (lambda h, m: P.mean(h[0], m), r"hidden must be a float array \[B, T, H\]; got shape \(3, 4\)"),
    (lambda h, m: P.mean(h, m[:, :2]), r"attention_mask has shape \(2, 2\); hidden \(2, 3, 4\) needs \(2, 3\)"),
    (lambda h, m: P.max(h, m * 2), "attention_mask must contain only 0 and 1"),
    (lambda h, m: P.mean(h, np.array([[1, 1, 0], [0, 0, 0]])), "attention_mask row 1 has no valid token"),
    (lambda h, m: P.layers([h, h], m, which=(2,)), r"which contains 2; hidden_states has 2 entries"),
    (lambda h, m: P.layers([h, h], m, pool="sum"), r"pool='sum'; expected one of"),
    (lambda h, m: P.layers([h, h], m, combine="max"), r"combine='max'; expected one of"),
    (lambda h, m: P.layers(h, m), "hidden_states must be the sequence of every layer"),
    (lambda h, m: P.normalize(np.array([1, 2])), "normalize needs a float array"),
])
def test_pooling_errors(call, match):
    h = np.ones((2, 3, 4), dtype=np.float32)
    m = np.ones((2, 3), dtype=np.int64)
    with pytest.raises(ValueError, match=match):
        call(h, m)


# -- SentenceEncoder ---------------------------------------------------------------------------------
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "A man is riding a horse.", "A woman is playing violin.", "Two men pushed carts through the woods.",
             "A man is riding a white horse on an enclosed ground.", "A monkey is playing drums.", "hi",
             "Someone in a gorilla costume is playing a set of drums, loudly and for a long time, again and again."]


@pytest.fixture(scope="module")
def encoder(minilm_dir):
    return minibert.SentenceEncoder.from_pretrained(minilm_dir)


def test_minilm_matches_sentence_transformers_pipeline(encoder, minilm_dir):
    ours = encoder.encode(SENTENCES, batch_size=3)
    assert ours.shape == (len(SENTENCES), 384) and ours.dtype == np.float32
    assert encoder.pooling == ["mean"] and encoder.normalize and encoder.max_seq_length == 256
    # the reference: transformers + sentence-transformers' mean pooling + normalize, one sentence at a time
    tok = minibert.BertTokenizer.from_pretrained(minilm_dir)
    hf = hf_model(minilm_dir)
    ref = []
    for s in SENTENCES:
        x = tok(s, truncation=True, max_length=256)
        with torch.no_grad():
            h = hf(**{k: torch.as_tensor(v) for k, v in x.items()}).last_hidden_state
        ref.append(torch.nn.functional.normalize(t_mean(h, torch.as_tensor(x["attention_mask"])), dim=-1)[0].numpy())
    cos = np.sum(ours.astype(np.float64) * np.array(ref, dtype=np.float64), axis=1)
    assert cos.min() >= 0.99999, f"min cosine {cos.min():.7f}"
    assert_close(ours, np.array(ref), TOL["batching_fp32"], "MiniLM sentence embeddings")


def test_encode_order_single_and_empty(encoder):
    full = encoder.encode(SENTENCES, batch_size=4)
    one_by_one = np.stack([encoder.encode(s) for s in SENTENCES])
    assert encoder.encode("hi").shape == (384,)  # a single string gives one vector, as in sentence-transformers
    assert_close(full, one_by_one, TOL["batching_fp32"], "batched (sorted by length) vs one by one")
    rev = encoder.encode(SENTENCES[::-1], batch_size=32)
    assert_close(rev[::-1], full, TOL["batching_fp32"], "reversed order")
    assert encoder.encode([]).shape == (0, 384)


def test_encode_overrides(encoder, minilm_dir):
    raw = encoder.encode(SENTENCES[:3], normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1)
    assert_close(P.normalize(raw), encoder.encode(SENTENCES[:3]), TOL["route_fp32"], "normalize")
    model = minibert.BertModel.from_pretrained(minilm_dir)
    tok = minibert.BertTokenizer.from_pretrained(minilm_dir)
    h = model(**tok("hi")).last_hidden_state
    assert_close(encoder.encode(["hi"], pooling="cls", normalize=False)[0], h[0, 0], TOL["route_fp32"], "cls")
    assert_close(encoder.encode(["hi"], pooling="max", normalize=False)[0], h[0].max(0), TOL["route_fp32"], "max")


@pytest.mark.parametrize("kwargs,err,match", [
    ({"batch_size": 0}, ValueError, r"batch_size=0; expected a positive integer"),
    ({"pooling": "sum"}, ValueError, r"pooling='sum'; expected one of"),
    ({"sentences": ["ok", 3]}, TypeError, r"sentences\[1\] is int; expected str"),
])
def test_encode_errors(encoder, kwargs, err, match):
    kwargs = {"sentences": ["a", "b"], **kwargs}
    with pytest.raises(err, match=match):
        encoder.encode(**kwargs)


def _with_tokenizer(path, minilm_dir):
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(minilm_dir / f, path)
    return path


def test_plain_checkpoint_defaults_to_mean_without_normalize(tmp_path, minilm_dir):
    path = _with_tokenizer(make_checkpoint(tmp_path, vocab_size=30522), minilm_dir)
    enc = minibert.SentenceEncoder.from_pretrained(path)
    assert enc.pooling == ["mean"] and not enc.normalize and enc.max_seq_length == TINY["max_position_embeddings"]
    x = enc.tokenizer("hello there")
    h = minibert.BertModel.from_pretrained(path)(**x).last_hidden_state
    assert_close(enc.encode(["hello there"])[0], h[0].mean(0), TOL["route_fp32"], "mean")


def test_pooling_config_with_several_modes_and_unsupported_modules(tmp_path, minilm_dir):
    path = _with_tokenizer(make_checkpoint(tmp_path, vocab_size=30522), minilm_dir)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True, "pooling_mode_mean_sqrt_len_tokens": True}))
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (path / "modules.json").write_text(json.dumps(modules))
    enc = minibert.SentenceEncoder.from_pretrained(path)
    assert enc.pooling == ["cls", "mean", "mean_sqrt_len"]  # sentence-transformers' concatenation order
    v = enc.encode(["hello there"])
    assert v.shape == (1, 3 * TINY["hidden_size"])
    h = minibert.BertModel.from_pretrained(path)(**enc.tokenizer("hello there")).last_hidden_state[0]  # [4, H]
    assert_close(v[0], np.concatenate([h[0], h.mean(0), h.sum(0) / 2]), TOL["batching_fp32"], "concat")
    (path / "modules.json").write_text(json.dumps(modules + [
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(NotImplementedError, match="sentence_transformers.models.Dense"):
        minibert.SentenceEncoder.from_pretrained(path)


def prompts_dir(tmp_path, minilm_dir, **st_config):
    """MiniLM's files (linked) with a config_sentence_transformers.json of ``st_config``."""
    d = tmp_path / "minilm-prompts"
    d.mkdir()
    for f in minilm_dir.iterdir():  # links, never written through: the files written here are new
        if f.name not in ("config_sentence_transformers.json", "1_Pooling"):
            (d / f.name).symlink_to(f)
    shutil.copytree(minilm_dir / "1_Pooling", d / "1_Pooling")
    (d / "config_sentence_transformers.json").write_text(json.dumps(st_config))
    return d


def test_prompts_as_sentence_transformers_applies_them(tmp_path, minilm_dir, caplog):
    d = prompts_dir(tmp_path, minilm_dir, prompts={"query": "query: ", "passage": "passage: "},
                    default_prompt_name=None)
    enc = minibert.SentenceEncoder.from_pretrained(d)
    assert enc.prompts == {"query": "query: ", "passage": "passage: "} and enc.default_prompt_name is None
    by_hand = enc.encode(["query: " + t for t in SENTENCES[:4]])
    assert np.array_equal(enc.encode(SENTENCES[:4], prompt_name="query"), by_hand)
    assert np.array_equal(enc.encode(SENTENCES[:4], prompt="query: "), by_hand)
    with caplog.at_level("WARNING"):  # both given: the prompt wins, with sentence-transformers' warning
        assert np.array_equal(enc.encode(SENTENCES[:4], prompt="query: ", prompt_name="passage"), by_hand)
    assert "Ignoring the `prompt_name` in favor of `prompt`" in caplog.text
    plain = enc.encode(SENTENCES[:4])
    assert not np.allclose(plain, by_hand)
    with pytest.raises(ValueError, match=re.escape("Prompt name 'doc' not found in the configured prompts "
                                                   "dictionary with keys ['query', 'passage'].")):
        enc.encode(SENTENCES[:4], prompt_name="doc")
    with pytest.raises(TypeError, match=r"prompt=5; expected a str"):
        enc.encode(SENTENCES[:4], prompt=5)
    with pytest.raises(TypeError, match=r"prompt_name=\['query'\]; expected a str"):
        enc.encode(SENTENCES[:4], prompt_name=["query"])


def test_the_default_prompt_applies_unless_an_empty_prompt_is_given(tmp_path, minilm_dir, encoder):
    d = prompts_dir(tmp_path, minilm_dir, prompts={"query": "query: "}, default_prompt_name="query")
    enc = minibert.SentenceEncoder.from_pretrained(d)
    assert np.array_equal(enc.encode(SENTENCES[:3]), encoder.encode(["query: " + t for t in SENTENCES[:3]]))
    assert np.array_equal(enc.encode(SENTENCES[:3], prompt=""), encoder.encode(SENTENCES[:3]))


def test_prompt_configs_it_cannot_honour_are_errors(tmp_path, minilm_dir, encoder):
    with pytest.raises(TypeError, match=r"prompts=\['query: '\]; expected a dict of prompt name -> prompt text"):
        minibert.SentenceEncoder(encoder.model, encoder.tokenizer, prompts=["query: "])
    d = prompts_dir(tmp_path, minilm_dir, prompts={"query": "query: "}, default_prompt_name="passage")
    with pytest.raises(ValueError, match=re.escape("Default prompt name 'passage' not found in the configured "
                                                   "prompts dictionary with keys ['query'].")):
        minibert.SentenceEncoder.from_pretrained(d)
    cfg = json.loads((minilm_dir / "1_Pooling" / "config.json").read_text())  # a Pooling that leaves the
    # prompt's tokens out (INSTRUCTOR-style)
    (d / "1_Pooling" / "config.json").write_text(json.dumps({**cfg, "include_prompt": False}))
    (d / "config_sentence_transformers.json").write_text("{}")
    with pytest.raises(NotImplementedError, match="Pooling with include_prompt=false is not implemented"):
        minibert.SentenceEncoder.from_pretrained(d)
