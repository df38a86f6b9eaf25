"""What a patch costs, and how long activation patching takes, on the real MiniLM.

    python -m benchmarks.interventions [--shapes 1x16,8x128] [--repeats 15] [--output FILE]

For each shape and a few taps: the call with ``capture=`` that tap, and the same call with
``patch=`` a function at that tap (the value times 1, so the work after it is the same),
interleaved, medians. Then ``activation_patching`` over the 6 layer outputs × 16 positions
(clean and corrupted differ in one token): its time and the model calls it made.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from .common import machine, new_result, write_json
from .model import minilm_dir, parse_shapes, random_ids

TAPS = ["encoder.layer.3.output", "encoder.layer.3.attention.self.probs", "encoder.layer.3.attention.self.value"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="1x16,8x128")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--output", default=None, help="JSON file (default: a new file in benchmarks/results/)")
    a = p.parse_args(argv)
    try:
        shapes = [s for s in parse_shapes(a.shapes) if isinstance(s, tuple)]
    except ValueError as e:
        p.error(str(e))
    from minibert import BertModel
    from minibert.interventions import activation_patching

    host = machine()
    print(f"host: {host['cpu']}, {' '.join(host['cpu_flags'])}", file=sys.stderr)
    model = BertModel.from_pretrained(minilm_dir())
    rng = np.random.default_rng(0)
    rows = []
    for B, T in shapes:
        ids = random_ids(rng, model.config.vocab_size, B, T)
        x = dict(input_ids=ids, attention_mask=np.ones_like(ids))
        for tap in TAPS:
            calls = {"capture": lambda: model(**x, capture=tap),
                     "patch": lambda: model(**x, patch={tap: lambda v, name: v * 1})}
            for f in calls.values():
                f()  # warm up
            times = {k: [] for k in calls}
            for _ in range(a.repeats):
                for k, f in calls.items():
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
            cap, pat = (statistics.median(times[k]) for k in ("capture", "patch"))
            rows.append(dict(shape=[B, T], tap=tap, capture_ms=cap * 1e3, patch_ms=pat * 1e3, ratio=pat / cap))
            print(f"({B}, {T}) {tap:40s} capture {cap * 1e3:8.2f} ms  patch {pat * 1e3:8.2f} ms  x{pat / cap:.3f}",
                  flush=True)
    ids = random_ids(rng, model.config.vocab_size, 1, 16)
    clean = dict(input_ids=ids, attention_mask=np.ones_like(ids))
    corrupted = {k: v.copy() for k, v in clean.items()}
    corrupted["input_ids"][0, 5] = 2000
    taps = [f"encoder.layer.{i}.output" for i in range(model.config.num_hidden_layers)]
    metric = lambda out: float(out.pooler_output[0, 0])  # noqa: E731
    activation_patching(model, clean, corrupted, metric, taps=taps)  # warm up
    ts = []
    for _ in range(max(3, a.repeats // 3)):
        t = time.perf_counter()
        r = activation_patching(model, clean, corrupted, metric, taps=taps)
        ts.append(time.perf_counter() - t)
    ap = dict(taps=len(taps), positions=16, cells=r.grid.size, calls=r.calls, median_s=statistics.median(ts))
    print(f"activation_patching {len(taps)} taps x 16 positions: {ap['median_s'] * 1e3:.1f} ms, {r.calls} model calls",
          flush=True)
    out = a.output or new_result("interventions")
    write_json(out, dict(machine=host, repeats=a.repeats, patch_vs_capture=rows, activation_patching=ap))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
