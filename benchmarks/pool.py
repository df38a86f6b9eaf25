"""One thread pool or two: minibert's forward pass with OpenBLAS's jobs on Numba's threads (the
default, ``minibert.blaspool``) against OpenBLAS keeping its own pool, back to back and after an
idle pause.

    python -m benchmarks.pool [--model base|minilm|all|PATH] [--shapes 1x16,1x128,8x128]
                              [--spin 40000,200000] [--repeats 15] [--rounds 2] [--gap 0.3] [--output FILE]
    python -m benchmarks.pool --wake

Settings: "shared" (the default: one pool, its idle workers spin for GOMP_SPINCOUNT iterations),
"own pools" (``MINIBERT_BLAS_ON_NUMBA_POOL=0``: OpenBLAS's threads for the GEMMs, Numba's workers
sleep at once) and, per ``--spin`` value, "shared" with that GOMP_SPINCOUNT. Both variables are
read once per process, so every (setting, model, shape) runs in a process of its own; ``--rounds``
repeats the whole sweep, settings alternating, so a noisy stretch of the host hits all of them.
In each process: 5 warm-up passes, then ``--repeats`` pairs of a pass right after the previous
one ("back to back") and a pass after ``--gap`` seconds of sleep ("after a pause": what a
request arriving at an idle server sees). Prints medians per setting and writes JSON.

``--wake`` instead measures what a pause costs by itself: the wall time of the first (and second)
trivial two-thread parallel region after sleeping 5 ms ... 1 s, in this process (the shared-pool
default), medians of 12. On the machines this project runs on the first region after a pause of
10 ms or more took ~4 ms, one scheduler tick: the halted vCPU of the worker is slow to come back,
whatever the thread pool.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .common import machine, write_json

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, statistics, sys, time
import numpy as np
import minibert
from minibert import blaspool
from benchmarks.model import model_dir
name, B, T, threads, repeats, gap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
minibert.set_num_threads(threads)
m = minibert.BertModel.from_pretrained(str(model_dir(name)))
ids = np.random.default_rng(0).integers(1000, 2000, (B, T))
mask = np.ones_like(ids)
def run():
    t = time.perf_counter()
    m(input_ids=ids, attention_mask=mask)
    return time.perf_counter() - t
for _ in range(5):
    run()
b2b, paused = [], []
for _ in range(repeats):
    b2b.append(run())
    time.sleep(gap)
    paused.append(run())
print(json.dumps(dict(back_to_back_s=b2b, after_pause_s=paused, shared_pool=blaspool.available(), blas_calls_on_numba_pool=blaspool.calls())))
"""


def wake_probe(threads, pauses=(0.005, 0.01, 0.02, 0.05, 0.1, 0.3, 1.0), repeats=12):
    import numpy as np
    from numba import njit, prange

    import minibert

    minibert.set_num_threads(threads)

    @njit(parallel=True)
    def tiny(a):
        for i in prange(a.size):
            a[i] += 1.0

    a = np.zeros(threads)
    tiny(a)
    rows = []
    for pause in pauses:
        first, second = [], []
        for _ in range(repeats):
            time.sleep(pause)
            for acc in (first, second):
                t = time.perf_counter()
                tiny(a)
                acc.append(time.perf_counter() - t)
        rows.append(dict(pause_s=pause, first_region_us=1e6 * statistics.median(first),
                         second_region_us=1e6 * statistics.median(second), repeats=repeats))
        print(f"pause {pause * 1e3:6.0f} ms: first region {rows[-1]['first_region_us']:8.0f} us, "
              f"second {rows[-1]['second_region_us']:6.0f} us")
    return rows


def settings(spins):
    out = {"shared": {}, "own pools": {"MINIBERT_BLAS_ON_NUMBA_POOL": "0"}}
    for s in spins:
        out[f"shared, GOMP_SPINCOUNT={s}"] = {"GOMP_SPINCOUNT": str(s)}
    return out


def run_child(env_extra, name, B, T, threads, repeats, gap):
    env = {k: v for k, v in os.environ.items()
           if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "MINIBERT_BLAS_ON_NUMBA_POOL")}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    r = subprocess.run([sys.executable, "-c", CHILD, name, str(B), str(T), str(threads), str(repeats), str(gap)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"{name} ({B}, {T}) {env_extra}: the child failed\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def parse_shapes(text):
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise SystemExit(f"--shapes {text!r}: expected positive batch x length pairs, e.g. 1x16,8x128")
    return shapes


def parse_spins(text):
    try:
        spins = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        spins = [-1]
    if any(s < 0 for s in spins):
        raise SystemExit(f"--spin {text!r}: expected comma-separated non-negative integers, e.g. 40000,200000")
    return spins


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.pool", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="all", help="base, minilm, all, or a checkpoint directory")
    p.add_argument("--shapes", default="1x16,1x128,8x128", help="batch x length, comma-separated")
    p.add_argument("--spin", default="", help="extra GOMP_SPINCOUNT values to try with the shared pool")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--gap", type=float, default=0.3)
    p.add_argument("--wake", action="store_true", help="only time the first parallel region after pauses")
    p.add_argument("--output", default=None, help="JSON file (default benchmarks/results/pool.json, "
                                                     "or pool-wake.json with --wake)")
    a = p.parse_args(argv)
    if a.wake:
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        rows = wake_probe(a.threads)
        path = write_json(a.output or "benchmarks/results/pool-wake.json",
                          dict(benchmark="pool --wake", started=started, threads=a.threads, machine=machine(), results=rows))
        print(f"wrote {path}")
        return
    models = ["minilm", "base"] if a.model == "all" else [a.model]
    shapes = parse_shapes(a.shapes)
    spins = parse_spins(a.spin)
    conf = settings(spins)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    samples = {}  # (model, shape, setting) -> {"back_to_back_s": [...], "after_pause_s": [...]}
    for rnd in range(a.rounds):
        for name in models:
            for B, T in shapes:
                order = list(conf) if rnd % 2 == 0 else list(conf)[::-1]
                for s in order:
                    got = run_child(conf[s], name, B, T, a.threads, a.repeats, a.gap)
                    cell = samples.setdefault((name, f"({B}, {T})", s), {"back_to_back_s": [], "after_pause_s": []})
                    for k in cell:
                        cell[k] += got[k]
                    cell["shared_pool"] = got["shared_pool"]
                    print(f"round {rnd + 1}: {name} ({B}, {T}) {s}: back to back "
                          f"{1e3 * statistics.median(got['back_to_back_s']):.2f} ms, after a pause "
                          f"{1e3 * statistics.median(got['after_pause_s']):.2f} ms", file=sys.stderr)
    rows = []
    for (name, shape, s), cell in samples.items():
        rows.append(dict(model=name, shape=shape, setting=s, shared_pool=cell["shared_pool"],
                         back_to_back_ms=1e3 * statistics.median(cell["back_to_back_s"]),
                         after_pause_ms=1e3 * statistics.median(cell["after_pause_s"]),
                         samples=len(cell["back_to_back_s"])))
    print(f"median ms per forward pass, {a.threads} threads, {a.rounds} rounds x {a.repeats} repeats, "
          f"pause {a.gap} s")
    print(f"{'model':8s} {'shape':10s} {'setting':34s} {'back to back':>13s} {'after pause':>12s}")
    for r in rows:
        print(f"{r['model']:8s} {r['shape']:10s} {r['setting']:34s} {r['back_to_back_ms']:13.2f} "
              f"{r['after_pause_ms']:12.2f}")
    path = write_json(a.output or "benchmarks/results/pool.json", dict(benchmark="pool", started=started, threads=a.threads, repeats=a.repeats,
                                     rounds=a.rounds, gap_s=a.gap, machine=machine(), results=rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
