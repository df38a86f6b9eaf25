"""The attention viewer (minibert.viz, `minibert inspect --html`) in a real browser: Debian's
chromium driven by Playwright, the page opened from file:// with no network."""
from __future__ import annotations

import numpy as np
import pytest

from minibert import BertModel, BertTokenizer
from minibert.viz import attention_html, show
from test_cli import run

CHROMIUM = "/usr/bin/chromium"
# no background traffic: the machine's closed network refuses it, and a test counts every request
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
TEXT, PAIR = "The cat sat on the mat because it was tired.", "Then it slept all day."


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def minilm(minilm_dir):
    return BertModel.from_pretrained(minilm_dir), BertTokenizer.from_pretrained(minilm_dir)


def open_page(browser, path):
    """The page loaded and its script run; the console errors and every request it made."""
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors, requests = [], []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.as_uri())
    page.wait_for_function("window.minibert && window.minibert.ready", timeout=10_000)
    return page, errors, requests


@pytest.fixture(scope="module")
def pair_page(minilm, browser, tmp_path_factory):
    model, tok = minilm
    path = tmp_path_factory.mktemp("viz") / "pair.html"
    path.write_text(attention_html(model, tok, TEXT, PAIR), encoding="utf-8")
    page, errors, requests = open_page(browser, path)
    yield page, errors, requests, path
    page.close()


def test_the_page_holds_the_model_s_numbers_and_asks_for_nothing(minilm, pair_page):
    model, tok = minilm
    page, errors, requests, path = pair_page
    assert requests == [path.as_uri()], requests
    x = tok(TEXT, PAIR)
    L = model.config.num_hidden_layers
    names = [f"encoder.layer.{i}.attention.self.{n}" for i in range(L) for n in ("query", "key")]
    out = model(**x, output_attentions=True, capture=names)
    mb = page.evaluate("({tokens: minibert.tokens, segments: minibert.segments, layers: minibert.layers,"
                       " heads: minibert.heads})")
    assert mb["tokens"] == tok.convert_ids_to_tokens(x["input_ids"][0])
    assert mb["segments"] == x["token_type_ids"][0].tolist() and 1 in mb["segments"]
    assert mb["layers"] == list(range(L)) and mb["heads"] == [list(range(12))] * L
    for layer in range(L):
        got = np.array(page.evaluate(f"[...Array(12).keys()].map(h => minibert.attention({layer}, h))"))
        diff = np.abs(got - out.attentions[layer][0]).max()
        assert diff <= 2e-3, f"layer {layer}: attention max abs difference {diff:.2e}"
        for kind in ("query", "key"):
            got = np.array(page.evaluate(f"[...Array(12).keys()].map(h => minibert.{kind}({layer}, h))"))
            want = out.captures[f"encoder.layer.{layer}.attention.self.{kind}"][0]
            rel = (np.abs(got - want) / (np.abs(want) + 1e-4)).max()
            assert rel <= 2e-3, f"layer {layer} {kind}: max relative difference {rel:.2e}"
    assert errors == [], errors


def test_clicking_hovering_filtering_and_the_neuron_view(minilm, pair_page):
    model, tok = minilm
    page, errors, _, _ = pair_page
    view = lambda: page.evaluate("minibert.view")  # noqa: E731
    seg = np.array(page.evaluate("minibert.segments"))
    T = len(seg)
    # model view: a click opens that layer and head in the head view
    page.click("button[data-view=model]")
    assert page.is_visible("#grid canvas[data-layer='2'][data-head='7']")
    page.click("#grid canvas[data-layer='2'][data-head='7']")
    v = view()
    assert v["tab"] == "head" and v["layer"] == 2
    assert page.evaluate("Array.from(minibert.view.active)") == [7]
    assert page.is_visible("#head") and not page.is_visible("#model")
    assert page.get_attribute("#heads span[data-head='7']", "class") in ("", None)
    assert "off" in page.get_attribute("#heads span[data-head='3']", "class")
    all_lines = view()["drawn"]
    assert all_lines > 0
    # hovering query token 4 leaves only its lines
    page.hover("#tokens-left .tok[data-index='4']")
    v = view()
    assert v["drawnQueries"] == [4] and 0 < v["drawn"] < all_lines
    page.mouse.move(1000, 800)
    assert view()["drawn"] == all_lines
    # head toggles: all heads back on
    for h in range(12):
        if h != 7:
            page.click(f"#heads span[data-head='{h}']")
    assert sorted(page.evaluate("Array.from(minibert.view.active)")) == list(range(12))
    # the pair filter: A -> B draws lines from sentence A's tokens only, fewer than all
    everything = view()["drawn"]
    page.select_option("#filter", "AB")
    v = view()
    assert v["filter"] == "AB" and 0 < v["drawn"] < everything
    assert all(seg[i] == 0 for i in v["drawnQueries"])
    page.select_option("#filter", "BB")
    assert all(seg[i] == 1 for i in view()["drawnQueries"])
    page.select_option("#filter", "all")
    assert view()["drawn"] == everything
    # neuron view: one row per key under the query row, its softmax the model's attention row
    page.click("button[data-view=neuron]")
    page.select_option("#nhead", "5")
    page.select_option("#ntok", "3")
    assert page.locator("#ntable tr").count() == 1 + 1 + T  # header, q, one per key
    probs = np.array(view()["neuron"]["probs"])
    want = model(**tok(TEXT, PAIR), output_attentions=True).attentions[2][0, 5, 3]
    assert np.abs(probs - want).max() <= 2e-3
    assert errors == [], errors


def test_a_subset_of_layers_and_bad_arguments(minilm, browser, tmp_path):
    model, tok = minilm
    path = tmp_path / "two.html"
    path.write_text(attention_html(model, tok, "a short text", layers=[0, -1]), encoding="utf-8")
    page, errors, _ = open_page(browser, path)
    assert page.evaluate("minibert.layers") == [0, 5]
    assert not page.is_visible("#pairlabel")  # one sentence: no pair filter
    with pytest.raises(Exception, match="layer 3 is not in this file; it has 0, 5"):
        page.evaluate("minibert.attention(3, 0)")
    with pytest.raises(Exception, match="head 12 out of range"):
        page.evaluate("minibert.query(0, 12)")
    assert errors == [], errors
    page.close()
    for kwargs, err, match in [(dict(layers=[6]), ValueError, r"has 6 layers \(0 .. 5\)"),
                               (dict(layers=[]), ValueError, "at least one"),
                               (dict(layers="x"), TypeError, "layer indices"),
                               (dict(text=3), TypeError, "strings")]:
        with pytest.raises(err, match=match):
            attention_html(model, tok, **{"text": "a text", **kwargs})


def test_jupyter_object_and_html_escaping(minilm, browser, tmp_path):
    model, tok = minilm
    view = show(model, tok, "</script><b>x</b>")
    assert view._repr_html_().startswith("<iframe srcdoc=") and "<script>" not in view._repr_html_()
    view.save(tmp_path / "x.html")
    page, errors, _ = open_page(browser, tmp_path / "x.html")
    x = tok("</script><b>x</b>")  # markup in the text stays data: the page's script still runs
    assert page.evaluate("minibert.tokens") == tok.convert_ids_to_tokens(x["input_ids"][0])
    assert errors == [], errors
    page.close()


def test_cli_inspect_writes_the_page(minilm_dir, tmp_path, browser):
    out = tmp_path / "inspect.html"
    r = run("inspect", "--model", str(minilm_dir), "the cat sat", "--pair", "it slept", "--html", str(out),
            "--layers", "1,3")
    assert r.returncode == 0, r.stderr
    page, errors, requests = open_page(browser, out)
    assert page.evaluate("minibert.layers") == [1, 3] and 1 in page.evaluate("minibert.segments")
    assert requests == [out.as_uri()] and errors == []
    page.close()
    for args, phrase in [(["--layers", "9"], "--layers 9 is out of range"),
                         (["--layers", "a,b"], "comma-separated layer indices")]:
        r = run("inspect", "--model", str(minilm_dir), "the cat", "--html", str(out), *args)
        assert r.returncode != 0 and phrase in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_max_length_cuts_the_tokens(minilm):
    model, tok = minilm
    page = attention_html(model, tok, "one two three four five six seven eight nine ten", max_length=6)
    assert '"T": 6' in page
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match="max_length must be an integer of at least 2"):
            attention_html(model, tok, "a text", max_length=bad)
