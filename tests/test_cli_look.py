"""`minibert embed`, `similarity` and `inspect`: printed and saved values are the library's, which
the other tests hold to transformers; inspect's entropies are checked against transformers directly."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

import minibert
from conftest import TOL, assert_close, hf_forward, hf_model
from test_cli import run

TEXTS = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."]


@pytest.fixture(scope="module")
def encoder(minilm_dir):
    return minibert.SentenceEncoder.from_pretrained(minilm_dir)


def test_embed_texts_to_npy(tmp_path, encoder, minilm_dir):
    out = tmp_path / "e.npy"
    r = run("embed", *TEXTS, "--output", str(out))
    assert r.returncode == 0, r.stderr
    v = np.load(out)
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert_close(v, encoder.encode(TEXTS), TOL["route_fp32"], "printed vectors")
    assert "wrote" in r.stderr and r.stdout == ""


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_embed_input_file_with_progress(tmp_path, encoder, fmt):
    texts = [f"sentence number {i} about {w}" for i, w in enumerate(["cats", "dogs", "rain", "tax"] * 10)]
    path = tmp_path / f"in.{fmt}"
    lines = texts if fmt == "txt" else [json.dumps({"id": i, "text": t}) for i, t in enumerate(texts)]
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "e.npy"
    r = run("embed", "--input", str(path), "--output", str(out), "--batch-size", "8")
    assert r.returncode == 0, r.stderr
    assert_close(np.load(out), encoder.encode(texts), TOL["route_fp32"], "saved vectors")
    assert "batches" in r.stderr and "5/5" in r.stderr  # tqdm progress, 40 texts / 8 a batch


def test_embed_prints_without_output_and_overrides(encoder):
    r = run("embed", "--pooling", "cls", "--no-normalize", "hello world")
    assert r.returncode == 0, r.stderr
    v = encoder.encode(["hello world"], pooling="cls", normalize=False)[0]
    assert " ".join(f"{x:+.4f}" for x in v[:5]) in r.stdout and f"norm {np.linalg.norm(v):.4f}" in r.stdout


@pytest.mark.parametrize("args, phrase", [
    (["embed"], "nothing to embed: give TEXTs or --input FILE"),
    (["embed", "x", "--input", "f.txt"], "give TEXTs or --input FILE, not both"),
    (["embed", "--input", "/nonexistent/in.txt"], "--input /nonexistent/in.txt: No such file or directory"),
    (["embed", "x", "--output", "e.txt"], "--output e.txt: expected a .npy file name"),
    (["embed", "x", "--batch-size", "0"], "expected a positive integer, got 0"),
    (["similarity", "only one"], "similarity needs at least two TEXTs; got 1"),
    (["inspect", "x", "--layer", "6"], "--layer 6 is out of range; the model has 6 layers (0 .. 5)"),
    (["inspect", "x", "--head", "12", "--attention-png", "a.png"], "--head 12 is out of range; the model has 12 heads"),
    (["inspect", "x", "--head", "1"], "--head selects the head to draw: give --attention-png FILE too"),
])
def test_errors_are_clear(args, phrase, minilm_dir):
    r = run(*args)
    assert r.returncode != 0 and phrase in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_embed_bad_jsonl(tmp_path, minilm_dir):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    r = run("embed", "--input", str(path))
    assert r.returncode == 1 and "line 2 has no string 'text' field" in r.stderr, r.stderr


def test_similarity_prints_the_cosine_matrix(encoder):
    r = run("similarity", *TEXTS)
    assert r.returncode == 0, r.stderr
    e = encoder.encode(TEXTS).astype(np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    rows = [ln.split() for ln in r.stdout.splitlines() if re.match(r"^\s+\d+\s+-?\d\.\d{4}", ln)]
    assert len(rows) == 3
    for i, row in enumerate(rows):
        assert row[1:] == [f"{c:.4f}" for c in sim[i]], (row, sim[i])
    assert sim[0, 1] > sim[0, 2]  # the two sentences about eating are the similar pair


def test_inspect_prints_tree_tokens_norms_entropies_and_pooler(minilm_dir, tmp_path):
    text = "The cat sat on the mat."
    png = tmp_path / "att.png"
    r = run("inspect", text, "--pooler", "--attention-png", str(png), "--layer", "-1")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "BertModel: 22,713,216 parameters" in out
    assert "query (Linear): 147,840 parameters  [weight [384, 384], bias [384]]" in out
    assert "layer (ModuleList): 6 x BertLayer" in out and "1-5: the same shapes as 0" in out
    assert "tokens (9): [CLS](101) the(1996) cat(4937)" in out
    # entropies and norms against transformers' own attentions and hidden states
    tok = minibert.BertTokenizer.from_pretrained(minilm_dir)
    x = tok(text)
    t = hf_forward(hf_model(minilm_dir), **x)
    for i in range(6):
        p = t.attentions[i][0].double().numpy()
        ent = -(p * np.log(np.where(p > 0, p, 1))).sum(-1).mean(-1)
        norm = np.linalg.norm(t.hidden_states[i + 1][0].double().numpy(), axis=-1).mean()
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [str(i)] and len(ln.split()) == 14)
        printed = [float(v) for v in line.split()[1:]]
        assert abs(printed[0] - norm) <= TOL["printed"], (line, norm)
        assert_close(printed[1:], ent, TOL["printed"], "printed entropies")
    pooled = t.pooler_output[0].double().numpy()
    h_cls = t.last_hidden_state[0, 0].double().numpy()
    cos = h_cls @ pooled / np.linalg.norm(h_cls) / np.linalg.norm(pooled)
    assert f"cosine(h_CLS, pooler_output) = {cos:.4f}" in out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "all 12 heads" in r.stderr


def test_inspect_one_head_png(tmp_path, minilm_dir):
    png = tmp_path / "one.png"
    r = run("inspect", "hello world", "--attention-png", str(png), "--layer", "0", "--head", "3")
    assert r.returncode == 0 and png.is_file() and "layer 0, head 3" in r.stderr, r.stderr


def test_inspect_without_matplotlib_says_how_to_get_it(tmp_path, minilm_dir):
    code = ("import sys; sys.modules['matplotlib'] = None; from minibert.cli import main; "
            f"sys.exit(main(['inspect', 'hi', '--attention-png', {str(tmp_path / 'a.png')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "pip install matplotlib" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "embeddings" not in r.stdout, "the check comes before the work: nothing printed"
