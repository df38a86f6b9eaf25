"""Corpus embedding throughput: one process against Dask LocalClusters, on the real MiniLM.

    python -m benchmarks.corpus [--files 8] [--rows 500] [--output FILE]

Writes ``--files`` Parquet files of ``--rows`` real sentences each to a temporary folder, then
times ``minibert.corpus.embed`` on them: locally (one process, 2 threads), on a LocalCluster of
2 workers × 1 thread and of 1 worker × 2 threads (cluster start-up timed apart). Also the cost per
row of what is not the model: reading and writing the Parquet files, and a Dask task's overhead
(a cluster run of files of one row).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from .common import machine, new_result, write_json
from .model import minilm_dir, real_sentences


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--rows", type=int, default=500)
    p.add_argument("--output", default=None, help="JSON file (default: a new file in benchmarks/results/)")
    a = p.parse_args(argv)
    import pyarrow as pa
    import pyarrow.parquet as pq
    from distributed import Client, LocalCluster

    from minibert.corpus import embed

    host = machine()
    print(f"host: {host['cpu']}, {' '.join(host['cpu_flags'])}", file=sys.stderr)
    model = str(minilm_dir())
    pool = real_sentences(500)  # the prose on hand, repeated as needed
    texts = [pool[i % len(pool)] for i in range(a.files * a.rows)]
    rows_total = len(texts)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        for k in range(a.files):
            part = texts[k * a.rows:(k + 1) * a.rows]
            pq.write_table(pa.table({"id": list(range(k * a.rows, k * a.rows + len(part))), "text": part}),
                           tmp / "in" / f"part{k:03d}.parquet")
        embed(tmp / "in" / "part000.parquet", tmp / "warm", model=model, progress=False)  # compile, load

        t = time.perf_counter()
        embed(tmp / "in", tmp / "local", model=model, progress=False)
        out["local 1 x 2"] = {"seconds": time.perf_counter() - t}

        for n, threads in ((2, 1), (1, 2)):
            t = time.perf_counter()
            cluster = LocalCluster(n_workers=n, threads_per_worker=threads, processes=True, dashboard_address=None,
                                   host="127.0.0.1")
            client = Client(cluster)
            start = time.perf_counter() - t
            embed(tmp / "in" / "part000.parquet", tmp / f"warm{n}", engine="dask", client=client, model=model,
                  progress=False)  # each worker loads the model and compiles (cached) once
            client.run(lambda: None)
            t = time.perf_counter()
            embed(tmp / "in", tmp / f"dask{n}", engine="dask", client=client, model=model, progress=False)
            out[f"LocalCluster {n} x {threads}"] = {"seconds": time.perf_counter() - t, "cluster_start_s": start}
            # a task's overhead: files of one row each
            (tmp / f"tiny{n}").mkdir()
            for k in range(16):
                pq.write_table(pa.table({"text": ["a short sentence."]}), tmp / f"tiny{n}" / f"t{k}.parquet")
            t = time.perf_counter()
            embed(tmp / f"tiny{n}", tmp / f"tinyout{n}", engine="dask", client=client, model=model, progress=False)
            out[f"LocalCluster {n} x {threads}"]["per_task_s"] = (time.perf_counter() - t) / 16
            client.close()
            cluster.close()

        # Parquet I/O per row: read the inputs, write outputs of the same shape
        t = time.perf_counter()
        for f in sorted((tmp / "in").iterdir()):
            pq.read_table(f)
        read = (time.perf_counter() - t) / rows_total
        t = time.perf_counter()
        for f in sorted((tmp / "local").iterdir()):
            pq.write_table(pq.read_table(f), tmp / "rewrite.parquet")
        write = (time.perf_counter() - t) / rows_total
    for name, r in out.items():
        r["rows_per_s"] = rows_total / r["seconds"]
        extra = "".join(f", {k} {v:.3f}" for k, v in r.items() if k not in ("seconds", "rows_per_s"))
        print(f"{name:22s} {r['rows_per_s']:7.1f} rows/s ({r['seconds']:.1f} s{extra})", flush=True)
    print(f"Parquet per row: read {read * 1e6:.1f} us, write {write * 1e6:.1f} us", flush=True)
    path = a.output or new_result("corpus")
    write_json(path, dict(machine=host, files=a.files, rows_per_file=a.rows, cpu_count=os.cpu_count(), runs=out,
                          parquet_read_us_per_row=read * 1e6, parquet_write_us_per_row=write * 1e6))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
