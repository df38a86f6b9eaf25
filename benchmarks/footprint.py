"""Start-up time and peak memory, each measured in fresh processes.

    python -m benchmarks.footprint [--repeats 5] [--threads 2] [--output FILE]

Start-up: wall time and peak RSS of ``minibert encode "hello"`` on the default model (the packaged
all-MiniLM-L6-v2), from process start to exit, against the same job done with transformers
(AutoTokenizer + AutoModel + one forward pass). "cold" runs with an empty Numba cache (a fresh
NUMBA_CACHE_DIR): by default the pass runs the NumPy kernels while a detached warm-up compiles
the default ones (docs/runtime.md), which the benchmark lets finish before the next job so that it
loads no later run; "cold, compiled in the process" sets MINIBERT_BACKGROUND_COMPILE=0. "warm" runs
with a cache filled by ``python -m minibert.warmup`` first. Medians of ``--repeats`` runs, the jobs
taking turns.

Memory: peak RSS of one process that loads bert-base (random weights, see benchmarks.model) and
runs one (8, 512) forward pass, without and with ``output_attentions``, minibert against PyTorch +
transformers (eager attention when it returns attentions); the baseline RSS of the
bare interpreter with the library imported is reported beside it.

Peak RSS is the child's own VmHWM (/proc/self/status, read at exit), so nothing is sampled. Not
``ru_maxrss``: Linux carries the parent's peak over fork and exec into the child's, so a child of
a big benchmark process would report the parent's size.

SciPy matters to the start-up although minibert does not use it: when it is installed, Numba
imports ``scipy.linalg.cython_blas`` while loading its first cached kernel (about 0.17 s here). A
user's ``pip install`` has no SciPy; a development environment often has. The output says which.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from .common import machine, new_result, versions, write_json

TORCH_ENCODE = """
import sys
from transformers import AutoModel, AutoTokenizer
import torch
torch.set_num_threads(int(sys.argv[2]))
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModel.from_pretrained(sys.argv[1]).eval()
with torch.inference_mode():
    out = model(**tok(["hello"], return_tensors="pt"))
print(out.last_hidden_state.mean(dim=1)[0, :4].tolist())
"""

PEAK = """
import sys, numpy as np
engine, path, threads, B, T = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
attentions = engine.endswith("+attentions")
engine = engine.replace("+attentions", "")
ids = np.random.default_rng(0).integers(1000, 20000, size=(B, T))
if engine == "import-minibert":
    import minibert
elif engine == "import-torch":
    import torch, transformers
elif engine == "minibert":
    import minibert
    minibert.set_num_threads(threads)
    out = minibert.BertModel.from_pretrained(path)(ids, output_attentions=attentions).last_hidden_state
else:
    import torch, transformers
    torch.set_num_threads(threads)
    # attention probabilities need eager attention in transformers (sdpa does not return them)
    m = transformers.BertModel.from_pretrained(path, attn_implementation="eager" if attentions else "sdpa").eval()
    with torch.inference_mode():
        out = m(input_ids=torch.from_numpy(ids), output_attentions=attentions).last_hidden_state
"""


# runs the measured job, then reports this process's peak RSS (VmHWM, reset at exec) on stderr
HWM = """
import atexit, sys
def _hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            sys.stderr.write('\\n__VMHWM_KB__ ' + line.split()[1] + '\\n')
            sys.stderr.flush()
atexit.register(_hwm)
if sys.argv[1] == 'module':
    import runpy
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)
else:
    code, sys.argv = sys.argv[2], ['-c'] + sys.argv[3:]
    exec(compile(code, '<measured>', 'exec'), {'__name__': '__main__'})
"""


def run_measured(kind, target, *args, env=None):
    """(wall seconds, peak RSS MB) of one fresh process running ``python -m target args`` (kind
    "module") or the code ``target`` with ``args`` (kind "code")."""
    cmd = [sys.executable, "-c", HWM, kind, target, *args]
    t = time.perf_counter()
    # run outside the repository: there its kernels/ would shadow the `kernels` package transformers imports
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True,
                       cwd=tempfile.gettempdir())
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{kind} {target[:40]!r} failed ({p.returncode}): {p.stderr[-2000:]}")
    kb = [line.split()[1] for line in p.stderr.splitlines() if line.startswith("__VMHWM_KB__")]
    return wall, int(kb[-1]) / 1024


def startup(repeats, threads):
    """The three start-up jobs, taking turns (each repeat runs every job once, in a rotating
    order), so a change in the machine's load reaches them alike."""
    import importlib.util

    from .model import minilm_dir

    cli = ("module", "minibert", "encode", "--threads", str(threads), "hello")
    have_torch = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
    with tempfile.TemporaryDirectory() as tmp:
        offline = {**os.environ, "HF_HUB_OFFLINE": "1"}
        warm_env = {**offline, "NUMBA_CACHE_DIR": os.path.join(tmp, "warm")}
        subprocess.run([sys.executable, "-m", "minibert.warmup", "float32"], env=warm_env, check=True)

        def cold(i, background=True):
            cache = os.path.join(tmp, f"cold{i}-{background}")
            got = run_measured(*cli, env={**offline, "NUMBA_CACHE_DIR": cache,
                                          "MINIBERT_BACKGROUND_COMPILE": "1" if background else "0"})
            deadline = time.monotonic() + 600
            while background and not _warm(cache) and time.monotonic() < deadline:
                time.sleep(0.5)  # the detached warm-up compiles: let it finish before the next job
            return got

        jobs = {  # name -> run i; each cold run gets an empty cache of its own
            "minibert encode, cold JIT cache": cold,
            "minibert encode, cold, compiled in the process": lambda i: cold(i, background=False),
            "minibert encode, warm JIT cache": lambda i: run_measured(*cli, env=warm_env),
        }
        if have_torch:
            jobs["transformers + torch, same job"] = lambda i: run_measured(
                "code", TORCH_ENCODE, str(minilm_dir()), str(threads), env=offline)
        runs = {name: [] for name in jobs}
        names = list(jobs)
        for i in range(repeats):
            for name in names[i % len(names):] + names[:i % len(names)]:
                runs[name].append(jobs[name](i))
    return [dict(what=name, wall_s=statistics.median(r[0] for r in rs), peak_rss_mb=statistics.median(r[1] for r in rs),
                 runs=len(rs), all_wall_s=[r[0] for r in rs]) for name, rs in runs.items()]


def _warm(cache) -> bool:  # the warm-up's marker is in this cache (not its lock file)
    for _, _, files in os.walk(cache):
        if any(f.startswith("minibert-ready-") and not f.endswith(".lock") for f in files):
            return True
    return False


def memory(threads, B=8, T=512):
    from .model import model_dir

    path = str(model_dir("base"))
    rows = []
    for engine, label in (("import-minibert", "python + import minibert"), ("minibert", f"minibert bert-base ({B}, {T})"),
                          ("minibert+attentions", f"minibert bert-base ({B}, {T}), output_attentions"),
                          ("import-torch", "python + import torch, transformers"),
                          ("torch", f"PyTorch bert-base ({B}, {T})"),
                          ("torch+attentions", f"PyTorch bert-base ({B}, {T}), output_attentions (eager)")):
        if "torch" in engine:
            try:
                import torch  # noqa: F401
            except ImportError:
                continue
        wall, rss = run_measured("code", PEAK, engine, path, str(threads), str(B), str(T))
        rows.append(dict(what=label, peak_rss_mb=rss, wall_s=wall))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.footprint", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--skip-memory", action="store_true", help="start-up only")
    p.add_argument("--output", default=None, help="JSON file (default: a new file in benchmarks/results/)")
    a = p.parse_args(argv)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    rows = startup(a.repeats, a.threads)
    import importlib.util

    scipy = importlib.util.find_spec("scipy") is not None
    print(f"python: {sys.executable}; SciPy installed: {'yes' if scipy else 'no'}")
    print(f"{'start-up (process start to exit)':44s} {'wall s':>8s} {'peak RSS MB':>12s}")
    for r in rows:
        print(f"{r['what']:44s} {r['wall_s']:8.2f} {r['peak_rss_mb']:12.0f}")
    mem = [] if a.skip_memory else memory(a.threads)
    if mem:
        print(f"\n{'peak memory':44s} {'wall s':>8s} {'peak RSS MB':>12s}")
        for r in mem:
            print(f"{r['what']:44s} {r['wall_s']:8.2f} {r['peak_rss_mb']:12.0f}")
    info = machine()
    info["libraries"].update(versions("safetensors", "tokenizers"))
    path = write_json(a.output or new_result("footprint"), dict(benchmark="footprint", started=started, threads=a.threads, repeats=a.repeats,
                                     python=sys.executable, scipy_installed=scipy, machine=info, startup=rows,
                                     memory=mem))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
