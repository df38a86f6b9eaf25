"""The attention viewer's size and speed at bert-base shapes, and the README's screenshots.

    python -m benchmarks.viz [--model base|PATH] [--tokens 128] [--repeats 5] [--output FILE] [--screenshots DIR]

A random bert-base (12 layers × 12 heads, the vocabulary of BERT uncased) on real prose cut to
``--tokens``: the page's bytes and time to build; in headless Debian chromium from file://, the
time from navigation to the page's script done (``window.minibert.ready``), to the model view
drawn, and to one hover redraw in the head view (medians). ``--screenshots DIR`` also writes
viz-head.png, viz-model.png and viz-neuron.png of the real MiniLM on a sentence pair.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .common import machine, new_result, write_json
from .model import minilm_dir, model_dir, real_sentences

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


def _ms(page, script):
    """Milliseconds the page takes to run ``script`` (an expression), timed inside the page."""
    return page.evaluate(f"(() => {{ const t = performance.now(); {script}; return performance.now() - t; }})()")


def screenshots(browser, out_dir: Path):
    from minibert import BertModel, BertTokenizer
    from minibert.viz import attention_html

    d = minilm_dir()
    page_html = attention_html(BertModel.from_pretrained(d), BertTokenizer.from_pretrained(d),
                               "The cat sat on the mat because it was tired.", "Then it slept all day.")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pair.html"
        path.write_text(page_html, encoding="utf-8")
        page = browser.new_page(viewport={"width": 1100, "height": 640})
        page.goto(path.as_uri())
        page.wait_for_function("window.minibert && window.minibert.ready")
        page.select_option("#layer", "2")
        page.hover("#tokens-left .tok[data-index='8']")  # "it": where does the pronoun look?
        page.screenshot(path=str(out_dir / "viz-head.png"))
        page.mouse.move(1000, 620)
        page.set_viewport_size({"width": 1100, "height": 720})
        page.click("button[data-view=model]")
        page.screenshot(path=str(out_dir / "viz-model.png"))
        page.click("button[data-view=neuron]")
        page.select_option("#nhead", "8")
        page.select_option("#ntok", "8")
        page.screenshot(path=str(out_dir / "viz-neuron.png"))
        page.close()
    print(f"wrote {out_dir}/viz-head.png, viz-model.png, viz-neuron.png", file=sys.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="base", help="base (a random bert-base, made once) or a checkpoint folder")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", default=None, help="JSON file (default: a new file in benchmarks/results/)")
    p.add_argument("--screenshots", default=None, metavar="DIR", help="also write the three views' PNGs here")
    a = p.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from minibert import BertModel, BertTokenizer
    from minibert.viz import attention_html

    host = machine()
    print(f"host: {host['cpu']}, {' '.join(host['cpu_flags'])}", file=sys.stderr)
    model = BertModel.from_pretrained(model_dir(a.model))
    L, nH = model.config.num_hidden_layers, model.config.num_attention_heads
    tok = BertTokenizer.from_pretrained(minilm_dir())
    text = " ".join(real_sentences(40))
    t = time.perf_counter()
    page_html = attention_html(model, tok, text, max_length=a.tokens)
    build_s = time.perf_counter() - t
    size = len(page_html.encode("utf-8"))
    print(f"page: {size / 1e6:.2f} MB ({a.tokens} tokens, {L} x {nH} heads), built in {build_s:.2f} s", flush=True)
    rows = {"ready_ms": [], "model_view_ms": [], "hover_ms": []}
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        path = Path(tmp) / "base.html"
        path.write_text(page_html, encoding="utf-8")
        for _ in range(a.repeats):
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            t = time.perf_counter()
            page.goto(path.as_uri())
            page.wait_for_function("window.minibert && window.minibert.ready", timeout=60_000)
            rows["ready_ms"].append((time.perf_counter() - t) * 1e3)
            assert page.evaluate("minibert.tokens.length") == a.tokens
            rows["model_view_ms"].append(_ms(page, "document.querySelector('button[data-view=model]').click()"))
            page.click("button[data-view=head]")
            rows["hover_ms"].append(_ms(page, "document.querySelector('#tokens-left .tok').dispatchEvent("
                                              "new MouseEvent('mouseenter'))"))
            page.close()
        if a.screenshots:
            out_dir = Path(a.screenshots)
            out_dir.mkdir(parents=True, exist_ok=True)
            screenshots(browser, out_dir)
        browser.close()
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"chromium: ready {med['ready_ms']:.0f} ms, model view {med['model_view_ms']:.0f} ms, "
          f"hover redraw {med['hover_ms']:.0f} ms (medians of {a.repeats})", flush=True)
    out = a.output or new_result("viz")
    write_json(out, dict(machine=host, model=a.model, tokens=a.tokens, layers=L, heads=nH, page_bytes=size, build_s=build_s,
                         repeats=a.repeats, times_ms=rows, medians_ms=med))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
