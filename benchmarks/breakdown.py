"""Per-op time of minibert forward passes: where the time goes, so the next optimization aims at
the biggest slice.

    python -m benchmarks.breakdown [--model base|minilm|PATH] [--batch 8] [--seq 128] [--repeats 5]

Every kernel of the model's kernel set (the ``attention`` kernel is q·kᵀ, softmax and P·V
together; ``dense_act`` and ``dense_layernorm`` are the encoder's dense layers and the pooler's,
each GEMM with its bias and what follows it; ``gemm`` runs for weights that are not packed, i.e.
writable ones) and ``model.gemm`` (the task heads') are wrapped with a timer for the measured passes; what is left of the wall time is Python,
embedding gathers and copies ("other").

With the kernels wrapped, each layer's dense layers are remade to call the kernel set's ops on
every pass instead of the prepared kernels made at load (minibert.model.dense): the kernels' times
are the same, and "other" includes the ops' per-call argument checks that the prepared ones skip.
Layers also run op by op where the default path makes one call of a whole layer (up to 256 rows,
kernels/layer.py), so at small shapes "other" is the Python that path saves, not what it spends.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict

import numpy as np

from minibert import model as F


LABELS = {"attention": "attention (q·kᵀ, softmax, P·V)", "gemm": "gemm (writable weights, heads)",
          "dense_act": "dense_act (GEMM + bias [+ act])", "dense_layernorm": "dense_layernorm (GEMM + LN)"}


@contextlib.contextmanager
def timed_ops(bert_model):
    """Within the block, every kernel call and GEMM of ``bert_model`` adds its seconds to the
    yielded ``{op: [seconds, calls]}``."""
    acc = defaultdict(lambda: [0.0, 0])

    def wrap(name, fn):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                cell = acc[name]
                cell[0] += time.perf_counter() - t
                cell[1] += 1
        return timed

    def remake():  # the layers' dense layers (and the pooler's) from the kernel set as it is now
        for module in (*bert_model.encoder.layer, bert_model.pooler):
            if module is not None:
                module._remake()

    k = bert_model._k
    saved_k = dict(k)
    saved_gemm = F.gemm
    try:
        for op, fn in saved_k.items():
            k[op] = wrap(LABELS.get(op, op), fn)
        F.gemm = wrap(LABELS["gemm"], saved_gemm)
        remake()
        yield acc
    finally:
        k.clear()
        k.update(saved_k)
        F.gemm = saved_gemm
        remake()


def breakdown(bert_model, inputs, repeats=5):
    """[{op, ms (per forward), calls, share}] sorted by time, with "total" and "other" rows."""
    bert_model(**inputs)  # warm-up: JIT, caches
    with timed_ops(bert_model) as acc:
        t = time.perf_counter()
        for _ in range(repeats):
            bert_model(**inputs)
        total = (time.perf_counter() - t) / repeats
    rows = [dict(op=op, ms=s / repeats * 1e3, calls=n // repeats) for op, (s, n) in acc.items()]
    rows.sort(key=lambda r: -r["ms"])
    other = total * 1e3 - sum(r["ms"] for r in rows)
    rows.append(dict(op="other (Python, embedding gathers, copies)", ms=other, calls=None))
    for r in rows:
        r["share"] = r["ms"] / (total * 1e3)
    rows.append(dict(op="total forward", ms=total * 1e3, calls=None, share=1.0))
    return rows


def print_breakdown(rows, file=sys.stdout):
    print(f"{'op':45s} {'ms/forward':>11s} {'calls':>6s} {'share':>7s}", file=file)
    for r in rows:
        calls = "" if r["calls"] is None else str(r["calls"])
        print(f"{r['op']:45s} {r['ms']:11.2f} {calls:>6s} {r['share'] * 100:6.1f}%", file=file)


def main(argv=None):
    from .model import model_dir, random_ids

    from minibert import BertModel

    p = argparse.ArgumentParser(prog="python -m benchmarks.breakdown", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="base", help="base, minilm or a checkpoint directory")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    m = BertModel.from_pretrained(model_dir(a.model))
    ids = random_ids(np.random.default_rng(0), m.config.vocab_size, a.batch, a.seq)
    print_breakdown(breakdown(m, {"input_ids": ids}, a.repeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
