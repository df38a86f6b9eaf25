"""Every version of every kernel on BERT shapes: validate against the NumPy reference, then time.

    python -m benchmarks.kernels [--model base|minilm|all] [--batch 8] [--seq 128] [--output FILE]

Prints op | version | shape | ms (median) | best ms | x reference | GB/s and writes JSON with the
machine, library versions and thread counts. A version that disagrees with the reference beyond
the tests' tolerance is reported as FAILED and not timed.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from minibert.kernels import OPS

from .common import machine, timeit, write_json

MODELS = {"base": dict(H=768, nH=12, I=3072), "minilm": dict(H=384, nH=12, I=1536)}
TOL = {"float32": 2e-5, "float64": 1e-12}  # the same as tests/conftest.py's kernel tolerances


def cases(m, B, T, dtype, rng):
    """(op, shape label, args, bytes moved) for one model's shapes."""
    H, nH, I = m["H"], m["nH"], m["I"]
    N = B * T
    f = np.dtype(dtype).itemsize
    x_i = rng.standard_normal((N, I)).astype(dtype)
    for act in ("gelu", "gelu_tanh", "relu", "silu"):
        yield act, f"[{N}, {I}]", (x_i,), 2 * x_i.size * f
    x = rng.standard_normal((N, H)).astype(dtype)
    r = rng.standard_normal((N, H)).astype(dtype)
    w = (1 + 0.1 * rng.standard_normal(H)).astype(dtype)
    b = (0.1 * rng.standard_normal(H)).astype(dtype)
    yield "layernorm", f"[{N}, {H}] + residual", (x, r, w, b, 1e-12), 3 * x.size * f
    s = rng.standard_normal((B, nH, T, T)).astype(dtype)
    mask = np.zeros((B, T), dtype=dtype)
    mask[:, T * 3 // 4:] = np.finfo(dtype).min  # a quarter of every row is padding
    yield "masked_softmax", f"[{B}, {nH}, {T}, {T}] + mask", (s, mask, (H // nH) ** -0.5), 2 * s.size * f


def run(models, B, T, dtype):
    rng = np.random.default_rng(0)
    rows = []
    for model in models:
        for op, shape, args, nbytes in cases(MODELS[model], B, T, dtype, rng):
            ref_out = OPS[op]["numpy"](*args)
            ref_ms = None
            for version, fn in OPS[op].items():
                out = fn(*args)
                diff = float(np.max(np.abs(out.astype(np.float64) - ref_out))) if out.size else 0.0
                row = dict(model=model, op=op, version=version, shape=shape, maxdiff=diff)
                if not (out.shape == ref_out.shape and diff <= TOL[dtype]):
                    row["status"] = "FAILED"
                    print(f"{op}/{version} {shape}: FAILED validation, maxdiff {diff:.3e}", file=sys.stderr)
                else:
                    t = timeit(lambda: fn(*args))
                    ms = t["median_s"] * 1e3
                    if version == "numpy":
                        ref_ms = ms
                    row.update(status="ok", ms=ms, best_ms=t["best_s"] * 1e3, repeats=t["repeats"],
                               gb_s=nbytes / t["median_s"] / 1e9,
                               x_reference=(ref_ms / ms) if ref_ms else None)
                rows.append(row)
                print(f"  {model:6s} {op:15s} {version:8s} done", file=sys.stderr)
    return rows


def print_table(rows):
    head = f"{'model':7s} {'op':15s} {'version':8s} {'shape':28s} {'ms':>9s} {'best ms':>9s} {'x ref':>7s} {'GB/s':>7s}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['model']:7s} {r['op']:15s} {r['version']:8s} {r['shape']:28s} FAILED maxdiff {r['maxdiff']:.2e}")
            continue
        xr = f"{r['x_reference']:.1f}" if r["x_reference"] else "-"
        print(f"{r['model']:7s} {r['op']:15s} {r['version']:8s} {r['shape']:28s} {r['ms']:9.3f} {r['best_ms']:9.3f} "
              f"{xr:>7s} {r['gb_s']:7.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["base", "minilm", "all"], default="all")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--output", default="benchmarks/results/kernels.json")
    a = p.parse_args(argv)
    models = list(MODELS) if a.model == "all" else [a.model]
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    rows = run(models, a.batch, a.seq, a.dtype)
    print_table(rows)
    path = write_json(a.output, dict(benchmark="kernels", started=started, batch=a.batch, seq=a.seq, dtype=a.dtype,
                                     machine=machine(), results=rows))
    print(f"wrote {path}", file=sys.stderr)
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
