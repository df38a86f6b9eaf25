"""The README's Python examples run as written (in one namespace, in order), so they cannot drift.
Blocks that name a checkpoint only the Hub has (google-bert/...) are skipped: no network here."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_examples_run(minilm_dir, capsys):
    blocks = python_blocks()
    assert len(blocks) >= 3, "the README lost its examples"
    ran = 0
    ns: dict = {}
    for i, code in enumerate(blocks):
        if "google-bert/" in code:
            continue
        exec(compile(code, f"README.md python block {i}", "exec"), ns)
        ran += 1
    assert ran >= 3
    assert "out" in ns and ns["out"].last_hidden_state.ndim == 3
    assert ns["emb"].shape == (2, 384)
