"""`minibert fill-mask` and `minibert classify` on random-weight head checkpoints with a small vocab.txt:
the printed tokens, labels and scores are the Python API's (which test_heads.py holds to transformers)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_checkpoint
from minibert import BertForMaskedLM, BertForSequenceClassification, BertTokenizer
from test_cli import run

WORDS = ["the", "capital", "of", "france", "is", "paris", "london", "a", "city", "good", "bad", "movie", "."]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


def _with_vocab(path):
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 64}))
    return path


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory):
    return _with_vocab(make_checkpoint(tmp_path_factory.mktemp("mlm"), cls_name="BertForMaskedLM", vocab_size=len(VOCAB)))


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    return _with_vocab(make_checkpoint(tmp_path_factory.mktemp("clf"), cls_name="BertForSequenceClassification",
                                       vocab_size=len(VOCAB), id2label=labels,
                                       label2id={v: k for k, v in labels.items()}))


def test_fill_mask_prints_top_k_with_probabilities(mlm_dir):
    text = "The capital of France is [MASK]."
    r = run("fill-mask", "--model", str(mlm_dir), "--top-k", "3", text)
    assert r.returncode == 0, r.stderr
    tok = BertTokenizer.from_pretrained(mlm_dir)
    x = tok(text)
    pos = int(np.flatnonzero(x["input_ids"][0] == tok.mask_token_id)[0])
    logits = BertForMaskedLM.from_pretrained(mlm_dir)(**x).logits[0, pos].astype(np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    top = np.argsort(-p, kind="stable")[:3]
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()[:2].strip().rstrip(".").isdigit()]
    assert len(lines) == 3, r.stdout
    for line, t in zip(lines, top):
        token = tok.convert_ids_to_tokens([int(t)])[0]
        assert line.split()[1] == token and f"{p[t]:.4f}" in line, (line, token, p[t])
    assert f"[MASK] at token {pos}:" in r.stdout


def test_fill_mask_two_masks_and_two_texts(mlm_dir):
    r = run("fill-mask", "--model", str(mlm_dir), "--top-k", "2", "[MASK] is a city.", "the [MASK] of [MASK]")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("[MASK] at token") == 3 and "text 1: 'the [MASK] of [MASK]'" in r.stdout


@pytest.mark.parametrize("args, phrase", [
    (["paris is a city"], "has no [MASK] token"),
    (["--top-k", "0", "a [MASK]"], "expected a positive integer, got 0"),
    (["--top-k", "1000", "a [MASK]"], "--top-k 1000 exceeds the vocabulary size (18)"),
])
def test_fill_mask_errors(mlm_dir, args, phrase):
    r = run("fill-mask", "--model", str(mlm_dir), *args)
    assert r.returncode != 0 and phrase in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_fill_mask_on_a_checkpoint_without_the_head(minilm_dir):
    r = run("fill-mask", "--model", str(minilm_dir), "the [MASK] is good")
    assert r.returncode == 1 and "cls.predictions.transform.dense.weight" in r.stderr, r.stderr


def test_classify_prints_labels_with_softmax_scores(clf_dir):
    texts = ["a good movie", "a bad movie ."]
    r = run("classify", "--model", str(clf_dir), *texts)
    assert r.returncode == 0, r.stderr
    tok = BertTokenizer.from_pretrained(clf_dir)
    logits = BertForSequenceClassification.from_pretrained(clf_dir)(**tok(texts, padding=True)).logits.astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    blocks = r.stdout.split("text ")[1:]
    names = {0: "negative", 1: "neutral", 2: "positive"}
    for i, block in enumerate(blocks):
        rows = [ln.split() for ln in block.splitlines()[1:]]
        assert [row[0] for row in rows] == [names[j] for j in np.argsort(-probs[i], kind="stable")]
        for row in rows:
            j = {v: k for k, v in names.items()}[row[0]]
            assert row[1] == f"{probs[i, j]:.4f}" and row[2] == "(softmax)"


def test_classify_multi_label_uses_sigmoid_and_top_k(tmp_path):
    d = _with_vocab(make_checkpoint(tmp_path, cls_name="BertForSequenceClassification", vocab_size=len(VOCAB),
                                    num_labels=4, problem_type="multi_label_classification"))
    r = run("classify", "--model", str(d), "--top-k", "2", "good movie")
    assert r.returncode == 0, r.stderr
    rows = [ln.split() for ln in r.stdout.splitlines()[1:]]
    assert len(rows) == 2 and all(row[2] == "(sigmoid)" for row in rows)
    logits = BertForSequenceClassification.from_pretrained(d)(**BertTokenizer.from_pretrained(d)("good movie")).logits[0]
    s = 1 / (1 + np.exp(-logits.astype(np.float64)))
    assert rows[0][1] == f"{s.max():.4f}"


def test_classify_on_a_checkpoint_without_the_head(minilm_dir):
    r = run("classify", "hello")
    assert r.returncode == 1 and "classifier.weight" in r.stderr and "Traceback" not in r.stderr, r.stderr
