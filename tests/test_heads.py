"""Task heads against transformers on random-weight checkpoints of each BertFor... class: logits,
hidden states, attentions and losses; missing head weights are an error naming them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import minibert
from conftest import TINY, TOL, assert_close, hf_forward, hf_model, make_checkpoint, random_batch
from minibert.weights import CheckpointError

# class -> (config overrides, our output fields compared with transformers')
HEADS = {
    "BertForMaskedLM": ({}, ["logits"]),
    "BertForNextSentencePrediction": ({}, ["logits"]),
    "BertForPreTraining": ({}, ["prediction_logits", "seq_relationship_logits"]),
    "BertForSequenceClassification": ({"num_labels": 3}, ["logits"]),
    "BertForTokenClassification": ({"num_labels": 5}, ["logits"]),
    "BertForQuestionAnswering": ({}, ["start_logits", "end_logits"]),
}


@pytest.fixture(scope="module", params=list(HEADS))
def head_checkpoint(request, tmp_path_factory):
    cfg, fields = HEADS[request.param]
    path = make_checkpoint(tmp_path_factory.mktemp(request.param), cls_name=request.param, seed=7, **cfg)
    return request.param, path, fields


@pytest.mark.parametrize("dtype,kernels", [("float32", "numba"), ("float32", "numpy"), ("float64", "numba")])
def test_head_matches_transformers(head_checkpoint, dtype, kernels):
    cls_name, path, fields = head_checkpoint
    ours = getattr(minibert, cls_name).from_pretrained(path, dtype=dtype, kernels=kernels)
    theirs = hf_model(path, dtype, cls_name)
    ids, mask, tt = random_batch(np.random.default_rng(1), TINY, B=3, T=13, pairs=True)
    o = ours(ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True, output_attentions=True)
    t = hf_forward(theirs, dtype, input_ids=ids, attention_mask=mask, token_type_ids=tt)
    tol = TOL["fp32" if dtype == "float32" else "fp64"]
    for f in fields:
        assert getattr(o, f).dtype == np.dtype(dtype)
        assert_close(getattr(o, f), getattr(t, f).numpy(), tol, f"{cls_name} {f}")
    assert len(o.hidden_states) == len(t.hidden_states) and len(o.attentions) == len(t.attentions)
    assert_close(o.hidden_states[-1], t.hidden_states[-1].numpy(), tol, f"{cls_name} hidden_states[-1]")
    assert_close(o.attentions[0], t.attentions[0].numpy(), tol, f"{cls_name} attentions[0]")
    assert o.loss is None and list(o.keys()) == fields + ["hidden_states", "attentions"]


def test_head_output_idioms(head_checkpoint):
    cls_name, path, fields = head_checkpoint
    model = getattr(minibert, cls_name).from_pretrained(path)
    ids, mask, _ = random_batch(np.random.default_rng(2), TINY)
    out = model(input_ids=ids, attention_mask=mask)
    assert out.hidden_states is None and out.attentions is None  # computed only when asked for
    tup = model(ids, mask, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == len(fields)
    np.testing.assert_array_equal(tup[0], out[0])
    np.testing.assert_array_equal(out[fields[0]], getattr(out, fields[0]))
    assert type(model).__name__ == cls_name and callable(model.forward)


# -- the masked-LM decoder: tied, present in the file, absent when it must be present --------------
def _mlm_logits(path, ids):
    ours = minibert.BertForMaskedLM.from_pretrained(path)(ids).logits
    theirs = hf_forward(hf_model(path, cls_name="BertForMaskedLM"), input_ids=ids).logits.numpy()
    return ours, theirs


def test_mlm_decoder_weight_absent_is_tied(tmp_path):
    path = make_checkpoint(tmp_path, cls_name="BertForMaskedLM", seed=3)
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), framework="np") as f:
        assert "cls.predictions.decoder.weight" not in f.keys()  # the case this test is about
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(2, 9))
    ours, theirs = _mlm_logits(path, ids)
    assert_close(ours, theirs, TOL["fp32"], "tied MLM logits")
    model = minibert.BertForMaskedLM.from_pretrained(path)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    assert "(decoder): Decoder(in_features=32, out_features=99, bias=True)" in repr(model)
    # the tie holds after assignment, as with a shared torch Parameter
    model.bert.embeddings.word_embeddings.weight = np.zeros((TINY["vocab_size"], TINY["hidden_size"]))
    logits = model(ids).logits
    assert_close(logits, np.broadcast_to(model.cls.predictions.bias, logits.shape), TOL["route_fp32"], "zero embeddings")
    model.cls.predictions.decoder.bias = np.full(TINY["vocab_size"], 2.0)
    np.testing.assert_array_equal(model.cls.predictions.bias, 2.0)
    assert_close(model(ids).logits, np.full(logits.shape, 2.0), TOL["route_fp32"], "decoder bias 2")


def test_mlm_decoder_weight_present_in_file(tmp_path):
    path = make_checkpoint(tmp_path, cls_name="BertForMaskedLM", seed=4, tie_word_embeddings=False)
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), framework="np") as f:
        decoder = f.get_tensor("cls.predictions.decoder.weight")
        emb = f.get_tensor("bert.embeddings.word_embeddings.weight")
    assert not np.array_equal(decoder, emb)
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(2, 9))
    ours, theirs = _mlm_logits(path, ids)
    assert_close(ours, theirs, TOL["fp32"], "untied MLM logits")
    np.testing.assert_array_equal(minibert.BertForMaskedLM.from_pretrained(path).cls.predictions.decoder.weight, decoder)


def test_mlm_decoder_in_file_wins_over_tie(tmp_path):
    # an old-style file: tie_word_embeddings is true but the file stores its own, different decoder.
    # transformers 5 then does not tie, and uses the file's decoder; so do we.
    from safetensors.numpy import load_file, save_file
    path = make_checkpoint(tmp_path, cls_name="BertForMaskedLM", seed=5)
    sd = load_file(str(path / "model.safetensors"))
    sd["cls.predictions.decoder.weight"] = np.random.default_rng(9).normal(
        0, 0.2, (TINY["vocab_size"], TINY["hidden_size"])).astype(np.float32)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    ids = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(2, 9))
    ours, theirs = _mlm_logits(path, ids)
    assert_close(ours, theirs, TOL["fp32"], "MLM logits with a stored decoder")


def test_untied_mlm_without_decoder_weight_is_an_error(tmp_path):
    from safetensors.numpy import load_file, save_file
    path = make_checkpoint(tmp_path, cls_name="BertForMaskedLM", seed=4, tie_word_embeddings=False)
    sd = load_file(str(path / "model.safetensors"))
    del sd["cls.predictions.decoder.weight"]
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"cls\.predictions\.decoder\.weight.*tie_word_embeddings"):
        minibert.BertForMaskedLM.from_pretrained(path)


# -- missing heads -------------------------------------------------------------------------------
@pytest.mark.parametrize("cls_name,missing", [
    ("BertForMaskedLM", r"cls\.predictions\.transform\.dense\.weight"),
    ("BertForNextSentencePrediction", r"cls\.seq_relationship\.weight"),
    ("BertForPreTraining", r"cls\.predictions\.bias"),
    ("BertForSequenceClassification", r"classifier\.weight"),
    ("BertForTokenClassification", r"classifier\.bias"),
    ("BertForQuestionAnswering", r"qa_outputs\.weight"),
])
def test_base_checkpoint_into_head_names_missing_tensors(tiny_dir, cls_name, missing):
    with pytest.raises(CheckpointError, match=missing):
        getattr(minibert, cls_name).from_pretrained(tiny_dir)


def test_pooler_heads_need_the_pooler(tmp_path):
    # a masked-LM file has no pooler; sequence classification reads pooler_output
    path = make_checkpoint(tmp_path, cls_name="BertForMaskedLM")
    with pytest.raises(CheckpointError, match=r"pooler\.dense\.weight.*BertForNextSentencePrediction"):
        minibert.BertForNextSentencePrediction.from_pretrained(path)


def test_classifier_shape_must_match_num_labels(tmp_path):
    path = make_checkpoint(tmp_path, cls_name="BertForSequenceClassification", num_labels=3)
    with pytest.raises(CheckpointError, match=r"classifier\.weight.*\(3, 32\).*\(4, 32\)"):
        minibert.BertForSequenceClassification.from_pretrained(path, num_labels=4)


def test_base_model_loads_a_head_checkpoint_and_keeps_the_heads(tmp_path):
    path = make_checkpoint(tmp_path, cls_name="BertForSequenceClassification", num_labels=3)
    model = minibert.BertModel.from_pretrained(path)
    assert set(model.heads) == {"classifier.weight", "classifier.bias"}
    clf = minibert.BertForSequenceClassification.from_pretrained(path)
    ids = np.array([[2, 5, 9, 3]])
    np.testing.assert_array_equal(clf.bert(ids).pooler_output, model(ids).pooler_output)  # the same kernels


# -- labels and config ------------------------------------------------------------------------------
def test_id2label_and_num_labels(tmp_path):
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    path = make_checkpoint(tmp_path, cls_name="BertForSequenceClassification", id2label=labels,
                           label2id={v: k for k, v in labels.items()})
    model = minibert.BertForSequenceClassification.from_pretrained(path)
    assert model.num_labels == 3 and model.id2label == labels
    assert model.classifier.weight.shape == (3, TINY["hidden_size"])
    with pytest.raises(ValueError, match="num_labels=0; expected a positive integer"):
        minibert.BertForSequenceClassification.from_pretrained(path, num_labels=0)


def _loss_pair(cls_name, path, inputs, **labels):
    ours = getattr(minibert, cls_name).from_pretrained(path, dtype="float64")(**inputs, **labels).loss
    theirs = hf_model(path, "float64", cls_name)
    with torch.no_grad():
        t = theirs(**{k: torch.as_tensor(v) for k, v in {**inputs, **labels}.items()}).loss.item()
    return float(ours), t


@pytest.mark.parametrize("cls_name,make_labels", [
    ("BertForMaskedLM", lambda rng, B, T: {"labels": np.where(rng.random((B, T)) < 0.4,
                                                               rng.integers(0, 99, (B, T)), -100)}),
    ("BertForNextSentencePrediction", lambda rng, B, T: {"labels": rng.integers(0, 2, B)}),
    ("BertForPreTraining", lambda rng, B, T: {"labels": rng.integers(0, 99, (B, T)),
                                              "next_sentence_label": rng.integers(0, 2, B)}),
    ("BertForTokenClassification", lambda rng, B, T: {"labels": np.where(rng.random((B, T)) < 0.8,
                                                                          rng.integers(0, 5, (B, T)), -100)}),
    ("BertForQuestionAnswering", lambda rng, B, T: {"start_positions": np.array([1, 4, T + 3]),
                                                    "end_positions": np.array([2, 6, 5])}),
])
def test_losses_match_transformers(tmp_path, cls_name, make_labels):
    path = make_checkpoint(tmp_path, cls_name=cls_name, seed=11, **HEADS[cls_name][0])
    rng = np.random.default_rng(3)
    ids, mask, _ = random_batch(rng, TINY, B=3, T=10)
    ours, theirs = _loss_pair(cls_name, path, {"input_ids": ids, "attention_mask": mask}, **make_labels(rng, 3, 10))
    assert abs(ours - theirs) <= TOL["fp64"], f"{cls_name} loss: {ours} vs {theirs}"


@pytest.mark.parametrize("problem_type,num_labels,labels", [
    (None, 3, np.array([0, 2, 1])),  # int labels: single-label
    ("multi_label_classification", 3, np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1]], dtype=np.float64)),
    (None, 1, np.array([0.5, -1.0, 2.0])),  # one label: regression
])
def test_sequence_classification_losses(tmp_path, problem_type, num_labels, labels):
    extra = {"problem_type": problem_type} if problem_type else {}
    path = make_checkpoint(tmp_path, cls_name="BertForSequenceClassification", num_labels=num_labels, **extra)
    ids, mask, _ = random_batch(np.random.default_rng(4), TINY, B=3, T=8)
    ours, theirs = _loss_pair("BertForSequenceClassification", path, {"input_ids": ids, "attention_mask": mask},
                              labels=labels)
    assert abs(ours - theirs) <= TOL["fp64"], f"{problem_type} loss: {ours} vs {theirs}"


@pytest.fixture(scope="module")
def mlm(tmp_path_factory):
    return minibert.BertForMaskedLM.from_pretrained(
        make_checkpoint(tmp_path_factory.mktemp("mlm"), cls_name="BertForMaskedLM"))


@pytest.mark.parametrize("labels,err,match", [
    (np.full((2, 4), 99), ValueError, r"labels contains 99 at \[0, 0\]; expected a class id in \[0, 99\) or -100"),
    (np.full((2, 4), -1), ValueError, r"labels contains -1"),
    (np.zeros((2, 3), dtype=np.int64), ValueError, r"labels has shape \(2, 3\); expected \(2, 4\)"),
    (np.zeros((2, 4)), TypeError, r"labels has dtype float64; expected integer class ids"),
    (np.full((2, 4), -100), ValueError, r"every entry of labels is -100"),
])
def test_bad_labels(mlm, labels, err, match):
    with pytest.raises(err, match=match):
        mlm(np.ones((2, 4), dtype=np.int64), labels=labels)


def test_pretraining_loss_needs_both_labels(tmp_path):
    model = minibert.BertForPreTraining.from_pretrained(make_checkpoint(tmp_path, cls_name="BertForPreTraining"))
    with pytest.raises(ValueError, match="needs both labels and next_sentence_label"):
        model(np.ones((1, 4), dtype=np.int64), labels=np.ones((1, 4), dtype=np.int64))


def test_qa_positions_are_checked(tmp_path):
    model = minibert.BertForQuestionAnswering.from_pretrained(make_checkpoint(tmp_path, cls_name="BertForQuestionAnswering"))
    ids = np.ones((2, 5), dtype=np.int64)
    with pytest.raises(ValueError, match=r"start_positions contains -1; expected a token position in \[0, 5\)"):
        model(ids, start_positions=np.array([-1, 0]), end_positions=np.array([1, 1]))
    with pytest.raises(ValueError, match="needs both start_positions and end_positions"):
        model(ids, start_positions=np.array([0, 0]))
    with pytest.raises(TypeError, match="start_positions has dtype float64"):
        model(ids, start_positions=np.array([0.0, 1.0]), end_positions=np.array([1, 1]))


def test_bad_problem_type(tmp_path):
    path = make_checkpoint(tmp_path, cls_name="BertForSequenceClassification", num_labels=2)
    cfg = json.loads((path / "config.json").read_text())
    cfg["problem_type"] = "ranking"
    (path / "config.json").write_text(json.dumps(cfg))
    model = minibert.BertForSequenceClassification.from_pretrained(path)
    with pytest.raises(ValueError, match="problem_type='ranking'"):
        model(np.ones((1, 3), dtype=np.int64), labels=np.array([1]))


def test_head_takes_patch_and_head_mask(head_checkpoint):
    """patch= on a task model against transformers' task model with a forward hook returning the
    same replacement; head_mask= there equals the same heads' probabilities patched to 0."""
    cls_name, path, fields = head_checkpoint
    ours = getattr(minibert, cls_name).from_pretrained(path)
    theirs = hf_model(path, "float32", cls_name)
    ids, mask, tt = random_batch(np.random.default_rng(3), TINY, B=2, T=9, pairs=True)
    handle = theirs.bert.encoder.layer[1].output.register_forward_hook(lambda m, a, out: out * 1.5 - 0.25)
    try:
        t = hf_forward(theirs, "float32", input_ids=ids, attention_mask=mask, token_type_ids=tt)
    finally:
        handle.remove()
    o = ours(ids, attention_mask=mask, token_type_ids=tt, patch={"encoder.layer.1.output": lambda v, n: v * 1.5 - 0.25})
    for f in fields:
        assert_close(getattr(o, f), getattr(t, f).numpy(), TOL["fp32"], f"{cls_name} {f} under a patch")
    hm = np.ones((TINY["num_hidden_layers"], TINY["num_attention_heads"]))
    hm[0, [0, 2]] = 0
    a = ours(ids, attention_mask=mask, token_type_ids=tt, head_mask=hm)
    zero = lambda p, n: p * np.array([0, 1, 0, 1], dtype=p.dtype)[:, None, None]  # noqa: E731
    b = ours(ids, attention_mask=mask, token_type_ids=tt, patch={"encoder.layer.0.attention.self.probs": zero})
    for f in fields:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
