"""minibert against another checkout of itself, and with torch imported in the same process.

    python -m benchmarks.ab --baseline DIR [--model base|minilm|all] [--shapes 1x16,...] [--repeats 15]
                            [--processes 3] [--threads 2] [--gap 0.3] [--output FILE]

Settings, each in a process of its own, timed interleaved (round r runs every setting once, in a
rotating order, ``--gap`` seconds of idle before each call): "new" (this checkout), "new + torch"
(``import torch`` before minibert, as in a notebook that compares with transformers), and, with
``--baseline``, "baseline" and "baseline + torch" (DIR is a checkout of another commit, e.g.
``git worktree add /tmp/base COMMIT``). The shapes and inputs are benchmarks.model's. Every setting
is first checked against "new" (max abs difference at valid positions). The repeats are split
over ``--processes`` fresh processes per setting, taking turns: processes of the same code differed
by up to 20 % at MiniLM (1, 16), so one pair of processes can show a difference that is not in the
code. Each generation of processes starts (and starts its rounds) from another setting: a call
right after another setting's ran slower than one right after its own, so a fixed start favoured
one side. Prints median ms per pass and the ratio to "new", and the medians after a setting's own
call and after another's apart; writes JSON with the host (CPU model and vector ISA flags).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import machine, new_result, write_json
from .model import batches, minilm_dir, model_dir, parse_shapes


def package_tree(checkout: Path) -> str:
    """A folder on which ``import minibert`` finds ``checkout``'s minibert/ with its kernels/ as
    minibert.kernels (the layout an install makes): symlinks in a temporary folder."""
    root = Path(tempfile.mkdtemp(prefix="minibert-ab-"))
    pkg = root / "minibert"
    pkg.mkdir()
    for f in (checkout / "minibert").iterdir():
        (pkg / f.name).symlink_to(f)
    (pkg / "kernels").symlink_to(checkout / "kernels")
    return str(root)


def _worker(conn, tree, with_torch, path, threads):
    if tree:
        sys.path.insert(0, tree)
    if with_torch:
        import torch  # noqa: F401
    from minibert import BertModel, set_num_threads

    set_num_threads(threads)
    model = BertModel.from_pretrained(path, skip_padding=True)  # the packed mode, in both checkouts
    conn.send(("ready", str(Path(sys.modules["minibert"].__file__).resolve().parent)))
    while True:
        msg = conn.recv()
        if msg is None:
            return
        cmd, (ids, mask, tt) = msg
        t = time.perf_counter()
        out = model(ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
        dt = time.perf_counter() - t
        conn.send(out if cmd == "run" else dt)


class Setting:
    def __init__(self, name, tree, with_torch, path, threads):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.name, (self.conn, child) = name, ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, tree, with_torch, str(path), threads), daemon=True)
        self.proc.start()
        _, self.source = self.conn.recv()

    def call(self, cmd, arrays):
        self.conn.send((cmd, arrays))
        return self.conn.recv()

    def close(self):
        self.conn.send(None)
        self.proc.join(timeout=30)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", type=Path, help="a checkout of the commit to compare with")
    p.add_argument("--model", choices=["base", "minilm", "all"], default="all")
    p.add_argument("--shapes", default="1x16,1x128,8x128,1x512,mixed")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--processes", type=int, default=3, help="fresh processes per setting, taking turns")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gap", type=float, default=0.3, help="seconds of idle before each timed call")
    p.add_argument("--no-torch", action="store_true", help="leave out the settings with torch imported")
    p.add_argument("--output", default=None, help="JSON file (default: a new file in benchmarks/results/)")
    a = p.parse_args(argv)
    try:
        shapes = parse_shapes(a.shapes)
    except ValueError as e:
        p.error(str(e))
    if a.baseline is not None and not (a.baseline / "minibert" / "__init__.py").is_file():
        p.error(f"--baseline {a.baseline}: not a minibert checkout (no minibert/__init__.py)")
    trees = {"new": None}
    if a.baseline is not None:
        trees["baseline"] = package_tree(a.baseline.resolve())
    host = machine()
    print(f"host: {host['cpu']}, {' '.join(host['cpu_flags'])}; threads {a.threads}", file=sys.stderr)
    if a.processes < 1 or a.repeats < a.processes:
        p.error(f"--processes {a.processes}: expected 1 to --repeats ({a.repeats})")
    rows = []
    for name in (["base", "minilm"] if a.model == "all" else [a.model]):
        from minibert import BertConfig

        path = model_dir(name)
        cfg = BertConfig.from_json_file(path / "config.json")
        keys = [label + (" + torch" if torch_too else "") for label in trees
                for torch_too in ((False,) if a.no_torch else (False, True))]
        shapes_here = list(batches(cfg, minilm_dir(), shapes))
        times = {(shape, key): [] for shape, *_ in shapes_here for key in keys}
        per_process = {k: [] for k in times}
        diffs = {}
        after = {k: ([], []) for k in times}  # (after its own call, after another setting's)
        for gen in range(a.processes):
            rounds = a.repeats // a.processes + (gen < a.repeats % a.processes)
            # each generation starts its processes and its rounds from another setting: a call right
            # after another setting's ran slower than one after its own (MiniLM (1, 16): 1-2 ms), and a
            # fixed start gave the second setting more of the fast kind (docs/performance.md)
            order = keys[gen % len(keys):] + keys[:gen % len(keys)]
            settings = {key: Setting(key, trees[key.split(" + ")[0]], key.endswith("torch"), path, a.threads)
                        for key in order}
            if gen == 0:
                for key, s in settings.items():
                    print(f"  {name}: {key} from {s.source}", file=sys.stderr)
            for shape, ids, mask, tt in shapes_here:
                arrays, valid = (ids, mask, tt), mask == 1
                if gen == 0:
                    ref = settings["new"].call("run", arrays)
                    for key, s in settings.items():
                        diffs[shape, key] = float(np.abs(s.call("run", arrays)[valid] - ref[valid]).max())
                for key in order[1:] + order[:1]:  # the warm-up ends with the setting round 0 starts with
                    settings[key].call("time", arrays)
                got, last = {key: [] for key in keys}, order[0]
                for r in range(rounds):
                    for key in order[r % len(keys):] + order[:r % len(keys)]:
                        time.sleep(a.gap)
                        got[key].append(settings[key].call("time", arrays))
                        after[shape, key][key != last].append(got[key][-1])
                        last = key
                for key, t in got.items():
                    times[shape, key] += t
                    per_process[shape, key].append(statistics.median(t) * 1e3)
            for s in settings.values():
                s.close()
        for shape, *_ in shapes_here:
            new = statistics.median(times[shape, "new"])
            for key in keys:
                t, procs = times[shape, key], per_process[shape, key]
                med = statistics.median(t)
                own, other = (statistics.median(v) * 1e3 if v else None for v in after[shape, key])
                rows.append(dict(model=name, shape=shape, setting=key, median_ms=med * 1e3, ratio_to_new=med / new,
                                 maxdiff_vs_new=diffs[shape, key], process_medians_ms=procs, times_s=t,
                                 after_own_ms=own, after_other_ms=other,
                                 calls_after_own=len(after[shape, key][0])))
                split = f"  after its own {own:.2f} / another's {other:.2f} ms" if own and other else ""
                print(f"{name:7s} {shape:28s} {key:18s} {med * 1e3:9.2f} ms  x{med / new:5.3f}  "
                      f"maxdiff {diffs[shape, key]:.1e}  per process {min(procs):.2f}-{max(procs):.2f} ms{split}",
                      flush=True)
    out = a.output or new_result("ab")
    write_json(out, dict(machine=host, threads=a.threads, repeats=a.repeats, processes=a.processes, gap_s=a.gap,
                         baseline=str(a.baseline) if a.baseline else None, rows=rows))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
