"""The `minibert encode` main job: results on stdout, progress on stderr, .npz output, clear errors."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import TOL, assert_close
from minibert import BertModel, BertTokenizer


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "minibert", *args], capture_output=True, text=True, timeout=timeout)


def test_encode_default_model(minilm_dir):
    r = run("encode", "hello")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "text 0: 'hello'" in out
    assert "tokens (3): [CLS] hello [SEP]" in out
    assert "last_hidden_state (3, 384)" in out and "pooler_output (384,)" in out
    assert "loaded" in r.stderr and "loaded" not in out  # progress on stderr only
    # the printed values are the model's
    model = BertModel.from_pretrained(minilm_dir)
    h = model([101, 7592, 102]).last_hidden_state[0, 0, :5]
    assert " ".join(f"{v:+.4f}" for v in h) in out


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("minibert")
    assert exe, "the minibert console script is not on PATH"
    r = subprocess.run([exe, "encode", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--max-length" in r.stdout and "--output" in r.stdout


def test_encode_output_npz(tmp_path, minilm_dir):
    # a random-weight model with the real tokenizer files beside it
    import shutil

    from conftest import make_checkpoint

    model_dir = make_checkpoint(tmp_path / "model", vocab_size=30522)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(minilm_dir / f, model_dir)
    texts = ["hello", "a slightly longer text"]
    out_file = tmp_path / "out.npz"
    r = run("encode", "--model", str(model_dir), "--max-length", "6", "--output", str(out_file),
            "--hidden-states", "--attentions", *texts)
    assert r.returncode == 0, r.stderr
    d = np.load(out_file)
    assert set(d.files) == {"input_ids", "attention_mask", "last_hidden_state", "pooler_output", "hidden_states",
                            "attentions"}
    tok = BertTokenizer.from_pretrained(model_dir)
    x = tok(texts, padding=True, truncation=True, max_length=6)
    np.testing.assert_array_equal(d["input_ids"], x["input_ids"])
    assert d["input_ids"].shape == (2, 6)
    out = BertModel.from_pretrained(model_dir)(**x, output_hidden_states=True, output_attentions=True)
    assert_close(d["last_hidden_state"], out.last_hidden_state, TOL["route_fp32"], "saved last_hidden_state")
    assert_close(d["pooler_output"], out.pooler_output, TOL["route_fp32"], "saved pooler_output")
    assert d["hidden_states"].shape == (len(out.hidden_states),) + out.last_hidden_state.shape
    assert d["attentions"].shape == (len(out.attentions),) + out.attentions[0].shape


@pytest.mark.parametrize("args, phrase", [
    (["encode", "--max-length", "0", "x"], "expected a positive integer, got 0"),
    (["encode", "--max-length", "ten", "x"], "expected a positive integer, got 'ten'"),
    (["encode", "--max-length", "600", "x"], "--max-length 600 exceeds the model's max_position_embeddings (512)"),
    (["encode", "--model", "/nonexistent/model/dir", "x"], "model directory '/nonexistent/model/dir' does not exist"),
    (["encode", "--dtype", "float16", "x"], "invalid choice: 'float16'"),
    (["encode"], "the following arguments are required: TEXT"),
])
def test_encode_errors_are_clear(args, phrase, minilm_dir):
    r = run(*args)
    assert r.returncode != 0
    assert phrase in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
