"""Embed a corpus of Parquet or JSONL files, in this process or on a Dask cluster
(``pip install 'minibert-numpy[dask]'``: dask, distributed, pyarrow).

One output Parquet file per input file, same stem, columns ``id`` (the id column, or the row
number), ``embedding`` (fixed_size_list<float32, H>), ``n_tokens`` (before truncation) and
``truncated``. A file is written under a temporary name and renamed when complete, so a rerun
skips the complete ones and a killed worker leaves nothing half-written; Dask recomputes a lost
task. Each file is encoded alone, in the same batches whatever the engine: the vectors of one
file are the same bits locally and on any worker.
"""
from __future__ import annotations

import glob
import json
import os
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

__all__ = ["embed", "input_files"]

SUFFIXES = (".parquet", ".jsonl", ".json")


class CorpusError(ValueError):
    """Bad input: names the file, and the row and column where there is one."""


def input_files(inputs: Union[str, os.PathLike, Sequence]) -> List[Path]:
    """The files of ``inputs``: a glob, a directory (its .parquet / .jsonl files) or a list of those."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    files: List[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES)
        elif any(c in str(item) for c in "*?["):
            found = sorted(Path(f) for f in glob.glob(str(item)))
        else:
            found = [p]
        if not found:
            raise CorpusError(f"{item}: no input files (a glob, a directory of .parquet/.jsonl files, or files)")
        files += found
    for f in files:
        if f.suffix not in SUFFIXES:
            raise CorpusError(f"{f}: expected a .parquet or .jsonl file")
        if not f.is_file():
            raise CorpusError(f"{f}: no such file")
    stems = [f.stem for f in files]
    dup = {s for s in stems if stems.count(s) > 1}
    if dup:
        raise CorpusError(f"input files share the stem {sorted(dup)[0]!r}: their outputs would collide")
    return files


def read_texts(path: Path, text_column: str, id_column: Optional[str]):
    """(texts, ids) of one file, checked: the columns exist, every text is a string. ``ids`` is an
    Arrow array, or None without an id column."""
    import pyarrow as pa

    columns = [text_column] + ([id_column] if id_column else [])
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if table.num_rows == 0:
                return [], None
            missing = [c for c in columns if c not in table.column_names]
            if missing:
                raise CorpusError(f"{path}: no column {missing[0]!r}; it has {table.column_names}")
            texts, ids = table.column(text_column).to_pylist(), table.column(id_column) if id_column else None
        else:
            rows = []
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise CorpusError(f"{path}: line {n} is not JSON: {e}") from None
            if not rows:
                return [], None
            keys = set().union(*(r.keys() for r in rows if isinstance(r, dict)))
            missing = [c for c in columns if c not in keys]
            if missing:
                raise CorpusError(f"{path}: no column {missing[0]!r}; it has {sorted(keys)}")
            texts = [r.get(text_column) if isinstance(r, dict) else r for r in rows]
            ids = None
            if id_column:
                try:
                    ids = pa.array([r.get(id_column) if isinstance(r, dict) else None for r in rows])
                except pa.ArrowException as e:
                    raise CorpusError(f"{path}: column {id_column!r}: mixed or unsupported values: {e}") from None
    except CorpusError:
        raise
    except (OSError, pa.ArrowException, UnicodeDecodeError) as e:
        raise CorpusError(f"{path}: unreadable: {e}") from None
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise CorpusError(f"{path}: row {i}, column {text_column!r}: expected a string, got "
                              f"{'null' if t is None else type(t).__name__}")
    return texts, ids


_ENCODERS: Dict[tuple, object] = {}  # one model per process (per worker), loaded on first use


def _encoder(model, threads):
    from . import set_num_threads
    from .sentence import SentenceEncoder

    if threads:
        set_num_threads(threads)
    key = (model,)
    if key not in _ENCODERS:
        _ENCODERS[key] = SentenceEncoder(model)
    return _ENCODERS[key]


def _worker_threads(per_host: Dict[str, int]) -> int:
    """On a Dask worker: this host's cores ÷ the worker processes on it."""
    from urllib.parse import urlparse

    from distributed import get_worker

    host = urlparse(get_worker().address).hostname
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // per_host.get(host, 1))


def embed_file(src: str, dst: str, text_column: str = "text", id_column: Optional[str] = None,
               batch_size: int = 32, model: Optional[str] = None, per_host: Optional[Dict[str, int]] = None) -> int:
    """Embed one file into ``dst`` (written to a temporary name, then renamed); its row count.
    ``per_host``: on a Dask worker, the worker processes per host, which set this one's threads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, ids = read_texts(Path(src), text_column, id_column)
    enc = _encoder(model, _worker_threads(per_host) if per_host else None)
    dim = enc.dim
    if texts:
        vecs = enc.encode(texts, batch_size=batch_size)
        lengths = enc.tokenizer.lengths(texts)
    else:
        vecs, lengths = np.zeros((0, dim), dtype=np.float32), np.zeros(0, dtype=np.int64)
    id_col = ids if ids is not None else pa.array(np.arange(len(texts), dtype=np.int64))
    table = pa.table({
        "id": id_col,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), type=pa.float32()), dim),
        "n_tokens": pa.array(lengths.astype(np.int32)),
        "truncated": pa.array(lengths > enc.max_seq_length),
    })
    tmp = f"{dst}.tmp-{uuid.uuid4().hex}"
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(texts)


def _rows(path: Path) -> int:  # for the progress bar: Parquet's metadata, or the JSONL lines
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception:  # noqa: BLE001 - unreadable: embed_file reports it with the file's name
            return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def embed(inputs, output, text_column: str = "text", id_column: Optional[str] = None, engine: str = "local",
          client=None, workers: Optional[int] = None, scheduler: Optional[str] = None, batch_size: int = 32,
          model: Optional[str] = None, overwrite: bool = False, progress: bool = True) -> List[Path]:
    """Embed every input file into ``output``/<stem>.parquet; returns the output paths.

    ``engine="local"``: this process, all its cores. ``engine="dask"``: ``client`` (a
    ``distributed.Client``), or a ``LocalCluster`` of ``workers`` processes started here, or the
    cluster at ``scheduler``; one task per file, each worker loading the model once and running
    cores ÷ worker processes threads on its host. Outputs that exist are skipped unless
    ``overwrite``."""
    if engine not in ("local", "dask"):
        raise ValueError(f"engine={engine!r}; expected 'local' or 'dask'")
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    if engine == "local" and (client is not None or workers is not None or scheduler is not None):
        raise ValueError("client, workers and scheduler are for engine='dask'")
    if workers is not None and scheduler is not None:
        raise ValueError("give workers (a local cluster) or scheduler (an existing one), not both")
    files = input_files(inputs)
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(f, out_dir / f"{f.stem}.parquet") for f in files]
    todo = [(f, d) for f, d in jobs if overwrite or not d.exists()]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(_rows(f) for f, _ in todo), unit="rows", desc="embedding")
    args = dict(text_column=text_column, id_column=id_column, batch_size=int(batch_size), model=model)
    try:
        if engine == "local":
            for f, d in todo:
                n = embed_file(str(f), str(d), **args)
                if bar is not None:
                    bar.update(n)
        else:
            _on_dask(todo, args, client, workers, scheduler, bar)
    finally:
        if bar is not None:
            bar.close()
    for _, d in todo:  # a worker killed while writing leaves its temporary file; another redid the file
        for stale in d.parent.glob(glob.escape(d.name) + ".tmp-*"):
            stale.unlink(missing_ok=True)
    return [d for _, d in jobs]


def _on_dask(todo, args, client, workers, scheduler, bar):
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise SystemExit("engine='dask' needs dask and distributed: pip install 'minibert-numpy[dask]'") from None
    own = None
    if client is None:
        if scheduler is not None:
            client = own = Client(scheduler)
        else:
            n = workers or 2
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                                   host="127.0.0.1")
            client = own = Client(cluster)
    try:
        per_host: Dict[str, int] = {}  # worker processes on each host
        for w in client.scheduler_info()["workers"].values():
            per_host[w["host"]] = per_host.get(w["host"], 0) + 1
        futures = {client.submit(embed_file, str(f), str(d), **args, per_host=per_host, pure=False,
                                 key=f"minibert-embed-{d.stem}-{uuid.uuid4().hex[:8]}"): f for f, d in todo}
        for fut in as_completed(futures):
            n = fut.result()  # raises a task's CorpusError here, naming the file
            if bar is not None:
                bar.update(n)
    finally:
        if own is not None:
            cluster = getattr(own, "cluster", None)
            own.close()
            if cluster is not None:
                cluster.close()
