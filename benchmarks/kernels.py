"""Every version of every kernel on BERT shapes: validate against the NumPy reference, then time.

    python -m benchmarks.kernels [--model base|minilm|all] [--batch 8] [--seq 128] [--output FILE]

Prints op | version | shape | ms (median) | best ms | x reference | GB/s and writes JSON with the
machine, library versions and thread counts. A version that disagrees with the reference beyond
the tests' tolerance is reported as FAILED and not timed.

Each case is the call the model makes (activations and LayerNorm get the dense layer's bias to
fuse). When torch is installed, a "torch" row times the matching torch CPU op on the same shape
and threads, given what it gets inside transformers: there the bias is already in the GEMM's
output (addmm), so torch's activation/LayerNorm input is pre-biased outside the timer.
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
    b_i = (0.1 * rng.standard_normal(I)).astype(dtype)
    for act in ("gelu", "gelu_tanh", "relu", "silu"):
        yield act, f"[{N}, {I}] + bias", (x_i, b_i), 2 * x_i.size * f
    x = rng.standard_normal((N, H)).astype(dtype)
    r = rng.standard_normal((N, H)).astype(dtype)
    w = (1 + 0.1 * rng.standard_normal(H)).astype(dtype)
    b = (0.1 * rng.standard_normal(H)).astype(dtype)
    xb = (0.1 * rng.standard_normal(H)).astype(dtype)
    yield "layernorm", f"[{N}, {H}] + bias + residual", (x, r, w, b, 1e-12, xb), 3 * x.size * f
    s = rng.standard_normal((B, nH, T, T)).astype(dtype)
    mask = np.zeros((B, T), dtype=dtype)
    mask[:, T * 3 // 4:] = np.finfo(dtype).min  # a quarter of every row is padding
    yield "masked_softmax", f"[{B}, {nH}, {T}, {T}] + mask", (s, mask, (H // nH) ** -0.5), 2 * s.size * f


def torch_op(op, args):
    """(torch function of no arguments, its tensors) doing ``op`` on ``args`` as transformers does,
    or None without torch."""
    try:
        import torch
        import torch.nn.functional as tF
    except ImportError:
        return None
    t = torch.from_numpy
    if op in ("gelu", "gelu_tanh", "relu", "silu"):
        x = t(args[0] + args[1])  # the bias came with addmm
        f = {"gelu": tF.gelu, "gelu_tanh": lambda v: tF.gelu(v, approximate="tanh"), "relu": tF.relu,
             "silu": tF.silu}[op]
        return lambda: f(x)
    if op == "layernorm":
        x, r, w, b, eps, xb = args
        x, r, w, b = t(x + xb), t(r), t(w), t(b)
        return lambda: tF.layer_norm(x + r, (x.shape[-1],), w, b, eps)  # BertSelfOutput: LayerNorm(h + input)
    if op == "masked_softmax":
        s, mask, scale = args
        s, m = t(s), t(mask)[:, None, None, :]
        return lambda: torch.softmax(s * scale + m, dim=-1)  # eager attention: scores * scale + mask, softmax
    return None


def run(models, B, T, dtype, with_torch=True, threads=None):
    rng = np.random.default_rng(0)
    rows = []
    if with_torch:
        try:
            import torch

            torch.set_num_threads(threads or torch.get_num_threads())
        except ImportError:
            with_torch = False
    for model in models:
        for op, shape, args, nbytes in cases(MODELS[model], B, T, dtype, rng):
            ref_out = OPS[op]["numpy"](*args)
            ref_ms = None
            versions = dict(OPS[op])
            if with_torch and (tfn := torch_op(op, args)) is not None:
                versions["torch"] = lambda *_, tfn=tfn: tfn().numpy()
            for version, fn in versions.items():
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


def add_torch_ratios(rows):
    """x_torch: the torch row's time over each version's (above 1: faster than torch)."""
    torch_ms = {(r["model"], r["op"]): r["ms"] for r in rows if r["version"] == "torch" and r["status"] == "ok"}
    for r in rows:
        t = torch_ms.get((r["model"], r["op"]))
        r["x_torch"] = (t / r["ms"]) if t and r["status"] == "ok" else None
    return rows


def print_table(rows):
    head = (f"{'model':7s} {'op':15s} {'version':8s} {'shape':34s} {'ms':>9s} {'best ms':>9s} {'x ref':>7s} "
            f"{'x torch':>7s} {'GB/s':>7s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['model']:7s} {r['op']:15s} {r['version']:8s} {r['shape']:34s} FAILED maxdiff {r['maxdiff']:.2e}")
            continue
        xr = f"{r['x_reference']:.1f}" if r["x_reference"] else "-"
        xt = f"{r['x_torch']:.2f}" if r.get("x_torch") else "-"
        print(f"{r['model']:7s} {r['op']:15s} {r['version']:8s} {r['shape']:34s} {r['ms']:9.3f} {r['best_ms']:9.3f} "
              f"{xr:>7s} {xt:>7s} {r['gb_s']:7.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["base", "minilm", "all"], default="all")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--output", default="benchmarks/results/kernels.json")
    p.add_argument("--threads", type=int, default=None, help="threads for Numba, BLAS and torch (default: all)")
    p.add_argument("--no-torch", action="store_true", help="leave out the torch rows")
    a = p.parse_args(argv)
    models = list(MODELS) if a.model == "all" else [a.model]
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    if a.threads:
        from minibert import set_num_threads

        set_num_threads(a.threads)
    rows = add_torch_ratios(run(models, a.batch, a.seq, a.dtype, with_torch=not a.no_torch, threads=a.threads))
    print_table(rows)
    path = write_json(a.output, dict(benchmark="kernels", started=started, batch=a.batch, seq=a.seq, dtype=a.dtype,
                                     machine=machine(), results=rows))
    print(f"wrote {path}", file=sys.stderr)
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
