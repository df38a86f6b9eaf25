"""`minibert serve` as a real server on 127.0.0.1: every route and error, 16 concurrent clients,
a client that disconnects, SIGTERM under load. The vectors against SentenceEncoder.encode."""
from __future__ import annotations

import base64
import contextlib
import copy
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from minibert import SentenceEncoder

COSINE = 0.9999999  # the bar: the server batches differently from encode(), nothing else


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir, *args):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "minibert", "serve", "--model", str(model_dir),
                                      "--port", str(self.port), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the server did not answer /health in 180 s")

    def request(self, method, path, body=None, headers=None, raw=None, timeout=60):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = raw if raw is not None else (None if body is None else json.dumps(body))
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            r = conn.getresponse()
            payload = r.read()
            ctype = r.getheader("content-type", "")
            return r.status, (json.loads(payload) if "json" in ctype and payload else payload.decode())
        finally:
            conn.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture(scope="module")
def encoder(minilm_dir):
    return SentenceEncoder(str(minilm_dir))


@pytest.fixture(scope="module")
def server(minilm_dir):
    s = Server(minilm_dir, "--max-client-batch-size", "8", "--max-batch-tokens", "2048")
    yield s
    s.stop()


def cos(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


TEXTS = ["A man is eating food.", "A cheetah is running behind its prey.",
         "The new movie is awesome, and the cinema was full of people who had waited for weeks to see it.",
         "hi", "Two dogs play in the snow while their owner watches from the porch with a cup of tea.",
         " ".join(["a long input that keeps going"] * 10)]


def test_embed_and_openai_routes_give_the_encoder_s_vectors(server, encoder):
    want = encoder.encode(TEXTS)  # MiniLM's pipeline normalizes
    raw = encoder.encode(TEXTS, normalize=False)
    status, got = server.request("POST", "/embed", {"inputs": TEXTS})
    assert status == 200 and np.array(got).shape == want.shape
    assert cos(got, want).min() >= COSINE
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
    status, got = server.request("POST", "/embed", {"inputs": TEXTS[0], "normalize": False})
    assert status == 200 and len(got) == 1 and cos(got[0], raw[0]) >= COSINE
    assert abs(np.linalg.norm(got[0]) - np.linalg.norm(raw[0])) < 1e-4
    status, body = server.request("POST", "/v1/embeddings", {"input": TEXTS[:3], "model": "whatever"})
    assert status == 200 and body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2]
    assert cos([d["embedding"] for d in body["data"]], want[:3]).min() >= COSINE
    n = int(encoder.tokenizer.lengths(TEXTS[:3]).sum())
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n}
    cut = raw[:3, :128] / np.linalg.norm(raw[:3, :128], axis=1, keepdims=True)  # OpenAI's "dimensions"
    status, body = server.request("POST", "/v1/embeddings", {"input": TEXTS[:3], "dimensions": 128})
    assert status == 200 and cos([d["embedding"] for d in body["data"]], cut).min() >= COSINE
    status, got = server.request("POST", "/embed", {"inputs": TEXTS[:3], "dimensions": 128})
    assert status == 200 and np.array(got).shape == (3, 128) and cos(got, cut).min() >= COSINE
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
    status, got = server.request("POST", "/embed", {"inputs": TEXTS[0], "dimensions": 384, "normalize": False})
    assert status == 200 and cos(got[0], raw[0]) >= COSINE
    status, b64 = server.request("POST", "/v1/embeddings", {"input": "hi", "encoding_format": "base64"})
    v = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    assert status == 200 and v.shape == (384,) and cos(v, want[3]) >= COSINE


def test_tokenize_info_health_metrics(server, encoder):
    status, body = server.request("POST", "/tokenize", {"inputs": ["Hello, world!", "naïve café"]})
    assert status == 200 and len(body) == 2
    first = body[0]
    assert [t["id"] for t in first] == encoder.tokenizer("Hello, world!")["input_ids"][0].tolist()
    assert first[0] == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
    assert first[1] == {"id": first[1]["id"], "text": "Hello", "special": False, "start": 0, "stop": 5}
    assert all(t["text"] == "naïve café"[t["start"]:t["stop"]] for t in body[1] if not t["special"])
    status, body = server.request("POST", "/tokenize", {"inputs": "hi", "add_special_tokens": False})
    assert status == 200 and [t["special"] for t in body[0]] == [False]
    status, info = server.request("GET", "/info")
    assert status == 200 and info["dimension"] == 384 and info["max_input_length"] == 256
    assert info["max_batch_tokens"] == 2048 and info["max_client_batch_size"] == 8 and info["version"]
    status, models = server.request("GET", "/v1/models")
    assert status == 200 and models["object"] == "list" and len(models["data"]) == 1
    assert models["data"][0]["id"] == info["model_id"] and models["data"][0]["object"] == "model"
    assert isinstance(models["data"][0]["created"], int)
    assert server.request("GET", "/health")[0] == 200
    status, text = server.request("GET", "/metrics")
    assert status == 200 and 'minibert_requests_total{route="/embed",status="200"}' in text
    assert "minibert_request_duration_seconds_bucket" in text and "minibert_batch_size_bucket" in text


@pytest.mark.parametrize("path, body, raw, status, phrase", [
    ("/embed", None, b"{not json", 422, "not valid JSON"),
    ("/embed", None, b"[1, 2]", 422, "JSON object"),
    ("/embed", {"inputs": 5}, None, 422, "'inputs' must be a string or a list of strings; got int"),
    ("/embed", {"inputs": []}, None, 422, "empty list"),
    ("/embed", {"inputs": ["a", 3]}, None, 422, "list of strings"),
    ("/embed", {"inputs": "a", "normalize": "yes"}, None, 422, "'normalize' must be true or false"),
    ("/embed", {"inputs": ["x"] * 9}, None, 413, "9 inputs in one request; the limit is 8"),
    ("/embed", {"inputs": "word " * 300}, None, 413, "has 302 tokens; the limit is 256"),
    ("/v1/embeddings", {"input": [[1, 2, 3]]}, None, 422, "token ids is not supported"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "hex"}, None, 422, "'float' or 'base64'"),
    ("/v1/embeddings", {"input": "a", "model": 3}, None, 422, "'model' must be a string"),
    ("/v1/embeddings", {"input": "a", "dimensions": 385}, None, 422, "from 1 to 384 (the model's dimension); got 385"),
    ("/v1/embeddings", {"input": "a", "dimensions": 0}, None, 422, "from 1 to 384"),
    ("/embed", {"inputs": "a", "dimensions": True}, None, 422, "'dimensions' must be an integer"),
    ("/embed", {"inputs": "a", "dimensions": "64"}, None, 422, "got '64'"),
    ("/tokenize", {"inputs": None}, None, 422, "got null"),
    ("/embed", {"inputs": "a", "prompt_name": "query"}, None, 422,
     "'prompt_name': Prompt name 'query' not found in the configured prompts dictionary with keys []."),
    ("/tokenize", {"inputs": "a", "prompt_name": 3}, None, 422, "'prompt_name': prompt_name=3; expected a str"),
    ("/nope", {}, None, 404, "not found"),
])
def test_errors_are_json_with_the_limit(server, path, body, raw, status, phrase):
    got, payload = server.request("POST", path, body, raw=raw)
    assert got == status and phrase.lower() in payload["error"].lower(), payload
    assert payload["error_type"]


def test_the_limit_itself_passes_one_more_token_is_413(server, encoder):
    at, over = "word " * 254, "word " * 255  # 256 and 257 tokens with [CLS] and [SEP]
    assert list(encoder.tokenizer.lengths([at, over])) == [256, 257]
    status, got = server.request("POST", "/embed", {"inputs": ["hi", at]})
    assert status == 200 and cos(got[1], encoder.encode(at)) >= COSINE
    status, payload = server.request("POST", "/embed", {"inputs": [at, "hi", over]})
    assert status == 413 and "input 2 has 257 tokens; the limit is 256" in payload["error"], payload


def test_truncation_direction_left_keeps_the_end(server, encoder):
    long = " ".join(f"word{i}" for i in range(400))  # past MiniLM's 256 tokens
    left = copy.copy(encoder.tokenizer)
    left.truncation_side = "left"
    want = SentenceEncoder(encoder.model, left, encoder.pooling, encoder.normalize, encoder.max_seq_length).encode([long])
    for direction in ("left", "Left"):  # TEI writes its enum capitalized
        status, got = server.request("POST", "/embed", {"inputs": long, "truncate": True,
                                                         "truncation_direction": direction})
        assert status == 200 and cos(got, want).min() >= COSINE
    status, got = server.request("POST", "/embed", {"inputs": long, "truncate": True})
    assert status == 200 and cos(got, encoder.encode([long])).min() >= COSINE and cos(got, want).min() < 0.99
    status, err = server.request("POST", "/embed", {"inputs": "a", "truncation_direction": "up"})
    assert status == 422 and "'truncation_direction' must be 'right' or 'left'; got 'up'" in err["error"]


def test_without_a_direction_the_checkpoint_s_tokenizer_cuts(tmp_path, minilm_dir):
    d = tmp_path / "minilm-left"  # MiniLM whose tokenizer_config.json asks for left truncation
    d.mkdir()
    for f in minilm_dir.iterdir():  # links, never written through
        if f.name != "tokenizer_config.json":
            (d / f.name).symlink_to(f)
    cfg = json.loads((minilm_dir / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "truncation_side": "left"}))
    long = " ".join(f"word{i}" for i in range(400))
    want = SentenceEncoder.from_pretrained(d).encode([long])  # cut on the left, as its tokenizer says
    s = Server(d)
    try:
        status, got = s.request("POST", "/embed", {"inputs": long, "truncate": True})
        assert status == 200 and cos(got, want).min() >= COSINE
    finally:
        s.stop()


def test_truncate_on_request_and_get_on_a_post_route(server, encoder):
    long = "word " * 300
    status, got = server.request("POST", "/embed", {"inputs": long, "truncate": True})
    assert status == 200 and cos(got[0], encoder.encode(long)) >= COSINE
    status, payload = server.request("GET", "/embed")
    assert status == 405 and payload["error_type"] == "MethodNotAllowed"


def test_sixteen_clients_fifty_requests_each(server, encoder):
    rng = np.random.default_rng(0)
    want = encoder.encode(TEXTS)
    failures, checked = [], [0]
    lock = threading.Lock()

    def client(seed):
        r = np.random.default_rng(seed)
        for _ in range(50):
            idx = r.choice(len(TEXTS), size=int(r.integers(1, 5)))
            try:
                status, got = server.request("POST", "/embed", {"inputs": [TEXTS[i] for i in idx]})
            except OSError as e:
                failures.append(repr(e))
                continue
            if status != 200:
                failures.append((status, got))
            elif cos(got, want[idx]).min() < COSINE:
                failures.append(("wrong vector", float(cos(got, want[idx]).min())))
            else:
                with lock:
                    checked[0] += 1

    threads = [threading.Thread(target=client, args=(int(s),)) for s in rng.integers(0, 2**31, size=16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and checked[0] == 16 * 50
    status, text = server.request("GET", "/metrics")
    sizes = [ln for ln in text.splitlines() if ln.startswith("minibert_batch_size_count")]
    batches = float(sizes[0].split()[-1])
    assert batches < 16 * 50, "concurrent requests never shared a model call"


def test_a_client_that_disconnects_disturbs_no_one(server, encoder):
    want = encoder.encode(TEXTS[2])
    body = json.dumps({"inputs": [TEXTS[5]] * 8}).encode()
    for partial in (False, True):
        s = socket.create_connection(("127.0.0.1", server.port))
        head = (f"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        s.sendall(head + (body[:10] if partial else body))
        s.close()  # gone before the answer (or before the whole body)
    status, got = server.request("POST", "/embed", {"inputs": TEXTS[2]})
    assert status == 200 and cos(got[0], want) >= COSINE


def test_api_key(minilm_dir):
    s = Server(minilm_dir, "--api-key", "s3cret")
    try:
        status, payload = s.request("POST", "/embed", {"inputs": "hi"})
        assert status == 401 and payload["error_type"] == "Unauthorized" and "Bearer" in payload["error"]
        assert s.request("POST", "/embed", {"inputs": "hi"}, headers={"Authorization": "Bearer nope"})[0] == 401
        assert s.request("POST", "/embed", {"inputs": "hi"}, headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert s.request("GET", "/v1/models")[0] == 401
        assert s.request("GET", "/health")[0] == 200  # probes need no key
    finally:
        s.stop()


def test_sigterm_lets_in_flight_requests_finish(minilm_dir, encoder):
    """Every request sent before SIGTERM gets its 200 and right vectors; later ones may find the
    server gone; the server exits (uvicorn re-raises the signal once it has shut down)."""
    s = Server(minilm_dir)
    want = encoder.encode(TEXTS)
    results, stop, term = [], threading.Event(), [float("inf")]

    def client():
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                status, got = s.request("POST", "/embed", {"inputs": TEXTS})
                outcome = "ok" if status == 200 and cos(got, want).min() >= COSINE else (status, got)
            except OSError as e:
                outcome = type(e).__name__
                time.sleep(0.05)
            results.append((t0, outcome))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    while sum(r == "ok" for _, r in results) < 20:
        time.sleep(0.05)
    term[0] = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    rc = s.proc.wait(timeout=60)
    stop.set()
    for t in threads:
        t.join()
    s.stop()
    assert rc in (0, -signal.SIGTERM), rc
    before = [r for t0, r in results if t0 < term[0]]
    assert before and all(r == "ok" for r in before), [r for r in before if r != "ok"][:3]
    assert all(r == "ok" or isinstance(r, str) for _, r in results)  # after: a 200 or no connection


def test_a_port_in_use_is_an_error_before_the_model_loads(minilm_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "minibert", "serve", "--model", str(minilm_dir), "--port", str(port)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert f"cannot listen on 127.0.0.1:{port} (--host, --port): Address already in use" in r.stderr, r.stderr
    assert "serving on" not in r.stderr, r.stderr  # failed before loading, not after


def test_a_request_over_the_batch_budget_runs_in_parts_within_it(minilm_dir, encoder):
    texts = [f"{i}: " + " ".join(["a long input that keeps going"] * 9) for i in range(8)]  # ~60 tokens each
    assert encoder.tokenizer.lengths(texts).sum() > 256
    s = Server(minilm_dir, "--max-batch-tokens", "256")  # MiniLM's input limit: the least it accepts
    try:
        status, got = s.request("POST", "/embed", {"inputs": texts})
        assert status == 200 and cos(got, encoder.encode(texts)).min() >= COSINE
        metrics = s.request("GET", "/metrics")[1]
        calls = {ln.split()[0]: float(ln.split()[1]) for ln in metrics.splitlines()
                 if ln.startswith("minibert_batch_tokens_")}
        n = calls["minibert_batch_tokens_count"]
        assert n >= 2, calls  # this request took two model calls or more (the warm-up is not counted)
        assert calls['minibert_batch_tokens_bucket{le="256.0"}'] == n, calls  # every call within the budget
    finally:
        s.stop()
    r = subprocess.run([sys.executable, "-m", "minibert", "serve", "--model", str(minilm_dir), "--port", str(free_port()),
                        "--max-batch-tokens", "100"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "--max-batch-tokens 100 is less than the model's input limit (256 tokens)" in r.stderr, \
        r.stderr


def test_prompts_by_name_and_the_default_one(tmp_path, minilm_dir, encoder):
    d = tmp_path / "minilm-prompts"  # MiniLM with sentence-transformers prompts, "query" the default
    d.mkdir()
    for f in minilm_dir.iterdir():  # links, never written through
        if f.name != "config_sentence_transformers.json":
            (d / f.name).symlink_to(f)
    (d / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": "query"}))
    s = Server(d)
    try:
        status, got = s.request("POST", "/embed", {"inputs": TEXTS[:3], "prompt_name": "passage"})
        assert status == 200 and cos(got, encoder.encode(["passage: " + t for t in TEXTS[:3]])).min() >= COSINE
        status, body = s.request("POST", "/v1/embeddings", {"input": TEXTS[:3]})  # the default prompt
        assert status == 200
        assert cos([v["embedding"] for v in body["data"]], encoder.encode(["query: " + t for t in TEXTS[:3]])).min() \
            >= COSINE
        status, toks = s.request("POST", "/tokenize", {"inputs": "hi"})
        assert status == 200 and [t["text"] for t in toks[0]] == ["[CLS]", "query", ":", "hi", "[SEP]"]
        status, err = s.request("POST", "/embed", {"inputs": "hi", "prompt_name": "doc"})
        assert status == 422 and "with keys ['query', 'passage']" in err["error"]
    finally:
        s.stop()


@pytest.mark.parametrize("missing", ["orjson", "uvicorn"])
def test_serve_without_its_extra_names_what_to_install(monkeypatch, missing):
    from minibert import serve

    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    with pytest.raises(SystemExit, match=r"orjson.*pip install 'minibert-numpy\[serve\]'"):
        serve.run(model="unused")


class _Held:
    """An encoder stand-in for the engine: each call records the Numba thread count its thread
    runs with and waits until the test lets it finish."""

    def __init__(self):
        import types

        self.tokenizer, self.pooling = types.SimpleNamespace(pad_token_id=0), None
        self.started = {i: threading.Event() for i in range(4)}
        self.finish = {i: threading.Event() for i in range(4)}
        self.threads = {}

    def _pooled(self, x, modes, norm):
        import numba

        i = int(x["input_ids"][0, 0])
        self.threads[i] = numba.get_num_threads()
        self.started[i].set()
        assert self.finish[i].wait(60)
        return np.full((len(x["input_ids"]), 4), float(i), np.float32)


def _job(i):
    return {"input_ids": np.full((1, 3), i, np.int64), "attention_mask": np.ones((1, 3), np.int64)}


@contextlib.contextmanager
def _engine(budget, threads=None, parallel=False):
    """A started engine over a :class:`_Held` encoder; every held call let go and the engine
    stopped at the end. ``parallel``: skip unless two calls can run at once here."""
    from minibert import runtime
    from minibert.serve import Engine

    if parallel and (runtime.max_threads() < 2 or not runtime.threadsafe_layer()):
        pytest.skip("needs two Numba threads and a thread-safe threading layer")
    enc = _Held()
    engine = Engine(enc, budget, threads=threads)
    engine.start()
    try:
        yield enc, engine
    finally:
        for e in enc.finish.values():
            e.set()
        engine.stop()


def test_a_call_alone_has_every_core_and_calls_at_once_share_them():
    with _engine(1000, threads=2, parallel=True) as (enc, engine):
        first = engine.submit(_job(0), 3)
        assert enc.started[0].wait(30) and enc.threads[0] == 2  # alone: both cores
        second = engine.submit(_job(1), 3)
        assert enc.started[1].wait(30), "a second call did not start while the first ran"
        assert enc.threads[1] == 1  # the first keeps both until it ends; the next calls get one each
        enc.finish[1].set()
        enc.finish[0].set()
        assert second.result(30)[0, 0] == 1 and first.result(30)[0, 0] == 0
        third = engine.submit(_job(2), 3)
        assert enc.started[2].wait(30) and enc.threads[2] == 2  # alone again: both
        enc.finish[2].set()
        assert third.result(30)[0, 0] == 2


def test_the_engine_runs_on_the_thread_count_of_its_caller():
    """``minibert serve --threads 1``: the count set in the main thread holds in the inference
    threads (a new thread would otherwise start with all of Numba's)."""
    import minibert

    minibert.set_num_threads(1)
    try:
        with _engine(1000) as (enc, engine):  # made while the count is 1
            minibert.set_num_threads(None)
            first = engine.submit(_job(0), 3)
            assert enc.started[0].wait(30)
            second = engine.submit(_job(1), 3)
            assert not enc.started[1].wait(0.5), "two calls ran at once on one thread"
            enc.finish[0].set()
            assert enc.started[1].wait(30)
            enc.finish[1].set()
            assert first.result(30)[0, 0] == 0 and second.result(30)[0, 0] == 1
            assert enc.threads == {0: 1, 1: 1}
    finally:
        minibert.set_num_threads(None)


def test_the_warm_up_loads_every_kernel_a_request_can_reach(minilm_dir):
    """/health answers once the kernels are loaded: after the server's warm-up, requests of one
    text and batches over 256 rows load no kernel (a load mid-request took a batch ~0.1 s more)."""
    code = f"""
        import numba, minibert
        from minibert import kernels, serve
        enc = minibert.SentenceEncoder({str(minilm_dir)!r})
        serve._warm_up(enc)
        def loaded():
            return {{f"{{m.__name__}}.{{name}}": len(d.overloads) for m in vars(kernels).values()
                    if type(m) is type(kernels) for name, d in vars(m).items()
                    if isinstance(d, numba.core.dispatcher.Dispatcher)}}
        before = loaded()
        texts = ["a short one", "a somewhat longer sentence with more words in it than the first"]
        enc.encode(texts[:1])
        enc.encode(texts * 8, batch_size=16)
        enc.encode([" ".join(["many words"] * 60)] * 12, batch_size=12)  # ~1400 rows
        after = loaded()
        print("loaded after the warm-up:", {{k: after[k] - before[k] for k in after if after[k] != before[k]}})
    """
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "loaded after the warm-up: {}" in r.stdout, r.stdout


def test_calls_at_once_hold_at_most_the_batch_budget_together():
    """--max-batch-tokens bounds the tokens of the calls running at once, not of each: a job that
    does not fit beside the running call waits for it; one that fits runs beside it."""
    with _engine(10, threads=2, parallel=True) as (enc, engine):
        first = engine.submit(_job(0), 6)
        assert enc.started[0].wait(30)
        big = engine.submit(_job(1), 6)  # 6 + 6 > 10
        assert not enc.started[1].wait(0.5), "a call ran beside another over the budget"
        enc.finish[0].set()
        assert enc.started[1].wait(30)
        small = engine.submit(_job(2), 4)  # 6 + 4 <= 10
        assert enc.started[2].wait(30), "a call that fits the budget did not run beside the other"
        enc.finish[1].set()
        enc.finish[2].set()
        assert [f.result(30)[0, 0] for f in (first, big, small)] == [0, 1, 2]
        over = engine.submit(_job(3), 12)  # over the budget on its own: runs alone, as before
        assert enc.started[3].wait(30)
        enc.finish[3].set()
        assert over.result(30)[0, 0] == 3
