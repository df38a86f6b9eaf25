"""BertForMaskedLM.logit_lens and `minibert logit-lens`, against transformers' MLM head applied to
transformers' own hidden states."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY, TOL, assert_close, hf_model, make_checkpoint, random_batch
from minibert import BertForMaskedLM, BertTokenizer
from test_cli import run
from test_cli_heads import VOCAB, _with_vocab


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    return _with_vocab(make_checkpoint(tmp_path_factory.mktemp("lens"), cls_name="BertForMaskedLM",
                                       vocab_size=len(VOCAB), seed=51))


@pytest.mark.parametrize("kernels", ["numba", "numpy"])
def test_every_layer_against_transformers_mlm_head(mlm_dir, kernels):
    ids, mask, _ = random_batch(np.random.default_rng(51), {"vocab_size": len(VOCAB)}, B=2, T=7)
    model = BertForMaskedLM.from_pretrained(mlm_dir, kernels=kernels)
    lens = model.logit_lens(ids, mask, top_k=4)
    L = TINY["num_hidden_layers"]
    assert lens.logits.shape == (L + 1, 2, 7, len(VOCAB)) and lens.logits.dtype == np.float32
    hf = hf_model(mlm_dir, cls_name="BertForMaskedLM")
    with torch.no_grad():
        out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_hidden_states=True)
        theirs = np.stack([hf.cls(h).numpy() for h in out.hidden_states])
    assert_close(lens.logits, theirs, TOL["fp32"], "logit lens, every layer")
    np.testing.assert_array_equal(lens.logits[-1], model(ids, mask).logits)  # the last row is the model's logits
    # the top k: best first, probabilities of the softmax over the vocabulary, tokens from vocab.txt
    x = lens.logits.astype(np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.argsort(-lens.logits, axis=-1, kind="stable")[..., :4]
    np.testing.assert_array_equal(lens.top_ids, want)
    assert_close(lens.top_probs, np.take_along_axis(p, want, -1), TOL["route_fp32"], "top probs")
    assert lens.top_tokens[1][0][3] == [VOCAB[t] for t in want[1, 0, 3]]


def test_without_a_tokenizer_tokens_are_none_and_bad_top_k(tmp_path):
    path = make_checkpoint(tmp_path / "bare", cls_name="BertForMaskedLM", seed=52)
    model = BertForMaskedLM.from_pretrained(path)
    ids = np.array([[2, 5, 9, 3]])
    lens = model.logit_lens(ids, top_k=2)
    assert lens.top_tokens is None and lens.top_ids.shape == (TINY["num_hidden_layers"] + 1, 1, 4, 2)
    for k in (0, TINY["vocab_size"] + 1, True, 2.5):
        with pytest.raises(ValueError, match="top_k must be an integer from 1"):
            model.logit_lens(ids, top_k=k)


def test_cli_prints_a_layer_by_top_k_table_per_mask(mlm_dir):
    text = "the capital of france is [MASK] ."
    r = run("logit-lens", "--model", str(mlm_dir), "--top-k", "3", text, "[MASK] is a [MASK]")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[MASK] at token") == 3
    tok = BertTokenizer.from_pretrained(mlm_dir)
    x = tok([text])
    pos = int(np.flatnonzero(x["input_ids"][0] == tok.mask_token_id)[0])
    lens = BertForMaskedLM.from_pretrained(mlm_dir).logit_lens(**x, top_k=3)
    block = r.stdout.split(f"[MASK] at token {pos}:")[1].splitlines()[2:2 + TINY["num_hidden_layers"] + 1]
    for layer, line in enumerate(block):
        cells = line.split()
        assert int(cells[0]) == layer, line
        for j in range(3):
            assert cells[1 + 2 * j] == lens.top_tokens[layer][0][pos][j], line
            assert float(cells[2 + 2 * j]) == pytest.approx(lens.top_probs[layer, 0, pos, j], abs=TOL["printed"])


@pytest.mark.parametrize("args, phrase", [
    (["paris is a city"], "has no [MASK] token"),
    (["--top-k", "1000", "a [MASK]"], f"--top-k 1000 exceeds the vocabulary size ({len(VOCAB)})"),
])
def test_cli_errors(mlm_dir, args, phrase):
    r = run("logit-lens", "--model", str(mlm_dir), *args)
    assert r.returncode != 0 and phrase in r.stderr and "Traceback" not in r.stderr, r.stderr
