"""One thread pool or two, pinned or not: minibert's forward pass with OpenBLAS's jobs on Numba's
threads (the default, ``minibert.blaspool``) against OpenBLAS keeping its own pool, and with the
pass's threads on CPUs of their own (the default, ``minibert.affinity``) or where the OS puts
them; back to back and after idle pauses.

    python -m benchmarks.pool [--model base|minilm|all|PATH] [--shapes 1x16,1x128,8x128]
                              [--spin 40000,200000] [--repeats 15] [--rounds 2] [--gap 0.005,0.3] [--output FILE]
    python -m benchmarks.pool --wake
    python -m benchmarks.pool --after [--spin 100000]

Settings: "shared" (the default: one pool, its idle workers spin for GOMP_SPINCOUNT iterations,
pinned, woken at the start of each pass: ``minibert.blaspool.wake``), "shared, no early wake"
(``MINIBERT_WAKE_EARLY=0``), "shared, unpinned" (``MINIBERT_PIN_THREADS=0``), "own pools"
(``MINIBERT_BLAS_ON_NUMBA_POOL=0``: OpenBLAS's threads for the GEMMs, Numba's workers sleep at
once) and, per ``--spin`` value, "shared" with that GOMP_SPINCOUNT. The variables are read once
per process, so every setting runs in a process of its own; for each (model, shape) they are all
started, warmed up (5 passes) and then timed *interleaved*: ``--repeats`` times, every setting in
a rotating order does a pass right after one of its own ("back to back"), then, for each pause in
``--gap``, a pass that many seconds after one of its own ("after a pause": 5 ms is a caller doing
a little work between calls, 0.3 s a request arriving at an idle server), while the other
processes wait idle. ``--rounds`` repeats all of it with new processes. Prints medians per setting
and writes JSON.

``--hog 0.5`` runs a neighbour process busy half of one CPU (anywhere the OS puts it) during the
timings: what the settings do next to another busy program.

``--after`` instead measures what the workers' spinning costs the program after a pass: a NumPy
product (OpenBLAS's own threads) right after a MiniLM (1, 16) pass against 50 ms after one, with
minibert's GOMP_SPINCOUNT and each ``--spin`` value.

``--wake`` instead measures what a pause costs by itself: the wall time of the first (and second)
trivial two-thread parallel region after sleeping 5 ms ... 1 s, in this process, first with the
threads unpinned, then inside ``blaspool.shared()`` as a forward pass runs them (pinned), medians
of 12.
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
import json, sys, time
import numpy as np
import minibert
from minibert import affinity, blaspool
from benchmarks.model import model_dir
name, B, T, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
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
print(json.dumps(dict(shared_pool=blaspool.available(), pinned=bool(affinity.pinned()) and
                      all(t[1] is not None for t in affinity.pinned().values()),
                      woken_early=blaspool.wake_arrivals() > 0)), flush=True)
for line in sys.stdin:  # "b2b": a pass right after another; "after G": a pass G seconds after another
    cmd = line.split()
    run()
    if cmd[0] == "after":
        time.sleep(float(cmd[1]))
    print(run(), flush=True)
"""


def wake_probe(threads, pauses=(0.005, 0.01, 0.02, 0.05, 0.1, 0.3, 1.0), repeats=12):
    """Medians of the first and second trivial parallel region after each pause: first with the
    threads where the OS puts them, then inside ``blaspool.shared()`` (a forward pass's setting:
    the workers pinned, the caller off their CPUs, see minibert.affinity)."""
    import contextlib

    import numpy as np
    from numba import njit, prange

    import minibert
    from minibert import affinity, blaspool

    minibert.set_num_threads(threads)

    @njit(parallel=True)
    def tiny(a):
        for i in prange(a.size):
            a[i] += 1.0

    a = np.zeros(threads)
    tiny(a)
    rows = {pause: dict(pause_s=pause, repeats=repeats) for pause in pauses}
    for label, ctx in (("", contextlib.nullcontext), ("pinned_", blaspool.shared)):  # unpinned first: pinning lasts
        with ctx():
            tiny(a)  # pins the workers (once) in the pinned setting
        for pause in pauses:
            first, second = [], []
            for _ in range(repeats):
                time.sleep(pause)
                for acc in (first, second):
                    t = time.perf_counter()
                    with ctx():
                        tiny(a)
                    acc.append(time.perf_counter() - t)
            rows[pause].update({f"{label}first_region_us": 1e6 * statistics.median(first),
                                f"{label}second_region_us": 1e6 * statistics.median(second)})
    pinned = any(t[1] is not None for t in affinity.pinned().values())
    for r in rows.values():
        r["pinned"] = pinned
        print(f"pause {r['pause_s'] * 1e3:6.0f} ms: first region {r['first_region_us']:8.0f} us, second "
              f"{r['second_region_us']:6.0f} us; {'pinned' if pinned else 'not pinned (here)'}: first "
              f"{r['pinned_first_region_us']:6.0f} us, second {r['pinned_second_region_us']:6.0f} us")
    return list(rows.values())


AFTER = """
import json, sys, time, statistics
import numpy as np
import minibert
from benchmarks.model import model_dir
threads, repeats = int(sys.argv[1]), int(sys.argv[2])
minibert.set_num_threads(threads)
m = minibert.BertModel.from_pretrained(str(model_dir("minilm")))
ids = np.random.default_rng(0).integers(1000, 2000, (1, 16))
a = np.random.default_rng(1).standard_normal((768, 768)).astype(np.float32)
for _ in range(5):
    m(ids)
    a @ a
right, later = [], []
for _ in range(repeats):  # the product right after a pass, and 50 ms after one, in turn
    m(ids)
    t = time.perf_counter(); a @ a; right.append(time.perf_counter() - t)
    m(ids)
    time.sleep(0.05)
    t = time.perf_counter(); a @ a; later.append(time.perf_counter() - t)
print(json.dumps(dict(right_after_ms=1e3 * statistics.median(right), after_50ms_ms=1e3 * statistics.median(later))))
"""


SETTING_VARS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "MINIBERT_BLAS_ON_NUMBA_POOL", "MINIBERT_PIN_THREADS",
                "MINIBERT_WAKE_EARLY")


def child_env(extra):
    """The environment of a measured process: this one's without the variables the settings
    choose (SETTING_VARS), plus ``extra``, with the repository importable."""
    env = {k: v for k, v in os.environ.items() if k not in SETTING_VARS}
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def after_probe(threads, spins, repeats):
    """What the workers' spinning after a pass costs the program's next BLAS call: a NumPy
    [768, 768] float32 product (OpenBLAS's own threads, outside the pass) right after a MiniLM
    (1, 16) pass, against 50 ms after one, medians of ``repeats``; one process per GOMP_SPINCOUNT
    value (minibert's default first), run one after another."""
    rows = []
    for spin in [None] + list(spins):
        env = child_env({} if spin is None else {"GOMP_SPINCOUNT": str(spin)})
        r = subprocess.run([sys.executable, "-c", AFTER, str(threads), str(repeats)], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"the --after probe failed: {r.stderr[-2000:]}")
        row = dict(spin="default" if spin is None else spin, **json.loads(r.stdout.strip().splitlines()[-1]))
        rows.append(row)
        print(f"GOMP_SPINCOUNT {row['spin']!s:>9s}: a [768, 768] sgemm right after a pass {row['right_after_ms']:.3f} ms, "
              f"50 ms after one {row['after_50ms_ms']:.3f} ms")
    return rows


HOG = """
import sys, time
busy = float(sys.argv[1]) * 0.01  # of every 10 ms
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < busy:
        pass
    time.sleep(0.01 - busy)
"""


def start_hog(duty):
    """A neighbour for ``--hog``: one process busy ``duty`` of every 10 ms (one CPU's worth at 1),
    where the OS puts it, as another program on the machine would be."""
    return subprocess.Popen([sys.executable, "-c", HOG, str(duty)])


def settings(spins):
    out = {"shared": {}, "shared, no early wake": {"MINIBERT_WAKE_EARLY": "0"},
           "shared, unpinned": {"MINIBERT_PIN_THREADS": "0"}, "own pools": {"MINIBERT_BLAS_ON_NUMBA_POOL": "0"}}
    for s in spins:
        out[f"shared, GOMP_SPINCOUNT={s}"] = {"GOMP_SPINCOUNT": str(s)}
    return out


class Child:
    """A process running one setting's model, timing passes on request (see CHILD)."""

    def __init__(self, env_extra, name, B, T, threads):
        env = child_env(env_extra)
        self.what = f"{name} ({B}, {T}) {env_extra}"
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, name, str(B), str(T), str(threads)], env=env, cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.status = json.loads(self._line())

    def _line(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.what}: the child failed\n{self.proc.stderr.read()[-3000:]}")
        return line

    def time(self, gap=None):  # seconds of one pass, right after another (gap None) or gap seconds after
        self.proc.stdin.write("b2b\n" if gap is None else f"after {gap}\n")
        self.proc.stdin.flush()
        return float(self._line())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def parse_shapes(text):
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise SystemExit(f"--shapes {text!r}: expected positive batch x length pairs, e.g. 1x16,8x128")
    return shapes


def parse_gaps(text):
    try:
        gaps = [float(g) for g in text.split(",") if g.strip()]
    except ValueError:
        gaps = []
    if not gaps or any(not (0 < g <= 60) for g in gaps):
        raise SystemExit(f"--gap {text!r}: expected comma-separated pauses in seconds, each in (0, 60], e.g. 0.005,0.3")
    return gaps


def parse_spins(text):
    try:
        spins = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        spins = [-1]
    if any(s < 0 for s in spins):
        raise SystemExit(f"--spin {text!r}: expected comma-separated non-negative integers, e.g. 40000,200000")
    return spins


def timings(a, models, shapes, gaps, conf):
    """{(model, shape, setting): {"back_to_back_s": [...], "after_pause_s": {gap: [...]}}}, every
    setting in a process of its own, timed interleaved (see the module docstring)."""
    samples = {}
    for rnd in range(a.rounds):
        for name in models:
            for B, T in shapes:
                children = {s: Child(conf[s], name, B, T, a.threads) for s in conf}  # loaded one after another
                cells = {s: samples.setdefault((name, f"({B}, {T})", s),
                                               {"back_to_back_s": [], "after_pause_s": {str(g): [] for g in gaps}})
                         for s in conf}
                for i in range(a.repeats):  # interleaved: each repeat times every setting, in a rotating order
                    order = list(conf)[i % len(conf):] + list(conf)[:i % len(conf)]
                    for s in order:
                        cells[s]["back_to_back_s"].append(children[s].time())
                    for g in gaps:
                        for s in order:
                            cells[s]["after_pause_s"][str(g)].append(children[s].time(g))
                for s, c in children.items():
                    cells[s].update({k: c.status[k] for k in ("shared_pool", "pinned", "woken_early")})
                    c.close()
                    got = cells[s]
                    print(f"round {rnd + 1}: {name} ({B}, {T}) {s}: back to back "
                          f"{1e3 * statistics.median(got['back_to_back_s']):.2f} ms, after a pause of "
                          + ", ".join(f"{g} s {1e3 * statistics.median(ts):.2f} ms" for g, ts in got["after_pause_s"].items()),
                          file=sys.stderr)
    return samples


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.pool", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="all", help="base, minilm, all, or a checkpoint directory")
    p.add_argument("--shapes", default="1x16,1x128,8x128", help="batch x length, comma-separated")
    p.add_argument("--spin", default="", help="extra GOMP_SPINCOUNT values to try with the shared pool")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--gap", default="0.005,0.3", help="pauses before the timed passes, seconds, comma-separated")
    p.add_argument("--hog", type=float, default=0.0,
                   help="run a busy neighbour process during the timings: the share of one CPU it takes, 0 to 1")
    p.add_argument("--wake", action="store_true", help="only time the first parallel region after pauses")
    p.add_argument("--after", action="store_true",
                   help="only time a NumPy product right after a pass, per --spin value and the default")
    p.add_argument("--output", default=None, help="JSON file (default benchmarks/results/pool.json, "
                                                     "pool-wake.json with --wake, pool-after.json with --after)")
    a = p.parse_args(argv)
    if a.after:
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        rows = after_probe(a.threads, parse_spins(a.spin), a.repeats)
        path = write_json(a.output or "benchmarks/results/pool-after.json",
                          dict(benchmark="pool --after", started=started, threads=a.threads, machine=machine(), results=rows))
        print(f"wrote {path}")
        return
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
    gaps = parse_gaps(a.gap)
    conf = settings(spins)
    if not 0 <= a.hog <= 1:
        raise SystemExit(f"--hog {a.hog}: expected a share of one CPU between 0 and 1")
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    hog = start_hog(a.hog) if a.hog else None
    try:
        samples = timings(a, models, shapes, gaps, conf)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    rows = []
    for (name, shape, s), cell in samples.items():
        rows.append(dict(model=name, shape=shape, setting=s, shared_pool=cell["shared_pool"], pinned=cell["pinned"],
                         woken_early=cell["woken_early"],
                         back_to_back_ms=1e3 * statistics.median(cell["back_to_back_s"]),
                         after_pause_ms={g: 1e3 * statistics.median(ts) for g, ts in cell["after_pause_s"].items()},
                         samples=len(cell["back_to_back_s"])))
    print(f"median ms per forward pass, {a.threads} threads, {a.rounds} rounds x {a.repeats} repeats"
          + (f", a neighbour busy {a.hog:.0%} of one CPU" if a.hog else ""))
    print(f"{'model':8s} {'shape':10s} {'setting':34s} {'back to back':>13s} "
          + " ".join(f"{'after ' + str(g) + ' s':>12s}" for g in gaps))
    for r in rows:
        print(f"{r['model']:8s} {r['shape']:10s} {r['setting']:34s} {r['back_to_back_ms']:13.2f} "
              + " ".join(f"{v:12.2f}" for v in r["after_pause_ms"].values()))
    path = write_json(a.output or "benchmarks/results/pool.json",
                      dict(benchmark="pool", started=started, threads=a.threads, repeats=a.repeats, rounds=a.rounds,
                           gaps_s=gaps, hog=a.hog, machine=machine(), results=rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
