"""The HTTP app: FastAPI over the batcher, and the uvicorn server around it.

Endpoints:

- ``POST /predict``: one image or a small batch (``dart_ee.serve.inputs``) -> per sample the class, its
  confidence, the exit taken (0-based; the last is the full network) and the MACs spent; per request the
  time queued and computing. Bad input gets a 4xx with a message, a full queue 503 with Retry-After.
- ``GET /healthz``: the process answers. ``GET /readyz``: the model is loaded and warmed up (503 until then).
- ``GET /metrics``: Prometheus text (``dart_ee.serve.metrics``). ``GET /info``: what is served, with the
  policy's certificate (an edited policy file is reported as not certified).

The engine is loaded and warmed up (on a thread) before the server accepts connections, so with several
workers or replicas a request never reaches one that is still loading; a model that fails to load keeps the
process up with /readyz saying why. A stop (SIGINT/SIGTERM) stops accepting connections, answers every
accepted request, then closes the batcher.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from dart_ee import __version__
from dart_ee.config import ServeConfig
from dart_ee.core.errors import DartError, InputError
from dart_ee.serve.batcher import Batcher, Closed, QueueFull
from dart_ee.serve.engine import Engine, make_engine
from dart_ee.serve.inputs import BadRequest, parse_body
from dart_ee.serve.metrics import CONTENT_TYPE, ServeMetrics

ENV = "DART_EE_SERVE"  # what `--workers N` passes to each uvicorn worker process: the engine and the settings
RETRY_AFTER_S = 1


class _State:
    """The app's engine and batcher, loaded on a thread when the app starts."""

    def __init__(self, make: Callable[[], Engine], cfg: ServeConfig) -> None:
        self.make, self.cfg, self.metrics = make, cfg, ServeMetrics(cfg.max_batch)
        self.engine: Engine | None = None
        self.batcher: Batcher | None = None
        self.error: str | None = None  # why the engine could not be loaded

    def load(self) -> None:
        try:
            engine = self.make()
            if self.cfg.warmup:
                warm_up(engine, self.cfg.max_batch)
            self.engine = engine
            self.batcher = Batcher(engine, self.cfg.max_batch, self.cfg.max_wait_ms, self.cfg.max_queue,
                                   self.cfg.max_hold_ms, self.metrics)
        except Exception as e:  # reported by /readyz; the process stays up to say so
            self.error = str(e) if isinstance(e, DartError) else f"{type(e).__name__}: {e}"

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        # loaded and warmed up before the server accepts a connection: with several workers or replicas on one
        # port, a connection then only ever reaches a process that can answer it
        await asyncio.to_thread(self.load)
        yield
        if self.batcher is not None:  # uvicorn has answered the requests in flight; answer what is still queued
            self.batcher.close()
        if self.engine is not None and self.engine.audits is not None:  # online risk control: keep theta
            self.engine.audits.save()


def create_app(make: Callable[[], Engine], cfg: ServeConfig | None = None) -> FastAPI:
    """The app serving the engine that ``make()`` builds (called once, on a thread, when the app starts)."""
    cfg = cfg or ServeConfig()
    state = _State(make, cfg)
    metrics = state.metrics
    app = FastAPI(title="dart-ee", version=__version__, lifespan=state.lifespan,
                  summary="An early-exit network: easy inputs are answered early, the rest of the network skipped.")
    app.state.serve = state

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            out = await _answer(request, state, cfg)
        except BadRequest as e:
            return _error(metrics, e.status, str(e))
        except (QueueFull, Closed) as e:
            return _error(metrics, 503, f"{e}; retry in {RETRY_AFTER_S} s", {"Retry-After": str(RETRY_AFTER_S)})
        except InputError as e:  # the engine's own input check (e.g. the range): the request's fault
            return _error(metrics, 422, str(e))
        total = time.perf_counter() - t0
        answers = out["answers"]
        metrics.answered(200, max(a.exit for a in answers), total)
        body = {"predictions": [{"class": a.cls, "confidence": a.confidence, "exit": a.exit, "macs": a.macs}
                                for a in answers],
                "queue_ms": 1000 * out["queue_s"], "compute_ms": 1000 * out["compute_s"], "latency_ms": 1000 * total}
        return JSONResponse(body, headers={"x-dart-ee-process": str(os.getpid())})  # which worker or replica answered

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        if state.batcher is not None:
            return JSONResponse({"status": "ready"})
        body = {"status": "failed", "error": state.error} if state.error else {"status": "loading"}
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/metrics")
    async def prometheus() -> Response:
        if state.batcher is not None:
            metrics.queued(state.batcher.depth)
        return Response(metrics.text(), media_type=CONTENT_TYPE)

    @app.get("/info")
    async def info() -> Response:
        if state.engine is None:
            return await readyz()
        audits = state.engine.audits
        live = {"adapt_state": audits.info(cfg.max_batch)} if audits is not None else {}  # theta moves per batch
        return JSONResponse({**state.engine.info, **live, "dart_ee": __version__, "process": os.getpid(),
                             "batching": cfg.model_dump(
            include={"max_batch", "max_wait_ms", "max_hold_ms", "max_queue", "max_body_bytes", "threads"})})

    return app


async def _answer(request: Request, state: _State, cfg: ServeConfig) -> dict[str, Any]:
    if state.batcher is None or state.engine is None:
        raise BadRequest(503, "the model is not loaded: " + (state.error or "still loading, see GET /readyz"))
    body = await _read(request, cfg.max_body_bytes)
    x = parse_body(body, request.headers.get("content-type", ""), state.engine.input_shape)
    if len(x) > cfg.max_batch:
        raise BadRequest(413, f"{len(x)} images in one request; at most {cfg.max_batch} (the server's max_batch)")
    return await state.batcher.submit(x)


async def _read(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` bytes (a declared length over it is never read)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, f"request body of {int(declared):,} bytes; at most {limit:,} (max_body_bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request body over {limit:,} bytes (max_body_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _error(metrics: ServeMetrics, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    metrics.answered(status)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def warm_up(engine: Engine, max_batch: int) -> None:
    """Run a full batch and a single image, so the first requests do not pay for allocation and kernel choice."""
    x = np.random.default_rng(0).integers(0, 256, (max_batch, *engine.input_shape), dtype=np.uint8)
    for part in (x, x[:1]):
        rows = engine.begin(part)
        for i in range(engine.num_steps):  # every stage, on every sample
            rows, *_ = engine.step(i, rows)


def app_from_env() -> FastAPI:
    """The app of one uvicorn worker process (``--workers N``): engine and settings from ``$DART_EE_SERVE``."""
    spec = json.loads(os.environ[ENV])
    cfg = ServeConfig(**spec.pop("config"))
    return create_app(lambda: make_engine(**spec, threads=cfg.threads), cfg)


def serve(spec: dict[str, Any], cfg: ServeConfig, engine: Engine | None = None) -> None:
    """Run uvicorn until stopped. ``spec``: ``make_engine``'s arguments (policy, run or export, trust_code);
    ``engine``: one already built (one worker serves it; with several each worker builds its own from spec)."""
    import uvicorn

    common: dict[str, Any] = {"host": cfg.host, "port": cfg.port, "log_level": "warning", "timeout_graceful_shutdown": 30}
    if cfg.workers == 1:
        built = engine or make_engine(**spec, threads=cfg.threads)
        uvicorn.run(create_app(lambda: built, cfg), **common)
        return
    os.environ[ENV] = json.dumps({**spec, "config": cfg.model_dump()})
    uvicorn.run(f"{__name__}:app_from_env", factory=True, workers=cfg.workers, **common)
