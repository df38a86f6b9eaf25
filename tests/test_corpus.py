"""minibert.corpus and `minibert embed --text-column`: Parquet / JSONL in, Parquet out, locally and on
a Dask LocalCluster of 2 worker processes × 1 thread (loopback, no dashboard). The rule checked:
a file's vectors are the same bits on every engine (each file is encoded alone, in the same batches)."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from minibert import SentenceEncoder  # noqa: E402
from minibert.corpus import CorpusError, embed  # noqa: E402
from test_cli import run  # noqa: E402

TEXTS = ["A man is eating food.", "A cheetah is running behind its prey.", "hi",
         "The new movie is awesome, and the cinema was full.", " ".join(["long"] * 300)]


def write_corpus(d, n_files=3, rows=5, seed=0):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    files = {}
    for k in range(n_files):
        texts = [TEXTS[i] + f" ({k}, {j})" for j, i in enumerate(rng.integers(len(TEXTS), size=rows))]
        ids = [f"f{k}-{j}" for j in range(rows)]
        if k % 2:
            with open(d / f"part{k}.jsonl", "w") as f:
                for t, i in zip(texts, ids):
                    f.write(json.dumps({"text": t, "id": i, "other": 1}) + "\n")
        else:
            pq.write_table(pa.table({"id": ids, "text": texts}), d / f"part{k}.parquet")
        files[f"part{k}"] = (texts, ids)
    return files


def read_out(path):
    t = pq.read_table(path)
    emb = np.array(t.column("embedding").to_pylist(), dtype=np.float32).reshape(t.num_rows, 384)
    return t, emb


@pytest.fixture(scope="module")
def encoder(minilm_dir):
    return SentenceEncoder(str(minilm_dir))


@pytest.fixture(scope="module")
def cluster():
    distributed = pytest.importorskip("distributed")
    c = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                 host="127.0.0.1")
    client = distributed.Client(c)
    yield client
    client.close()
    c.close()


def test_local_outputs_hold_the_encoder_s_vectors(tmp_path, minilm_dir, encoder):
    files = write_corpus(tmp_path / "in")
    outs = embed(tmp_path / "in", tmp_path / "out", id_column="id", model=str(minilm_dir), progress=False)
    assert [o.name for o in outs] == ["part0.parquet", "part1.parquet", "part2.parquet"]
    for o in outs:
        texts, ids = files[o.stem]
        t, emb = read_out(o)
        assert t.schema.names == ["id", "embedding", "n_tokens", "truncated"]
        assert pa.types.is_fixed_size_list(t.schema.field("embedding").type)
        assert t.schema.field("embedding").type.list_size == 384
        assert t.column("id").to_pylist() == ids
        np.testing.assert_array_equal(emb, encoder.encode(texts, batch_size=32))
        lengths = encoder.tokenizer.lengths(texts)
        assert t.column("n_tokens").to_pylist() == lengths.tolist()
        assert t.column("truncated").to_pylist() == (lengths > 256).tolist()
    # without an id column: the row number
    outs = embed(tmp_path / "in" / "part0.parquet", tmp_path / "out2", model=str(minilm_dir), progress=False)
    assert read_out(outs[0])[0].column("id").to_pylist() == list(range(5))


def test_dask_gives_the_local_bits(tmp_path, minilm_dir, cluster):
    write_corpus(tmp_path / "in", n_files=4)
    local = embed(str(tmp_path / "in" / "*"), tmp_path / "local", id_column="id", model=str(minilm_dir),
                  progress=False)
    dask = embed(str(tmp_path / "in" / "*"), tmp_path / "dask", id_column="id", engine="dask", client=cluster,
                 model=str(minilm_dir), progress=False)
    for a, b in zip(local, dask):
        ta, ea = read_out(a)
        tb, eb = read_out(b)
        np.testing.assert_array_equal(ea, eb)
        assert ta.equals(tb)


def test_a_killed_worker_loses_no_row(tmp_path, minilm_dir, cluster):
    files = write_corpus(tmp_path / "in", n_files=8, rows=120, seed=3)
    pids = list(cluster.run(os.getpid).values())
    done = {}

    def job():
        try:
            done["outs"] = embed(tmp_path / "in", tmp_path / "out", id_column="id", engine="dask", client=cluster,
                                 model=str(minilm_dir), progress=False)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            done["error"] = e

    t = threading.Thread(target=job)
    t.start()
    deadline = time.monotonic() + 120
    while not list((tmp_path / "out").glob("*.parquet")) and time.monotonic() < deadline:
        time.sleep(0.05)  # the first file done: the others are running
    os.kill(pids[0], signal.SIGKILL)
    t.join(timeout=600)
    assert "error" not in done, done.get("error")
    for o in done["outs"]:
        texts, ids = files[o.stem]
        assert read_out(o)[0].column("id").to_pylist() == ids  # every row once, in order
    assert not list((tmp_path / "out").glob("*.tmp-*"))


def test_a_dead_writers_temporary_file_is_removed(tmp_path, minilm_dir):
    # what a worker killed mid-write leaves (the dask test above hits it only when the kill lands
    # during the write): gone once the file has been redone
    files = write_corpus(tmp_path / "in", n_files=2, rows=5, seed=4)
    (tmp_path / "out").mkdir()
    stem = sorted(files)[0]
    stale = tmp_path / "out" / f"{stem}.parquet.tmp-0123456789abcdef"
    stale.write_bytes(b"half a parquet file")
    outs = embed(tmp_path / "in", tmp_path / "out", id_column="id", model=str(minilm_dir), progress=False)
    assert not stale.exists()
    assert not list((tmp_path / "out").glob("*.tmp-*"))
    assert all(read_out(o)[0].column("id").to_pylist() == files[o.stem][1] for o in outs)


def test_rerun_skips_complete_outputs_and_overwrite_redoes_them(tmp_path, minilm_dir):
    write_corpus(tmp_path / "in")
    outs = embed(tmp_path / "in", tmp_path / "out", model=str(minilm_dir), progress=False)
    stamps = [o.stat().st_mtime_ns for o in outs]
    time.sleep(0.01)
    embed(tmp_path / "in", tmp_path / "out", model=str(minilm_dir), progress=False)
    assert [o.stat().st_mtime_ns for o in outs] == stamps
    embed(tmp_path / "in", tmp_path / "out", model=str(minilm_dir), progress=False, overwrite=True)
    assert all(o.stat().st_mtime_ns > s for o, s in zip(outs, stamps))


def test_bad_inputs_name_the_file_row_and_column(tmp_path, minilm_dir, cluster):
    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(pa.table({"body": ["a"]}), d / "nocol.parquet")
    pq.write_table(pa.table({"text": ["a", None, "c"]}), d / "null.parquet")
    with open(d / "num.jsonl", "w") as f:
        f.write('{"text": "a"}\n{"text": 7}\n')
    (d / "junk.parquet").write_bytes(b"not a parquet file")
    (d / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    cases = [("nocol.parquet", r"nocol.parquet: no column 'text'; it has \['body'\]"),
             ("null.parquet", r"null.parquet: row 1, column 'text': expected a string, got null"),
             ("num.jsonl", r"num.jsonl: row 1, column 'text': expected a string, got int"),
             ("junk.parquet", r"junk.parquet: unreadable"),
             ("bad.jsonl", r"bad.jsonl: line 2 is not JSON")]
    for name, match in cases:
        with pytest.raises(CorpusError, match=match):
            embed(d / name, tmp_path / "out", model=str(minilm_dir), progress=False)
    with pytest.raises(CorpusError, match="null.parquet: row 1"):  # the same error from a Dask worker
        embed(d / "null.parquet", tmp_path / "out", engine="dask", client=cluster, model=str(minilm_dir),
              progress=False)
    # an empty file gives an empty output
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), d / "empty.parquet")
    out = embed(d / "empty.parquet", tmp_path / "out", model=str(minilm_dir), progress=False)
    t, emb = read_out(out[0])
    assert t.num_rows == 0 and t.schema.names == ["id", "embedding", "n_tokens", "truncated"]
    for inputs, match in [(str(d / "*.csv"), "no input files"), (d / "missing.parquet", "no such file"),
                          ([d / "nocol.parquet", tmp_path / "nocol.parquet"], "no such file")]:
        with pytest.raises(CorpusError, match=match):
            embed(inputs, tmp_path / "out", progress=False)
    for kwargs, match in [(dict(engine="spark"), "engine='spark'"), (dict(batch_size=0), "batch_size"),
                          (dict(workers=2), "for engine='dask'"),
                          (dict(engine="dask", workers=2, scheduler="tcp://x:1"), "not both")]:
        with pytest.raises(ValueError, match=match):
            embed(d / "empty.parquet", tmp_path / "out", progress=False, **kwargs)


def test_cli(tmp_path, minilm_dir):
    write_corpus(tmp_path / "in", n_files=2)
    r = run("embed", "--model", str(minilm_dir), "--input", str(tmp_path / "in"), "--text-column", "text",
            "--id-column", "id", "--output", str(tmp_path / "out"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part0.parquet", "part1.parquet"]
    for args, phrase in [(["--engine", "dask"], "give --text-column too"),
                         (["--text-column", "text", "--workers", "2"], "--workers and --scheduler need --engine dask"),
                         (["--text-column", "text"], "give --input"),
                         (["--text-column", "nope", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")],
                          "no column 'nope'")]:
        r = run("embed", "--model", str(minilm_dir), *args)
        assert r.returncode != 0 and phrase in r.stderr and "Traceback" not in r.stderr, r.stderr
