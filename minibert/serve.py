"""``minibert serve``: sentence embeddings over HTTP with text-embeddings-inference's routes and
OpenAI's embeddings API (``pip install 'minibert-numpy[serve]'``: starlette, uvicorn,
prometheus-client, orjson).

Requests are tokenized (once: to check their length, count their tokens and run) in a thread pool,
then queued for the inference threads (one per core, see :class:`Engine`): a free one merges the
waiting requests into one batch of up to ``max_batch_tokens`` tokens and runs it packed, as
``SentenceEncoder.encode`` does, so concurrent small requests share a model call. JSON encoding
also runs off the event loop. Errors are JSON
``{"error": message, "error_type": kind}``; bad input is a 4xx, never a 500.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import copy
import json
import logging
import threading
import time
from typing import List, Optional

import numpy as np

from . import pooling as P

log = logging.getLogger("minibert.serve")


class ClientError(Exception):
    def __init__(self, status: int, message: str, kind: str = "Validation"):
        super().__init__(message)
        self.status, self.kind = status, kind


class _Job:
    __slots__ = ("x", "tokens", "future")

    def __init__(self, x, tokens):  # x: the request's tokenized texts, [b, T] arrays
        self.x, self.tokens, self.future = x, tokens, concurrent.futures.Future()


def _merge(xs, pad_id: int) -> dict:
    """The jobs' [b_i, T_i] arrays as one [sum b_i, max T_i] batch, padded on the right."""
    if len(xs) == 1:
        return xs[0]
    T, n = max(x["input_ids"].shape[1] for x in xs), sum(len(x["input_ids"]) for x in xs)
    out = {k: np.full((n, T), pad_id if k == "input_ids" else 0, dtype=np.int64) for k in xs[0]}
    i = 0
    for x in xs:
        b, t = x["input_ids"].shape
        for k, v in x.items():
            out[k][i:i + b, :t] = v
        i += b
    return out


class Engine:
    """The inference threads, one per core the model may use: jobs queue up; a free thread takes
    the waiting jobs in order while their tokens fit in what the running calls leave of
    ``max_batch_tokens`` (at least one job, once it fits) and runs them on the cores no other
    call is using (at least one). Alone, a call has every core; under load each thread runs its
    own batch on one core, so no call waits at a parallel kernel's barrier for a core the web
    threads took."""

    def __init__(self, encoder, max_batch_tokens: int, on_batch=None, threads: Optional[int] = None):
        from . import runtime

        self.encoder, self.max_batch_tokens, self.on_batch = encoder, max_batch_tokens, on_batch
        self.threads = runtime.get_num_threads() if threads is None else threads  # the caller's count
        self._jobs: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._busy, self._tokens = 0, 0  # cores and tokens the running calls use
        # a threading layer that runs one parallel kernel at a time (runtime.threadsafe_layer) gets one
        n = self.threads if runtime.threadsafe_layer() else 1
        self._workers = [threading.Thread(target=self._run, name=f"minibert-inference-{i}", daemon=True)
                         for i in range(n)]

    def start(self):
        for t in self._workers:
            t.start()

    def stop(self):  # after the queued jobs are done
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._workers:
            t.join()

    def submit(self, x, tokens: int) -> concurrent.futures.Future:
        job = _Job(x, tokens)
        with self._cv:
            if self._stop:
                raise ClientError(503, "the server is shutting down", "Unhealthy")
            self._jobs.append(job)
            self._cv.notify()
        return job.future

    def _take(self):
        """(jobs, threads, tokens) of the next call, or (None, 0, 0) once stopped and done. The
        calls running at once hold at most ``max_batch_tokens`` tokens together, so memory stays
        that of one full batch however many threads there are."""
        with self._cv:
            # the first job fits what the running calls leave, or runs alone if none runs
            while not (self._jobs and (self._jobs[0].tokens <= self.max_batch_tokens - self._tokens
                                       or not self._tokens)):
                if self._stop and not self._jobs:
                    return None, 0, 0
                self._cv.wait()
            budget = self.max_batch_tokens - self._tokens
            batch = [self._jobs.popleft()]
            used = batch[0].tokens
            while self._jobs and used + self._jobs[0].tokens <= budget:
                job = self._jobs.popleft()
                batch.append(job)
                used += job.tokens
            n = max(1, self.threads - self._busy)
            self._busy += n
            self._tokens += used
            return batch, n, used

    def _run(self):
        import numba

        while True:
            batch, n, tokens = self._take()
            if batch is None:
                return
            try:
                numba.set_num_threads(n)  # this thread's count only
                self._call(batch)
            finally:
                with self._cv:
                    self._busy -= n
                    self._tokens -= tokens
                    self._cv.notify_all()  # a job waiting for these tokens may fit now

    def _call(self, batch):
        live = [j for j in batch if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        x = _merge([j.x for j in live], self.encoder.tokenizer.pad_token_id)
        n = len(x["input_ids"])
        t0 = time.perf_counter()
        try:
            vecs = self.encoder._pooled(x, self.encoder.pooling, False)  # [n, H] float32
        except Exception as e:  # noqa: BLE001 - handed to the waiting requests, which answer 500
            log.exception("a batch of %d texts failed", n)
            for j in live:
                j.future.set_exception(e)
            return
        if self.on_batch is not None:
            self.on_batch(n, sum(j.tokens for j in live), time.perf_counter() - t0)
        i = 0
        for j in live:
            b = len(j.x["input_ids"])
            j.future.set_result(vecs[i:i + b])
            i += b


class Metrics:
    """Prometheus metrics of one server (their own registry)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("minibert_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("minibert_request_duration_seconds", "request latency", ["route"],
                                 registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("minibert_batch_size", "texts per model call", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
        self.batch_tokens = Histogram("minibert_batch_tokens", "tokens per model call", registry=self.registry,
                                      buckets=(16, 64, 256, 1024, 4096, 16384, 65536))
        self.tokens = Counter("minibert_tokens", "tokens embedded", registry=self.registry)
        self.inference = Histogram("minibert_inference_seconds", "seconds per model call", registry=self.registry,
                                   buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5))

    def batch(self, n_texts, n_tokens, seconds):
        self.inference.observe(seconds)
        self.batch_size.observe(n_texts)
        self.batch_tokens.observe(n_tokens)
        self.tokens.inc(n_tokens)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class Server:
    """The routes over one :class:`minibert.SentenceEncoder`."""

    def __init__(self, encoder, model_id: str, max_batch_tokens: int = 16384, max_client_batch_size: int = 32,
                 auto_truncate: bool = False, api_key: Optional[str] = None):
        from . import __version__

        self.encoder, self.model_id = encoder, model_id
        self.max_batch_tokens, self.max_client_batch_size = max_batch_tokens, max_client_batch_size
        self.auto_truncate, self.api_key, self.version = auto_truncate, api_key, __version__
        self.started = int(time.time())  # OpenAI's "created" of the one model served
        self.metrics = Metrics()
        self.engine = Engine(encoder, max_batch_tokens, self.metrics.batch)
        # TEI's truncation_direction: a view of the tokenizer per side (they share its configured
        # copies, so no request changes what another one gets)
        self._cut = {side: copy.copy(encoder.tokenizer) for side in ("right", "left")}
        for side, tok in self._cut.items():
            tok.truncation_side = side
        # two threads for tokenizing and JSON: the cores belong to the model; more threads only
        # add memory (a malloc arena each) and contention
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="minibert-http")

    # -- plumbing ---------------------------------------------------------------------------------
    def app(self):
        from contextlib import asynccontextmanager

        from starlette.applications import Starlette
        from starlette.routing import Route

        @asynccontextmanager
        async def lifespan(app):
            self.engine.start()
            try:
                yield
            finally:
                await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)

        routes = [Route("/embed", self._route("/embed", self.embed), methods=["POST"]),
                  Route("/v1/embeddings", self._route("/v1/embeddings", self.openai), methods=["POST"]),
                  Route("/tokenize", self._route("/tokenize", self.tokenize), methods=["POST"]),
                  Route("/health", self._route("/health", self.health, auth=False), methods=["GET"]),
                  Route("/info", self._route("/info", self.info), methods=["GET"]),
                  Route("/v1/models", self._route("/v1/models", self.models), methods=["GET"]),
                  Route("/metrics", self._route("/metrics", self.prometheus), methods=["GET"])]
        async def not_found(request, exc):  # unknown routes and methods answer JSON too
            from starlette.responses import JSONResponse

            status = getattr(exc, "status_code", 404)
            return JSONResponse({"error": f"{request.method} {request.url.path}: {getattr(exc, 'detail', 'not found')}",
                                 "error_type": "NotFound" if status == 404 else "MethodNotAllowed"}, status_code=status)

        return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})

    def _route(self, name, handler, auth=True):
        from starlette.responses import JSONResponse

        async def endpoint(request):
            t0 = time.perf_counter()
            try:
                if auth and self.api_key is not None:
                    given = request.headers.get("authorization", "")
                    if given != f"Bearer {self.api_key}":
                        raise ClientError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                          "Unauthorized")
                response = await handler(request)
            except ClientError as e:
                response = JSONResponse({"error": str(e), "error_type": e.kind}, status_code=e.status)
            except Exception as e:  # noqa: BLE001 - a failure of ours: logged, reported as such
                log.exception("%s failed", name)
                response = JSONResponse({"error": f"internal error: {type(e).__name__}: {e}", "error_type": "Backend"},
                                        status_code=500)
            self.metrics.requests.labels(name, str(response.status_code)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - t0)
            return response
        return endpoint

    @staticmethod
    async def _body(request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ClientError(422, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ClientError(422, f"the request body must be a JSON object; got {type(body).__name__}")
        return body

    def _texts(self, value, field: str) -> List[str]:
        if isinstance(value, str):
            texts = [value]
        elif isinstance(value, list) and value and all(isinstance(t, str) for t in value):
            texts = value
        elif isinstance(value, list) and not value:
            raise ClientError(422, f"'{field}' is an empty list; send at least one text")
        else:
            raise ClientError(422, f"'{field}' must be a string or a list of strings; got {_kind(value)}")
        if len(texts) > self.max_client_batch_size:
            raise ClientError(413, f"{len(texts)} inputs in one request; the limit is {self.max_client_batch_size} "
                                   "(--max-client-batch-size)")
        return texts

    @staticmethod
    def _flag(body, field, default) -> bool:
        v = body.get(field, default)
        if not isinstance(v, bool):
            raise ClientError(422, f"'{field}' must be true or false; got {_kind(v)}")
        return v

    def _prompted(self, texts: List[str], body, named: bool) -> List[str]:
        """The texts with the prompt before each, as sentence-transformers: the request's
        ``prompt_name`` (TEI's field; ``named`` routes), else the checkpoint's default prompt."""
        try:
            return self.encoder.with_prompt(texts, body.get("prompt_name") if named else None)
        except (TypeError, ValueError) as e:
            raise ClientError(422, f"'prompt_name': {e}") from None

    def _dimensions(self, body) -> Optional[int]:
        """OpenAI's ``dimensions``: keep the first d components (normalized after, when the route
        normalizes), as OpenAI's and sentence-transformers' ``truncate_dim`` do. Only models trained
        for it (Matryoshka) keep their quality cut short; that is the caller's choice."""
        d, dim = body.get("dimensions"), self.encoder.dim
        if d is None:
            return None
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= dim:
            raise ClientError(422, f"'dimensions' must be an integer from 1 to {dim} (the model's dimension); "
                                   f"got {d!r}")
        return d

    async def _vectors(self, texts: List[str], truncate: bool, side: Optional[str] = None):
        """[n, H] float32 raw pooled vectors (no normalization) and the tokens they used. A request
        over ``max_batch_tokens`` goes to the model in parts within it (each text fits: run() checks)."""
        x, lengths = await self._off_loop(self._tokenized, texts, truncate, side)
        parts, start, used = [], 0, 0
        for i, n in enumerate(lengths.tolist()):
            if used and used + n > self.max_batch_tokens:
                parts.append((start, i))
                start, used = i, 0
            used += n
        parts.append((start, len(lengths)))
        futures = [self.engine.submit({k: v[a:b] for k, v in x.items()}, int(lengths[a:b].sum())) for a, b in parts]
        vecs = await asyncio.gather(*map(asyncio.wrap_future, futures))
        return (vecs[0] if len(vecs) == 1 else np.concatenate(vecs)), int(lengths.sum())

    def _direction(self, body) -> Optional[str]:
        """TEI's ``truncation_direction``: "right" or "left" (the end of a text kept); None: the
        tokenizer's own side, as ``SentenceEncoder.encode`` cuts."""
        v = body.get("truncation_direction")
        if v is None:
            return None
        if not isinstance(v, str) or v.lower() not in self._cut:
            raise ClientError(422, f"'truncation_direction' must be 'right' or 'left'; got {v!r}")
        return v.lower()

    def _tokenized(self, texts: List[str], truncate: bool, side: Optional[str] = None):
        """The texts as the model's [n, T] inputs, truncated to the model's limit (cut on ``side``),
        and each one's tokens [n]; without ``truncate`` a text over the limit is a 413."""
        tok, limit = self._cut.get(side, self.encoder.tokenizer), self.encoder.max_seq_length
        x = tok(texts, padding=True, truncation=True, max_length=limit)
        lengths = x["attention_mask"].sum(axis=1)
        if not truncate:
            full = np.flatnonzero(lengths == limit).tolist()  # at the limit: maybe cut, count again
            for i, n in zip(full, tok.lengths([texts[i] for i in full]) if full else ()):
                if n > limit:
                    raise ClientError(413, f"input {i} has {n} tokens; the limit is {limit}: send \"truncate\": true "
                                           "or start the server with --auto-truncate")
        return x, lengths

    async def _off_loop(self, fn, *args):  # CPU work of a request, off the event loop
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _json(self, payload, status=200):
        """``payload`` as JSON, float32 arrays as the shortest decimals that read back to the same
        float32 (as TEI writes them)."""
        import orjson
        from starlette.responses import Response

        body = await self._off_loop(orjson.dumps, payload, None, orjson.OPT_SERIALIZE_NUMPY)
        return Response(body, status_code=status, media_type="application/json")

    # -- routes -----------------------------------------------------------------------------------
    async def embed(self, request):
        body = await self._body(request)
        texts = self._prompted(self._texts(body.get("inputs"), "inputs"), body, named=True)
        normalize = self._flag(body, "normalize", True)
        truncate = self._flag(body, "truncate", False) or self.auto_truncate
        dims, side = self._dimensions(body), self._direction(body)
        vecs, _ = await self._vectors(texts, truncate, side)
        vecs = vecs[:, :dims]
        if normalize:
            vecs = P.normalize(vecs)
        return await self._json(np.ascontiguousarray(vecs, dtype=np.float32))

    async def openai(self, request):
        body = await self._body(request)
        value = body.get("input")
        if isinstance(value, list) and value and not isinstance(value[0], str):
            raise ClientError(422, "'input' as token ids is not supported; send strings")
        texts = self._prompted(self._texts(value, "input"), body, named=False)  # OpenAI's API has no prompt names
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise ClientError(422, f"'encoding_format' must be 'float' or 'base64'; got {fmt!r}")
        model = body.get("model", self.model_id)
        if not isinstance(model, str):
            raise ClientError(422, f"'model' must be a string; got {_kind(model)}")
        dims = self._dimensions(body)
        vecs, tokens = await self._vectors(texts, self.auto_truncate)
        vecs = vecs[:, :dims]
        if self.encoder.normalize:  # the checkpoint's own pipeline, as sentence-transformers
            vecs = P.normalize(vecs)
        data = [{"object": "embedding", "index": i,
                 "embedding": (base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") if fmt == "base64"
                               else v)} for i, v in enumerate(np.ascontiguousarray(vecs, dtype=np.float32))]
        return await self._json({"object": "list", "data": data, "model": self.model_id,
                                 "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def tokenize(self, request):
        body = await self._body(request)
        texts = self._prompted(self._texts(body.get("inputs"), "inputs"), body, named=True)  # what the model sees
        special = self._flag(body, "add_special_tokens", True)
        return await self._json(await self._off_loop(self.encoder.tokenizer.token_spans, texts, special))

    async def health(self, request):
        from starlette.responses import Response

        return Response(status_code=200)

    async def info(self, request):
        return await self._json({"model_id": self.model_id, "model_dtype": str(self.encoder.model.dtype),
                                 "dimension": self.encoder.dim, "max_input_length": self.encoder.max_seq_length,
                                 "max_batch_tokens": self.max_batch_tokens,
                                 "max_client_batch_size": self.max_client_batch_size,
                                 "auto_truncate": self.auto_truncate, "version": self.version,
                                 "engine": "minibert"})

    async def models(self, request):  # OpenAI's model list, which OpenAI clients may ask for first
        return await self._json({"object": "list", "data": [{"id": self.model_id, "object": "model",
                                                             "created": self.started, "owned_by": "minibert"}]})

    async def prometheus(self, request):
        from starlette.responses import Response

        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4")


def _kind(v) -> str:
    return "null" if v is None else type(v).__name__


def run(model: Optional[str] = None, host: str = "127.0.0.1", port: int = 8080, max_batch_tokens: int = 16384,
        max_client_batch_size: int = 32, auto_truncate: bool = False, api_key: Optional[str] = None,
        dtype: str = "float32", kernels: str = "numba"):
    """Load the model, compile its kernels (a warm-up call), then serve until SIGINT/SIGTERM; in-flight
    requests finish first."""
    try:
        import orjson  # noqa: F401
        import uvicorn
    except ImportError:
        raise SystemExit("minibert serve needs starlette, uvicorn, prometheus-client and orjson: "
                         "pip install 'minibert-numpy[serve]'") from None
    from .hub import DEFAULT_MODEL
    from .sentence import SentenceEncoder

    from . import runtime

    sock = _bound_socket(host, port)
    runtime.compile_here()  # /health waits for the compiled kernels: compile them in this process
    t0 = time.perf_counter()
    encoder = SentenceEncoder.from_pretrained(model, dtype=dtype, kernels=kernels)
    if max_batch_tokens < encoder.max_seq_length:
        raise SystemExit(f"minibert serve: --max-batch-tokens {max_batch_tokens} is less than the model's input limit "
                         f"({encoder.max_seq_length} tokens): a text that long would fit no batch")
    _warm_up(encoder)
    runtime.release_freed_memory()  # the warm-up's large batch is not what the server keeps
    server = Server(encoder, model or DEFAULT_MODEL, max_batch_tokens, max_client_batch_size, auto_truncate, api_key)
    log.info("model %s ready in %.2f s; serving on http://%s:%d", model or DEFAULT_MODEL, time.perf_counter() - t0,
             f"[{host}]" if ":" in host else host, port)
    config = uvicorn.Config(server.app(), host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    uvicorn.Server(config).run(sockets=[sock])


def _warm_up(encoder) -> None:
    """Load every kernel a request can reach before /health answers: a few rows run each layer in
    one call, a batch over ``PreparedLayer.max_rows`` rows kernel by kernel (kernels/layer.py)."""
    from .kernels.layer import PreparedLayer

    encoder.encode(["warm up", "the kernels compile on first use"], normalize=False)
    tokens = min(202, encoder.max_seq_length)  # 200 words and [CLS], [SEP], or cut to the limit
    n = PreparedLayer.max_rows // tokens + 1
    encoder.encode([" ".join(["warm"] * 200)] * n, normalize=False, batch_size=n)


def _bound_socket(host: str, port: int):
    """The server's socket, bound before the model loads (listening only once it is ready), so a
    port in use is an error at once rather than after the load."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit(f"minibert serve: cannot listen on {host}:{port} (--host, --port): {e.strerror or e}") from None
    return sock
