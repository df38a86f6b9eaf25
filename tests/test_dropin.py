"""Code written for transformers and sentence-transformers runs with only the import changed, and
gives their numbers: the names it imports, padding positions, dtype names, labels, devices."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import minibert
from conftest import TINY, TOL, assert_close, hf_forward, hf_model, make_checkpoint, random_batch
from minibert import BertModel


# -- transformers' numbers by default ----------------------------------------------------------------
@pytest.mark.parametrize("cls_name", ["BertModel", "BertForTokenClassification"])
def test_padding_positions_are_transformers_by_default(tmp_path, cls_name):
    """Every position, padding included, as transformers computes it, without asking for it."""
    d = make_checkpoint(tmp_path, cls_name=cls_name, num_labels=3)
    ids, mask, _ = random_batch(np.random.default_rng(30), TINY, B=3, T=9)
    ours = getattr(minibert, cls_name).from_pretrained(d)
    assert ours.skip_padding is False
    theirs = hf_forward(hf_model(d, cls_name=cls_name), input_ids=ids, attention_mask=mask)
    out = ours(ids, attention_mask=mask)
    if cls_name == "BertModel":
        assert_close(out.last_hidden_state, theirs.last_hidden_state.numpy(), TOL["fp32"], "every position")
        assert_close(out.pooler_output, theirs.pooler_output.numpy(), TOL["fp32"], "pooler_output")
    else:
        assert_close(out.logits, theirs.logits.numpy(), TOL["fp32"], "token logits at every position")


def test_packed_mode_pooler_matches_with_left_padding(tiny_dir):
    """skip_padding=True: position 0 is padding in left-padded rows, and the pooler reads it."""
    rng = np.random.default_rng(31)
    ids, mask, _ = random_batch(rng, TINY, B=3, T=9)
    ids, mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()  # left padding
    assert not mask[:, 0].all()
    theirs = hf_forward(hf_model(tiny_dir), input_ids=ids, attention_mask=mask)
    out = BertModel.from_pretrained(tiny_dir, skip_padding=True)(ids, attention_mask=mask)
    assert_close(out.pooler_output, theirs.pooler_output.numpy(), TOL["fp32"], "pooler_output, left padding, packed")
    valid = mask == 1
    assert_close(out.last_hidden_state[valid], theirs.last_hidden_state.numpy()[valid], TOL["fp32"], "valid positions")


def test_sentence_vectors_do_not_depend_on_the_mode(minilm_dir):
    """SentenceEncoder runs packed inside, whatever the model's default: the same vectors."""
    enc = minibert.SentenceEncoder.from_pretrained(minilm_dir)
    texts = ["a short one", "a much longer sentence with many more tokens than the first one"]
    packed = enc.encode(texts)
    h = enc.model(**enc.tokenizer(texts, padding=True)).last_hidden_state  # dense: transformers' numbers
    mean = minibert.pooling.normalize(minibert.pooling.mean(h, enc.tokenizer(texts, padding=True)["attention_mask"]))
    assert_close(packed, mean, TOL["batching_fp32"], "packed vs dense")


# -- dtype, labels ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bf16", "bfloat16", "fp16", "fp32", "float16", "", None, np.float16, "auto"])
def test_only_float32_and_float64_are_accepted(tiny_dir, dtype):
    with pytest.raises(ValueError, match=r"dtype=.*not supported; expected 'float32' or 'float64'"):
        BertModel.from_pretrained(tiny_dir, dtype=dtype)


@pytest.mark.parametrize("dtype,expected", [("float32", np.float32), (np.float64, np.float64),
                                            (np.dtype("float32"), np.float32)])
def test_float_dtypes_by_name_type_or_dtype(tiny_dir, dtype, expected):
    assert BertModel.from_pretrained(tiny_dir, dtype=dtype).dtype == expected


def test_num_labels_keeps_the_checkpoints_labels_when_the_count_matches(tmp_path):
    labels = {0: "neg", 1: "neu", 2: "pos"}
    d = make_checkpoint(tmp_path, cls_name="BertForSequenceClassification", num_labels=3, id2label=labels,
                        label2id={v: k for k, v in labels.items()})
    import transformers

    theirs = transformers.BertForSequenceClassification.from_pretrained(str(d), num_labels=3).config.id2label
    ours = minibert.BertForSequenceClassification.from_pretrained(d, num_labels=3).config.id2label
    assert {int(k): v for k, v in ours.items()} == theirs == labels


# -- the names ported code imports ----------------------------------------------------------------------
def test_auto_classes_load_bert_checkpoints(tmp_path, tiny_dir):
    assert type(minibert.AutoModel.from_pretrained(tiny_dir)) is BertModel
    assert isinstance(minibert.AutoConfig.from_pretrained(tiny_dir), minibert.BertConfig)
    mlm = make_checkpoint(tmp_path / "mlm", cls_name="BertForMaskedLM")
    assert type(minibert.AutoModelForMaskedLM.from_pretrained(mlm)) is minibert.BertForMaskedLM
    with pytest.raises(TypeError, match="from_pretrained"):
        minibert.AutoModel()


def test_auto_classes_name_another_model_type(tmp_path):
    d = tmp_path / "roberta"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "roberta", "hidden_size": 32}))
    for cls in (minibert.AutoModel, minibert.AutoTokenizer, minibert.AutoModelForSequenceClassification):
        with pytest.raises(ValueError, match="model_type='roberta'"):
            cls.from_pretrained(d)


def test_auto_tokenizer_and_fast_name(minilm_dir):
    tok = minibert.AutoTokenizer.from_pretrained(minilm_dir)
    assert isinstance(tok, minibert.BertTokenizerFast) and minibert.BertTokenizerFast is minibert.BertTokenizer
    import transformers

    theirs = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))("hello world")["input_ids"]
    assert tok("hello world")["input_ids"].tolist() == [theirs]


def test_star_import_exports_the_public_names():
    ns = {}
    exec("from minibert import *", ns)
    for name in ("BertModel", "BertTokenizer", "BertTokenizerFast", "AutoModel", "AutoTokenizer", "AutoConfig",
                 "AutoModelForQuestionAnswering", "SentenceEncoder", "SentenceTransformer", "set_num_threads",
                 "get_num_threads", "BatchEncoding"):
        assert name in ns, name
    assert ns["SentenceTransformer"] is ns["SentenceEncoder"]


def test_batch_encoding_to_cpu_is_itself_and_other_devices_fail(minilm_dir):
    import torch

    x = minibert.BertTokenizer.from_pretrained(minilm_dir)("hello", return_tensors="np")
    assert x.to("cpu") is x and x.to(torch.device("cpu")) is x
    for device in ("cuda", torch.device("cuda:0"), "mps"):
        with pytest.raises(ValueError, match="runs on the CPU only"):
            x.to(device)


@pytest.mark.parametrize("name", ["gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish",
                                  "tanh", "sigmoid", "linear"])
def test_act2fn_gives_transformers_values(name):
    import torch
    from transformers.activations import ACT2FN as THEIRS

    from minibert.activations import ACT2FN

    x = np.linspace(-6, 6, 241)
    assert_close(ACT2FN[name](x), THEIRS[name](torch.from_numpy(x)).numpy(), TOL["fp64"], name)


# -- inputs_embeds -------------------------------------------------------------------------------------
@pytest.mark.parametrize("skip_padding", [False, True])
def test_inputs_embeds_match_transformers(tiny_dir, skip_padding):
    rng = np.random.default_rng(32)
    ids, mask, _ = random_batch(rng, TINY, B=2, T=7)
    emb = (rng.standard_normal((2, 7, TINY["hidden_size"])) * 0.5).astype(np.float32)
    theirs = hf_forward(hf_model(tiny_dir), inputs_embeds=emb, attention_mask=mask)
    out = BertModel.from_pretrained(tiny_dir, skip_padding=skip_padding)(inputs_embeds=emb, attention_mask=mask)
    valid = mask == 1
    assert_close(out.last_hidden_state[valid], theirs.last_hidden_state.numpy()[valid], TOL["fp32"], "inputs_embeds")
    assert_close(out.pooler_output, theirs.pooler_output.numpy(), TOL["fp32"], "pooler_output")


def test_inputs_embeds_on_a_task_model(tmp_path):
    d = make_checkpoint(tmp_path, cls_name="BertForSequenceClassification", num_labels=2)
    emb = (np.random.default_rng(33).standard_normal((2, 5, TINY["hidden_size"])) * 0.5).astype(np.float32)
    theirs = hf_forward(hf_model(d, cls_name="BertForSequenceClassification"), inputs_embeds=emb)
    ours = minibert.BertForSequenceClassification.from_pretrained(d)(inputs_embeds=emb)
    assert_close(ours.logits, theirs.logits.numpy(), TOL["fp32"], "logits from inputs_embeds")


@pytest.mark.parametrize("kwargs,match", [
    ({}, "give either input_ids or inputs_embeds"),
    ({"input_ids": [[1, 2]], "inputs_embeds": np.zeros((1, 2, 32))}, "both given; give one of them"),
    ({"inputs_embeds": np.zeros((1, 2, 31))}, r"inputs_embeds has shape \(1, 2, 31\); expected \[B, T, 32\]"),
])
def test_bad_inputs_embeds(tiny_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        BertModel.from_pretrained(tiny_dir)(**kwargs)


# -- sentence-transformers' names -------------------------------------------------------------------
def test_sentence_transformers_api(minilm_dir):
    enc = minibert.SentenceTransformer(str(minilm_dir))
    assert isinstance(enc, minibert.SentenceEncoder)
    texts = ["the cat sat", "a dog barked loudly"]
    emb = enc.encode(texts, batch_size=32, show_progress_bar=False, normalize_embeddings=True, convert_to_numpy=True)
    assert emb.shape == (2, 384) and emb.dtype == np.float32
    assert_close(np.linalg.norm(emb, axis=1), np.ones(2), TOL["route_fp32"], "unit vectors")
    as_list = enc.encode(texts, convert_to_numpy=False)
    assert isinstance(as_list, list) and len(as_list) == 2 and as_list[0].shape == (384,)
    tokens = enc.encode(texts, output_value="token_embeddings")
    x = enc.tokenizer(texts, padding=True)
    h = enc.model(**x).last_hidden_state
    for i, t in enumerate(tokens):
        n = int(x["attention_mask"][i].sum())
        assert t.shape == (n, 384)
        assert_close(t, h[i, :n], TOL["route_fp32"], f"token embeddings of sentence {i}")
    sims = enc.similarity(emb, emb[:1])
    assert sims.shape == (2, 1)
    assert_close(sims[:, 0], emb @ emb[0], TOL["route_fp32"], "cosine of embeddings")
    assert_close(enc.similarity(texts, texts[:1]), sims, TOL["route_fp32"], "texts give the same")
    with pytest.raises(ValueError, match="convert_to_tensor"):
        enc.encode(texts, convert_to_tensor=True)
    with pytest.raises(ValueError, match=r"similarity: a has shape \(2, 3\)"):
        enc.similarity(np.zeros((2, 3)))


# -- the process around it ------------------------------------------------------------------------------
def test_get_num_threads_is_an_int_as_in_torch():
    n = minibert.get_num_threads()
    assert isinstance(n, int) and n >= 1


def test_version_flag():
    r = subprocess.run([sys.executable, "-m", "minibert", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"minibert {minibert.__version__}", r.stdout + r.stderr


def test_the_distribution_is_not_the_other_minibert():
    """"minibert" on the package index is another project; ours installs under a name of its own."""
    from importlib import metadata

    dist = metadata.distribution("minibert-numpy")
    assert "minibert" in (dist.read_text("top_level.txt") or "minibert") and dist.metadata["Name"] == "minibert-numpy"


def test_first_run_says_it_is_compiling(monkeypatch, caplog, minilm_dir):
    import logging

    import minibert.kernels
    from minibert.cli import main

    caplog.set_level(logging.INFO)
    monkeypatch.setattr(minibert.kernels, "compiled", lambda dtype: False)
    assert main(["encode", "hello", "--model", str(minilm_dir)]) == 0
    assert "compiling minibert's float32 kernels for this CPU" in caplog.text
    caplog.clear()
    monkeypatch.setattr(minibert.kernels, "compiled", lambda dtype: True)
    assert main(["encode", "hello", "--model", str(minilm_dir)]) == 0
    assert "compiling" not in caplog.text


def test_kernels_know_when_they_are_compiled(tiny_dir):
    from minibert.kernels import compiled

    BertModel.from_pretrained(tiny_dir)(np.array([[1, 2, 3]]))  # compiles or loads the float32 attention kernel
    assert compiled("float32") is True


def test_multiple_choice_matches_transformers(tmp_path):
    import torch

    d = make_checkpoint(tmp_path, cls_name="BertForMultipleChoice")
    rng = np.random.default_rng(34)
    ids, mask, tt = random_batch(rng, TINY, B=6, T=7, pairs=True)
    ids, mask, tt = (a.reshape(2, 3, 7) for a in (ids, mask, tt))
    labels = np.array([2, 0])
    hf = hf_model(d, cls_name="BertForMultipleChoice")
    with torch.no_grad():
        theirs = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    token_type_ids=torch.as_tensor(tt), labels=torch.as_tensor(labels))
    auto = minibert.AutoModelForMultipleChoice.from_pretrained(d)
    assert type(auto) is minibert.BertForMultipleChoice
    for skip in (False, True):
        ours = minibert.BertForMultipleChoice.from_pretrained(d, skip_padding=skip)(
            ids, attention_mask=mask, token_type_ids=tt, labels=labels)
        assert ours.logits.shape == (2, 3)
        assert_close(ours.logits, theirs.logits.numpy(), TOL["fp32"], f"multiple-choice logits, skip_padding={skip}")
        assert_close(ours.loss, theirs.loss.numpy(), TOL["fp32"], "multiple-choice loss")
    with pytest.raises(ValueError, match=r"expects \[B, num_choices, T\]"):
        auto(ids[0])
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 7\); expected \[2, 3, T\]"):
        auto(ids, attention_mask=mask[0])


# -- messages that say what to do ------------------------------------------------------------------
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "minibert", *args], capture_output=True, text=True, timeout=600)


def test_a_directory_without_config_is_not_a_model_directory(tmp_path):
    r = _cli("encode", "hi", "--model", str(tmp_path))
    assert r.returncode == 1 and "is not a model directory: it has no config.json" in r.stderr, r.stderr
    assert "tokenizer" not in r.stderr.split("config.json")[0], r.stderr


def test_hub_hint_names_the_current_cli(monkeypatch):
    from minibert.hub import resolve_model_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="`hf download some-org/no-such-model`"):
        resolve_model_dir("some-org/no-such-model")


def test_revision_main_of_the_default_model_uses_the_packaged_copy(minilm_dir):
    from minibert.hub import DEFAULT_MODEL, resolve_model_dir

    assert resolve_model_dir(DEFAULT_MODEL, revision="main") == minilm_dir


def test_undecodable_input_names_file_line_and_fix(tmp_path, minilm_dir):
    f = tmp_path / "texts.txt"
    f.write_bytes("first line\nsecond line\ncaf\u00e9 au lait\n".encode("latin-1"))
    r = _cli("embed", "--input", str(f))
    assert r.returncode == 1 and f"--input {f}: line 3 is not valid utf-8" in r.stderr and "--encoding" in r.stderr, r.stderr
    out = tmp_path / "e.npy"
    r = _cli("embed", "--input", str(f), "--encoding", "latin-1", "--output", str(out))
    assert r.returncode == 0 and np.load(out).shape == (3, 384), r.stderr


def test_truncation_is_said_on_stderr(minilm_dir):
    r = _cli("embed", "short", "word " * 400)
    assert r.returncode == 0 and "1 of 2 text(s) are longer than 256 tokens" in r.stderr, r.stderr
    r = _cli("embed", "short", "a bit longer")
    assert r.returncode == 0 and "truncated" not in r.stderr, r.stderr


def test_token_lengths_and_the_library_says_when_it_truncates(minilm_dir, caplog):
    import logging

    import transformers

    texts = ["short", "word " * 400, "a bit longer than that"]
    tok = minibert.BertTokenizer.from_pretrained(minilm_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))(texts)["input_ids"]
    assert tok.lengths(texts).tolist() == [len(t) for t in theirs]
    enc = minibert.SentenceEncoder(minilm_dir)
    caplog.set_level(logging.WARNING)
    enc.encode(texts)
    assert "1 of 3 text(s) are longer than 256 tokens" in caplog.text
    with pytest.raises(ValueError, match="batch_size=0"):
        enc.encode(texts, output_value="token_embeddings", batch_size=0)
