"""The kernel benchmark harness validates every version and records what it ran (small shapes here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from minibert.kernels import OPS

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_benchmark_validates_times_and_writes_json(tmp_path):
    out = tmp_path / "k.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--model", "minilm", "--batch", "1", "--seq", "8",
                        "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["machine"]["cores"] and data["machine"]["libraries"]["numpy"]
    ran = {(row["op"], row["version"]) for row in data["results"]}
    benchmarked_ops = set(OPS)  # every registered op has a case: a new op must add one
    # and a torch row beside it (torch is installed with the test extra)
    assert ran == {(op, v) for op in benchmarked_ops for v in [*OPS[op], "torch"]}
    assert all(row["x_torch"] > 0 for row in data["results"])
    assert all(row["status"] == "ok" and row["ms"] > 0 for row in data["results"])
    for op in benchmarked_ops:
        assert op in r.stdout
