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
    # each version (torch's too) timed in turns: at least one call in each of the 5 slices
    assert all(row["repeats"] >= 5 and row["best_ms"] <= row["ms"] for row in data["results"])
    for op in benchmarked_ops:
        assert op in r.stdout


def run_benchmark(tmp_path, module, *args):
    """``python -m benchmarks.<module> *args --output FILE``: its JSON, after a zero exit."""
    out = tmp_path / f"{module}.json"
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args, "--output", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


def test_interventions_benchmark_times_patches_and_activation_patching(tmp_path):
    data = run_benchmark(tmp_path, "interventions", "--shapes", "1x16", "--repeats", "1")
    assert data["machine"]["cpu"] and "cpu_flags" in data["machine"]
    assert len(data["patch_vs_capture"]) == 3 and all(row["capture_ms"] > 0 and row["patch_ms"] > 0
                                                       for row in data["patch_vs_capture"])
    ap = data["activation_patching"]
    assert ap["cells"] == 6 * 16 and ap["calls"] == 2 + 2 and ap["median_s"] > 0  # 96 cells, 64 a call


def test_viz_benchmark_measures_the_page_in_chromium(tmp_path):
    from conftest import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "small", vocab_size=30522, max_position_embeddings=64)
    data = run_benchmark(tmp_path, "viz", "--model", str(ckpt), "--tokens", "16", "--repeats", "1")
    assert data["tokens"] == 16 and data["layers"] == 2 and data["page_bytes"] > 0 and data["machine"]["cpu"]
    assert all(len(v) == 1 and v[0] >= 0 for v in data["times_ms"].values())


def test_serve_benchmark_loads_a_real_server(tmp_path):
    data = run_benchmark(tmp_path, "serve", "--texts", "24", "--clients", "1,4")
    assert data["offline_texts_per_s"] > 0 and data["rss_idle_mb"] > 0 and data["rss_peak_mb"] >= data["rss_idle_mb"]
    assert [row["clients"] for row in data["rows"]] == [1, 4]
    assert all(row["errors"] == 0 and row["texts_per_s"] > 0 and row["model_calls"] >= 1 for row in data["rows"])


def test_ab_benchmark_gives_each_setting_as_many_calls_after_its_own(tmp_path, minilm_dir):
    """A call right after the other setting's process ran is slower than one after its own, so
    both settings must get as many of each kind; here the baseline is this checkout itself."""
    checkout = Path(__file__).resolve().parents[1]
    data = run_benchmark(tmp_path, "ab", "--baseline", str(checkout), "--model", "minilm", "--shapes", "1x16",
                         "--repeats", "4", "--processes", "2", "--gap", "0", "--no-torch")
    rows = {r["setting"]: r for r in data["rows"]}
    assert set(rows) == {"new", "baseline"} and all(r["maxdiff_vs_new"] == 0 for r in rows.values())
    assert rows["new"]["calls_after_own"] == rows["baseline"]["calls_after_own"] == 2, rows
    assert all(len(r["times_s"]) == 4 and r["after_own_ms"] > 0 and r["after_other_ms"] > 0 for r in rows.values())


def test_corpus_benchmark_times_local_and_dask(tmp_path):
    data = run_benchmark(tmp_path, "corpus", "--files", "2", "--rows", "4")
    assert set(data["runs"]) == {"local 1 x 2", "LocalCluster 2 x 1", "LocalCluster 1 x 2"}
    assert all(v["rows_per_s"] > 0 for v in data["runs"].values()) and data["parquet_write_us_per_row"] > 0


def test_model_benchmark_validates_times_and_records_every_engine(tmp_path):
    """The peer benchmark end to end on a small model with BERT's vocabulary: every engine it finds
    is checked against minibert first (maxdiff recorded), timed, and written to JSON and PNG; peers
    that are not installed are listed as skipped, never silently dropped."""
    from conftest import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "small", vocab_size=30522, max_position_embeddings=512)
    out, png = tmp_path / "m.json", tmp_path / "m.png"
    r = subprocess.run([sys.executable, "-m", "benchmarks.model", "--model", str(ckpt), "--repeats", "1",
                        "--gap", "0", "--output", str(out), "--chart", str(png)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["machine"]["commit"] and data["machine"]["cpu_flags"] is not None  # every run names its commit and host
    engines = {row["engine"] for row in data["results"]}
    assert {"minibert", "pytorch"} <= engines
    assert engines | set(data["skipped"]) == {"minibert", "minibert-packed", "pytorch", "onnxruntime", "ctranslate2",
                                              "openvino"}
    assert all(row["precision"] == "f32" for row in data["results"]), {r["engine"]: r["precision"] for r in data["results"]}
    shapes = {row["shape"] for row in data["results"]}
    assert len(shapes) == 5 and any(s.startswith("mixed") for s in shapes)
    for row in data["results"]:
        assert row["maxdiff_vs_minibert"] < 1e-3, row  # every peer agrees at the valid positions
        assert row["tokens_per_s"] > 0 and 0 < row["pct_sgemm_peak"]
    mixed = [row for row in data["results"] if row["shape"].startswith("mixed")]
    assert all(row["valid_tokens"] < row["padded_tokens"] for row in mixed)
    assert data["sgemm_peak_gflop_s"] > 0 and data["sgemm_peak_end_gflop_s"] > 0
    assert data["breakdown"]["ops"][-1]["op"] == "total forward"
    assert png.stat().st_size > 0
    assert "sgemm peak" in r.stdout and "per-op time" in r.stdout


def test_flops_count_matches_bert_base_figure():
    from benchmarks.model import flops

    # one 128-token bert-base sequence: 22.4 GFLOP (the figure the issue quotes)
    assert abs(flops(768, 3072, 12, [128]) / 1e9 - 22.35) < 0.01
    # padding does not count: two sequences of 10 and 30 tokens cost their own lengths' work
    assert flops(768, 3072, 12, [10, 30]) == flops(768, 3072, 12, [10]) + flops(768, 3072, 12, [30])


def test_breakdown_accounts_for_the_whole_forward(tiny_dir):
    import numpy as np

    from benchmarks.breakdown import breakdown
    from minibert import BertModel

    m = BertModel.from_pretrained(tiny_dir)
    rows = breakdown(m, {"input_ids": np.ones((2, 9), dtype=np.int64)}, repeats=2)
    ops = {r["op"] for r in rows}
    assert {"dense_act (GEMM + bias [+ act])", "dense_layernorm (GEMM + LN)", "layernorm",
            "attention (q·kᵀ, softmax, P·V)", "total forward"} <= ops
    parts = sum(r["ms"] for r in rows if r["op"] != "total forward")
    assert abs(parts - rows[-1]["ms"]) < 1e-6  # "other" is the remainder, so the parts add up
    assert m._k["layernorm"].__name__ != "timed"  # the kernels are unwrapped afterwards


def test_footprint_benchmark_measures_cold_and_warm_start(tmp_path):
    out = tmp_path / "f.json"
    r = subprocess.run([sys.executable, "-m", "benchmarks.footprint", "--repeats", "1", "--skip-memory",
                        "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["what"]: row for row in json.loads(out.read_text())["startup"]}
    compiled, warm = rows["minibert encode, cold, compiled in the process"], rows["minibert encode, warm JIT cache"]
    assert compiled["wall_s"] > warm["wall_s"] > 0  # it compiles what the warm run loads
    assert rows["minibert encode, cold JIT cache"]["wall_s"] > 0
    assert warm["peak_rss_mb"] > 10 and "transformers + torch, same job" in rows


def test_model_benchmark_shape_subsets():
    import pytest

    from benchmarks.model import DENSE_SHAPES, MIXED, parse_shapes

    assert parse_shapes("1x16, mixed") == [(1, 16), MIXED]
    assert parse_shapes(",".join(f"{B}x{T}" for B, T in DENSE_SHAPES)) == DENSE_SHAPES
    for bad in ("2x16", "", "1x16,big"):
        with pytest.raises(ValueError, match="expected a comma-separated subset of"):
            parse_shapes(bad)


def test_kernel_benchmark_reports_a_version_that_disagrees_and_does_not_time_it(monkeypatch, capsys):
    from benchmarks import kernels

    monkeypatch.setitem(OPS["relu"], "broken", lambda x, bias=None: OPS["relu"]["numpy"](x, bias) + 1e-3)
    monkeypatch.setattr(kernels, "ROUNDS", 1)
    rows = kernels.run(["minilm"], 1, 8, "float32")
    relu = {row["version"]: row for row in rows if row["op"] == "relu"}
    assert relu["broken"]["status"] == "FAILED" and "ms" not in relu["broken"]
    assert abs(relu["broken"]["maxdiff"] - 1e-3) < 1e-6
    assert relu["numpy"]["status"] == "ok" and relu["numpy"]["ms"] > 0
    assert "relu/broken [8, 1536] + bias: FAILED validation, maxdiff 1.000e-03" in capsys.readouterr().err


def test_benchmarks_write_a_new_file_unless_told(tmp_path):
    """A run never overwrites the committed results: every --output (and the chart) defaults to a
    new, time-stamped file in benchmarks/results/."""
    import re

    from benchmarks.common import new_result

    assert re.fullmatch(r"benchmarks/results/model-\d{8}-\d{6}\.json", new_result("model"))
    for name in ("model", "kernels", "footprint", "ab", "interventions", "viz", "serve", "corpus"):
        src = (ROOT / "benchmarks" / f"{name}.py").read_text()
        assert re.search(r'"--output", default=None', src), name
        assert 'default="benchmarks/results/' not in src, name
