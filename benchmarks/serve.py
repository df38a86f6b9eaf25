"""`minibert serve` under load against offline encoding of the same texts, on the real MiniLM.

    python -m benchmarks.serve [--texts 512] [--clients 1,4,16] [--output FILE]

Offline: ``SentenceEncoder.encode`` of the texts (batch 32) in this process, texts/s (median of 3). Then the
server in its own process (2 threads, default limits); each client sends one text per request on
its own keep-alive connection, back to back, until the texts are done: texts/s, p50 and p99 latency per concurrency, and the
server's resident memory idle (after its warm-up) and the peak under load (VmHWM).
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from .common import machine, new_result, write_json
from .model import minilm_dir, real_sentences


def _rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _post(conn, body):
    conn.request("POST", "/embed", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    return r.status


def _model_time(port):  # (model calls, seconds in them) so far, from /metrics
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    got = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("minibert_inference_seconds_")}
    return got["minibert_inference_seconds_count"], got["minibert_inference_seconds_sum"]


def load(port, texts, clients):
    """Each client takes the next text and posts it alone; (wall seconds, latencies, errors)."""
    nxt, lock, lat, errors = [0], threading.Lock(), [], []

    def client():  # one keep-alive connection per client, as an HTTP client library keeps
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(texts):
                conn.close()
                return
            t = time.perf_counter()
            status = _post(conn, {"inputs": texts[i]})
            lat.append(time.perf_counter() - t)
            if status != 200:
                errors.append(status)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, lat, errors


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=512)
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--port", type=int, default=0, help="default: a free one")
    p.add_argument("--output", default=None, help="JSON file (default: a new file in benchmarks/results/)")
    a = p.parse_args(argv)
    clients = [int(c) for c in a.clients.split(",")]
    if not a.port:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            a.port = sock.getsockname()[1]
    from minibert import SentenceEncoder

    host = machine()
    print(f"host: {host['cpu']}, {' '.join(host['cpu_flags'])}", file=sys.stderr)
    texts = real_sentences(a.texts)
    enc = SentenceEncoder(str(minilm_dir()))
    enc.encode(texts[:64])  # warm up
    runs = []
    for _ in range(3):  # one run is ~1.5 s: its noise would be the ratio's
        t = time.perf_counter()
        enc.encode(texts, batch_size=32)
        runs.append(len(texts) / (time.perf_counter() - t))
    offline = statistics.median(runs)
    print(f"offline encode: {offline:.1f} texts/s (median of {', '.join(f'{r:.1f}' for r in runs)})", flush=True)
    del enc
    proc = subprocess.Popen([sys.executable, "-m", "minibert", "serve", "--model", str(minilm_dir()),
                             "--port", str(a.port), "--threads", "2"], stderr=subprocess.PIPE, text=True)
    rows = []
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"the server did not start: {proc.stderr.read() if proc.poll() is not None else ''}")
                time.sleep(0.2)
        time.sleep(1)
        idle = _rss_mb(proc.pid, "VmRSS")
        for c in clients:
            load(a.port, texts[:32], c)  # warm the route at this concurrency
            before = _model_time(a.port)
            wall, lat, errors = load(a.port, texts, c)
            calls, busy = (x - y for x, y in zip(_model_time(a.port), before))
            row = dict(clients=c, texts_per_s=len(texts) / wall, p50_ms=statistics.median(lat) * 1e3,
                       p99_ms=float(np.percentile(lat, 99)) * 1e3, errors=len(errors),
                       vs_offline=len(texts) / wall / offline, model_calls=int(calls), model_busy=busy / wall)
            rows.append(row)
            print(f"{c:3d} clients: {row['texts_per_s']:7.1f} texts/s ({row['vs_offline']:.2f} of offline), "
                  f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, errors {len(errors)}; "
                  f"{row['model_calls']} model calls, busy {row['model_busy']:.0%} of the time", flush=True)
        peak = _rss_mb(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"server memory: idle {idle:.0f} MB, peak under load {peak:.0f} MB", flush=True)
    out = a.output or new_result("serve")
    write_json(out, dict(machine=host, texts=len(texts), offline_texts_per_s=offline, offline_runs=runs, rows=rows,
                         rss_idle_mb=idle, rss_peak_mb=peak))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
