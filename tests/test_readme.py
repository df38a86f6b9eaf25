"""The README's Python examples, then docs/interpretability.md's, run as written (in one namespace,
in order), so they cannot drift.
Blocks that name a checkpoint only the Hub has (google-bert/...) are skipped: no network here."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "interpretability.md"]


def python_blocks():
    return [(f"{doc.name} python block {i}", code) for doc in DOCS
            for i, code in enumerate(re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S))]


def test_the_readme_examples_run(minilm_dir, capsys):
    blocks = python_blocks()
    assert len(blocks) >= 3, "the README lost its examples"
    ran = 0
    ns: dict = {}
    for where, code in blocks:
        if "google-bert/" in code:
            continue
        exec(compile(code, where, "exec"), ns)
        ran += 1
    assert ran >= 5
    assert "out" in ns and ns["out"].last_hidden_state.ndim == 3
    assert ns["emb"].shape == (2, 384)
