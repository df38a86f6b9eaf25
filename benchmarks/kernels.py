"""Every version of every kernel on BERT shapes: validate against the NumPy reference, then time.

    python -m benchmarks.kernels [--model base|minilm|all] [--batch 8] [--seq 128] [--output FILE]

Prints op | version | shape | ms (median) | best ms | x reference | GB/s and writes JSON with the
machine, library versions and thread counts. A version that disagrees with the reference beyond
the tests' tolerance is reported as FAILED and not timed.

Each case is the call the model makes (activations and LayerNorm get the dense layer's bias to
fuse). When torch is installed, a "torch" row times the matching torch CPU op on the same shape
and threads (in a process of its own), given what it gets inside transformers: there the bias is already in the GEMM's
output (addmm), so torch's activation/LayerNorm input is pre-biased outside the timer. The
versions of a case and its torch op are timed taking turns (5 slices of up to 0.2 s or 50 calls
each, in a rotating order, 50 ms idle and one untimed call before each), so a change in the
machine's load reaches all of them alike. malloc is
set up as a model sets it (minibert/runtime.py): each output reuses the block the last one freed, as
torch's caching allocator does, instead of arriving as fresh pages the kernel must zero.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import numpy as np

from minibert.kernels import OPS

from .common import machine, new_result, write_json

MODELS = {"base": dict(H=768, nH=12, I=3072), "minilm": dict(H=384, nH=12, I=1536)}
TOL = {"float32": 2e-5, "float64": 1e-12}  # the same as tests/conftest.py's kernel tolerances


def cases(m, B, T, dtype, rng):
    """(op, shape label, args, bytes moved, FLOPs or None) for one model's shapes."""
    H, nH, I = m["H"], m["nH"], m["I"]
    N = B * T
    f = np.dtype(dtype).itemsize
    x_i = rng.standard_normal((N, I)).astype(dtype)
    b_i = (0.1 * rng.standard_normal(I)).astype(dtype)
    for act in ("gelu", "gelu_tanh", "relu", "silu"):
        yield act, f"[{N}, {I}] + bias", (x_i, b_i), 2 * x_i.size * f, None
    x = rng.standard_normal((N, H)).astype(dtype)
    r = rng.standard_normal((N, H)).astype(dtype)
    w = (1 + 0.1 * rng.standard_normal(H)).astype(dtype)
    b = (0.1 * rng.standard_normal(H)).astype(dtype)
    xb = (0.1 * rng.standard_normal(H)).astype(dtype)
    yield "layernorm", f"[{N}, {H}] + bias + residual", (x, r, w, b, 1e-12, xb), 3 * x.size * f, None
    s = rng.standard_normal((B, nH, T, T)).astype(dtype)
    mask = np.zeros((B, T), dtype=dtype)
    mask[:, T * 3 // 4:] = np.finfo(dtype).min  # a quarter of every row is padding
    yield "masked_softmax", f"[{B}, {nH}, {T}, {T}] + mask", (s, mask, (H // nH) ** -0.5), 2 * s.size * f, None
    qkv = rng.standard_normal((N, 3 * H)).astype(dtype)
    starts = np.arange(B + 1, dtype=np.int64) * T
    # reads q, k, v once and writes the context; the [L, L] scores are counted as FLOPs, not bytes
    dH = H // nH
    yield "attention", f"[{B}, {nH}, {T}, {dH}] + mask", (qkv, starts, nH, dH ** -0.5, mask), \
        (qkv.size + N * H) * f, 4 * B * nH * T * T * dH
    # the FFN's first GEMM: one short sentence (16 rows), and the whole batch; BERT-like scales
    w_i = (0.02 * rng.standard_normal((I, H))).astype(dtype)
    w_i.flags.writeable = False  # as from_pretrained loads weights: numba_packed packs it once (warm-up)
    for rows in (16, N):
        x_h = rng.standard_normal((rows, H)).astype(dtype)
        yield "gemm", f"[{rows}, {H}] x [{I}, {H}]ᵀ", (x_h, w_i), (x_h.size + w_i.size + rows * I) * f, \
            2 * rows * H * I
    # the FFN's dense layers whole (kernels/dense.py): the GEMM with its bias and GELU, and the
    # second GEMM with its bias, the residual and the LayerNorm
    w_o = (0.02 * rng.standard_normal((H, I))).astype(dtype)
    w_o.flags.writeable = False
    for rows in (16, N):
        x_h = rng.standard_normal((rows, H)).astype(dtype)
        yield "dense_act", f"[{rows}, {H}] x [{I}, {H}]ᵀ, gelu", (x_h, w_i, b_i, "gelu"), \
            (x_h.size + w_i.size + rows * I) * f, 2 * rows * H * I
        x_f = rng.standard_normal((rows, I)).astype(dtype)
        r_h = rng.standard_normal((rows, H)).astype(dtype)
        yield "dense_layernorm", f"[{rows}, {I}] x [{H}, {I}]ᵀ, LN", \
            (x_f, w_o, b, r_h, w, xb, 1e-12), (x_f.size + w_o.size + 2 * rows * H) * f, 2 * rows * H * I


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
    if op == "gemm":  # nn.Linear's product, here without the bias (added by the next kernel)
        x, w = t(args[0]), t(args[1])
        return lambda: tF.linear(x, w)
    if op == "dense_act":  # BertIntermediate: addmm, then the activation (only "gelu" is benchmarked)
        x, w, b, _ = (t(a) if isinstance(a, np.ndarray) else a for a in args)
        return lambda: tF.gelu(tF.linear(x, w, b))
    if op == "dense_layernorm":  # BertOutput: LayerNorm(addmm + input)
        x, w, b, r, lw, lb, eps = (t(a) if isinstance(a, np.ndarray) else a for a in args)
        return lambda: tF.layer_norm(tF.linear(x, w, b) + r, (r.shape[-1],), lw, lb, eps)
    if op == "attention":
        qkv, starts, nH, scale, mask = args
        B, T = mask.shape
        N, H = qkv.shape[0], qkv.shape[1] // 3
        heads = qkv.reshape(B, T, 3, nH, H // nH).transpose(2, 0, 3, 1, 4)  # [3, B, nH, T, dH]
        q, k, v = (t(np.ascontiguousarray(heads[i])) for i in range(3))  # as transformers' BertSelfAttention has them
        m = t(mask)[:, None, None, :]
        return lambda: tF.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale).transpose(1, 2).reshape(N, H)
    return None


ROUNDS = 5  # each version is timed in this many slices, the versions (and torch) taking turns
SLICE_S, SLICE_MAX = 0.2, 50  # a slice: calls until 0.2 s or 50 calls (at least one)
# idle before each slice: the previous slice's threads (Numba's workers spin ~0.25 ms after a
# kernel, torch's OpenMP threads a few ms) stop spinning before the next one is timed
SLICE_GAP_S = 0.05


def time_slice(fn) -> list:
    """Seconds of each call of ``fn`` in one slice (see SLICE_S), after one untimed call that
    wakes the threads the gap before the slice let sleep."""
    fn()
    times = []
    start = time.perf_counter()
    while not times or (len(times) < SLICE_MAX and time.perf_counter() - start < SLICE_S):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def check(out, ref_out, dtype):
    """(max abs difference from the reference, whether it passes)."""
    diff = float(np.max(np.abs(out.astype(np.float64) - ref_out))) if out.size else 0.0
    return diff, out.shape == ref_out.shape and diff <= TOL[dtype]


class TorchOps:
    """The torch ops in a process of its own (torch's OpenMP pool and Numba's slow each other down
    several-fold in one process, seen in benchmarks.model), kept for the whole run, so that each
    case can time torch in turn with minibert's versions. It makes the same arrays (same seed, same
    order) and answers "check" (the maxdiff of torch's op, or None if it has none) and "time" (one
    slice of calls)."""

    def __init__(self, models, B, T, dtype, threads):
        import multiprocessing as mp

        from . import ORIGINAL_ENV

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_torch_serve, args=(child, models, B, T, dtype, threads, ORIGINAL_ENV),
                                daemon=True)
        self.proc.start()
        child.close()
        if self.conn.recv() != "ready":
            raise RuntimeError("the torch process did not start")

    def ask(self, *msg):
        self.conn.send(msg)
        return self.conn.recv()

    def close(self):
        self.conn.send(("close",))
        self.proc.join(60)


def _torch_serve(conn, models, B, T, dtype, threads, env):
    import os

    os.environ.clear()
    os.environ.update(env)  # the user's environment, before torch reads its OpenMP settings
    import torch

    torch.set_num_threads(threads or torch.get_num_threads())
    rng = np.random.default_rng(0)  # as in run(): the same arrays
    found = {(model, op, shape): (op, args) for model in models
             for op, shape, args, _, _ in cases(MODELS[model], B, T, dtype, rng)}
    fns = {}
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg[0] == "close":
            return
        key = msg[1]
        if msg[0] == "check":
            op, args = found[key]
            fn = torch_op(op, args)
            if fn is None:
                conn.send(None)
                continue
            fns[key] = fn
            conn.send(check(fn().numpy(), OPS[op]["numpy"](*args), dtype))
        else:  # "time"
            conn.send(time_slice(fns[key]))


def run(models, B, T, dtype, torch=None):
    """Validate every registered version (and torch's op, with a TorchOps), then time them taking
    turns: ROUNDS slices each, in a rotating order, so a change in the machine's load in the
    middle of a case reaches all of them alike."""
    rng = np.random.default_rng(0)  # the same arrays in the torch process
    rows = []
    for model in models:
        for op, shape, args, nbytes, flops in cases(MODELS[model], B, T, dtype, rng):
            ref_out = OPS[op]["numpy"](*args)
            timed = {}  # version -> (row, time one slice)

            def add(version, diff, ok, slice_):
                rows.append(dict(model=model, op=op, version=version, shape=shape, maxdiff=diff))
                if ok:
                    timed[version] = (rows[-1], slice_)
                else:
                    rows[-1]["status"] = "FAILED"
                    print(f"{op}/{version} {shape}: FAILED validation, maxdiff {diff:.3e}", file=sys.stderr)

            for version, fn in OPS[op].items():
                add(version, *check(fn(*args), ref_out, dtype), lambda fn=fn: time_slice(lambda: fn(*args)))
            answer = torch.ask("check", (model, op, shape)) if torch is not None else None
            if answer is not None:
                add("torch", *answer, lambda key=(model, op, shape): torch.ask("time", key))
            order = list(timed)
            samples = {v: [] for v in order}
            for v in order:  # warm-up: first calls (packing a weight, a cold cache) are not timed
                timed[v][1]()
            for r in range(ROUNDS):
                for v in order[r % len(order):] + order[:r % len(order)]:
                    time.sleep(SLICE_GAP_S)
                    samples[v] += timed[v][1]()
            for v, (row, _) in timed.items():
                t = samples[v]
                med = statistics.median(t)
                row.update(status="ok", ms=med * 1e3, best_ms=min(t) * 1e3, repeats=len(t), gb_s=nbytes / med / 1e9,
                           gflop_s=flops / med / 1e9 if flops else None)
            print(f"  {model:6s} {op:15s} {len(timed)} versions timed", file=sys.stderr)
    return rows


def ratios(rows):
    """Each row's x_reference (the NumPy reference's time over the row's) and x_torch (the torch
    op's time over the row's; above 1 is faster), within its case."""
    def case(r):
        return r["model"], r["op"], r["shape"]

    ok = {case(r) + (r["version"],): r["ms"] for r in rows if r["status"] == "ok"}
    for r in rows:
        key = case(r)
        ref, t = ok.get(key + ("numpy",)), ok.get(key + ("torch",))
        good = r["status"] == "ok"
        r["x_reference"] = (ref / r["ms"]) if good and ref else None
        r["x_torch"] = (t / r["ms"]) if good and t else None
    return rows


def print_table(rows):
    head = (f"{'model':7s} {'op':15s} {'version':11s} {'shape':34s} {'ms':>9s} {'best ms':>9s} {'x ref':>7s} "
            f"{'x torch':>7s} {'GB/s':>7s} {'GFLOP/s':>8s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['model']:7s} {r['op']:15s} {r['version']:11s} {r['shape']:34s} FAILED maxdiff {r['maxdiff']:.2e}")
            continue
        xr = f"{r['x_reference']:.1f}" if r["x_reference"] else "-"
        xt = f"{r['x_torch']:.2f}" if r.get("x_torch") else "-"
        gf = f"{r['gflop_s']:.1f}" if r.get("gflop_s") else "-"
        print(f"{r['model']:7s} {r['op']:15s} {r['version']:11s} {r['shape']:34s} {r['ms']:9.3f} {r['best_ms']:9.3f} "
              f"{xr:>7s} {xt:>7s} {r['gb_s']:7.2f} {gf:>8s}")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels", description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["base", "minilm", "all"], default="all")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--output", default=None, help="JSON file (default: a new file in benchmarks/results/)")
    p.add_argument("--threads", type=int, default=None, help="threads for Numba, BLAS and torch (default: all)")
    p.add_argument("--no-torch", action="store_true", help="leave out the torch rows")
    a = p.parse_args(argv)
    models = list(MODELS) if a.model == "all" else [a.model]
    from minibert.runtime import keep_freed_memory

    keep_freed_memory()  # as in the model: outputs reuse freed blocks instead of fresh zeroed pages
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    if a.threads:
        from minibert import set_num_threads

        set_num_threads(a.threads)
    torch = None
    if not a.no_torch and importlib.util.find_spec("torch") is not None:
        torch = TorchOps(models, a.batch, a.seq, a.dtype, a.threads)
    try:
        rows = run(models, a.batch, a.seq, a.dtype, torch)
    finally:
        if torch is not None:
            torch.close()
    rows = ratios(rows)
    print_table(rows)
    path = write_json(a.output or new_result("kernels"), dict(benchmark="kernels", started=started, batch=a.batch, seq=a.seq, dtype=a.dtype,
                                     machine=machine(), results=rows))
    print(f"wrote {path}", file=sys.stderr)
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
