"""The HTTP API: request and response models, the middlewares (body size, unexpected errors), the server that
stops gracefully, and create_app with its routes: / (web page), /predict, /adapters, /health, /metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Annotated

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import AfterValidator, BaseModel, Field
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from ..errors import AdapterConflictError, DataError, LightuneError, UnknownAdapterError
from ..inference import to_predictions
from .access import Access, AccessDenied, AdapterRoot, BearerKey, key_matches
from .batching import Batching, BatchingWorker, PredictionQueue, ServerBusy
from .metrics import RequestCounter, ServerMetrics
from .registry import AdapterRegistry, _first_line

log = logging.getLogger("lightune.serve")


@dataclass
class Limits:
    """Per-request limits; anything beyond them is a 4xx (or a 503 for a full queue) with a message, never a crash."""

    max_texts: int = 64
    max_chars: int = 5000
    max_body_bytes: int = 1_000_000
    max_queue: int = 32  # prediction requests admitted at once, running or waiting for the model
    body_timeout_s: float = 30.0  # the most time a client may take to send a request's body (408 after it)


def _valid_unicode(text: str) -> str:
    """JSON can carry lone surrogates ("\\ud800"); tokenizers and UTF-8 responses cannot: refuse them up front."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError("unicode", "not valid Unicode: a lone surrogate at character {position}",
                                  {"position": exc.start + 1}) from None
    return text


def _no_nul(text: str) -> str:
    if "\x00" in text:
        raise PydanticCustomError("nul", "contains a NUL character")
    return text


# every string a client sends goes through one of these
UnicodeStr = Annotated[str, AfterValidator(_valid_unicode)]
PathStr = Annotated[UnicodeStr, AfterValidator(_no_nul)]


class PredictRequest(BaseModel):
    texts: list[UnicodeStr] = Field(description="texts to classify, in order",
                                    examples=[["A wonderful, moving film."]])
    adapter: UnicodeStr | None = Field(default=None, description="adapter name (default: the first one loaded)")


class Prediction(BaseModel):
    text: str
    label: str | None = Field(default=None, description="the most probable label (single-label runs)")
    labels: list[str] | None = Field(default=None, description="the labels whose probability reaches their "
                                                               "threshold (multi-label runs)")
    probabilities: dict[str, float] = Field(description="probability of every label (multi-label: each label's "
                                                        "own sigmoid)")


class PredictResponse(BaseModel):
    adapter: str
    labels: list[str]
    predictions: list[Prediction]


class AdapterInfo(BaseModel):
    name: str
    run_dir: str = Field(description="the run directory's name (its path on the server is in the server's log)")
    model: str = Field(description="the base model: its hub id, or a local directory's name")
    method: str
    labels: list[str]
    max_length: int


class AdapterList(BaseModel):
    default: str | None = Field(description="the adapter used when a request names none")
    adapters: list[AdapterInfo]


class AddAdapterRequest(BaseModel):
    name: UnicodeStr | None = Field(default=None, description="adapter name (default: the run directory's name)")
    run_dir: PathStr = Field(description="a finished adapter run directory on the server (lora, qlora, dora, ia3, ...)")


class Health(BaseModel):
    status: str
    base_model: str | None = Field(default=None, description="its hub id, or a local directory's name (with an API "
                                                             "key set: only for requests with it)")
    device: str | None = None
    adapters: int | None = None


class ErrorResponse(BaseModel):
    detail: str


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 422, 500, 503)}


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body too large: the limit is {limit} bytes")


class BodyTimeout(HTTPException):
    def __init__(self, seconds: float):
        # the rest of the body may still come: the connection cannot carry another request
        super().__init__(408, f"request body not received within {seconds:g} s", headers={"Connection": "close"})


class BodySizeLimit:
    """ASGI middleware: 413 for a body over the limit, by Content-Length or while it streams in; 408 for a body that
    does not arrive within timeout_s (a client that stalls mid-body would otherwise hold its request, and a
    shutdown waiting for it, forever)."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 30.0):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status, detail = (413, BodyTooLarge(self.max_bytes).detail) if length.isdigit() else \
                (400, "bad Content-Length header")
            return await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
        received, complete = 0, False
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def limited_receive():
            nonlocal received, complete
            if complete:  # after the body only http.disconnect comes, whenever the client leaves: no time limit
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.timeout_s) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


class UnexpectedErrors:
    """ASGI middleware: an exception that no handler turns into a 4xx (a bug) is a one-line 500.

    The traceback goes to the server's log, not to the client, and the keep-alive connection stays open
    (starlette's own 500 handler re-raises, and uvicorn then drops the connection). A request that a shutdown
    cancels (GracefulServer's timeout) is a 503."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when the graceful shutdown times out (--shutdown-timeout);
            # answer them (it would log each as an "Exception in ASGI application" traceback and answer 500)
            if started:
                raise
            log.warning("shutting down: %s %s cancelled, not answered in time", scope.get("method"), scope.get("path"))
            await JSONResponse({"detail": "the server is shutting down: the request was not answered in time"},
                               status_code=503, headers={"Connection": "close"})(scope, receive, send)
        except Exception as exc:
            if started:  # too late for a clean answer: let the server close the connection
                raise
            log.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            detail = f"internal error: {type(exc).__name__}" + (f": {_first_line(exc)}" if str(exc).strip() else "")
            await JSONResponse({"detail": detail.encode("utf-8", "backslashreplace").decode("utf-8")},
                               status_code=500)(scope, receive, send)


class GracefulServer(uvicorn.Server):
    """uvicorn's server; on SIGTERM or Ctrl-C it stops accepting connections, answers the requests in flight (the
    batching worker runs until the app shuts down, after them) and returns, so `lightune serve` exits 0: a stop
    that was asked for. Requests still running after the config's timeout_graceful_shutdown are cancelled (503),
    so a client that stalls cannot hold the server. uvicorn (0.29+) raises the signal again once it has shut
    down, which would end the process with SIGTERM's status or a KeyboardInterrupt instead. A second Ctrl-C quits
    at once (uvicorn's force exit)."""

    @contextmanager
    def capture_signals(self):
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()  # handled by shutting down: nothing to raise again


def _readable(errors) -> str:
    """Pydantic validation errors as one line: 'texts.2: Input should be a valid string; ...'."""
    parts = []
    for error in errors:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg", "invalid"))
    return "; ".join(parts) or "invalid request"


def index_html() -> str:
    return resources.files("lightune").joinpath("static/index.html").read_text(encoding="utf-8")


def _detail_response(status: int):
    """An exception handler answering {"detail": <the error's message>} with the given HTTP status."""
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status)

    return handler


def create_app(registry: AdapterRegistry, limits: Limits | None = None, access: Access | None = None,
               batching: Batching | None = None) -> FastAPI:
    """The FastAPI app: / (web page), /predict, /adapters, /health, and the OpenAPI schema at /openapi.json."""
    limits, access, batching = limits or Limits(), access or Access(), batching or Batching()
    admission = PredictionQueue(limits.max_queue)
    metrics = ServerMetrics(registry, admission)
    worker = BatchingWorker(registry, batching.wait_ms / 1000) if batching.enabled else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        # uvicorn shuts the app down after the requests in flight are answered: the worker has nothing left to do
        if worker is not None:
            await run_in_threadpool(worker.close)

    app = FastAPI(title="lightune", version="0.1.0", lifespan=lifespan,
                  description="Fine-tuned text classifiers: several adapters on one base model.")
    # each middleware added wraps the ones before it: the Host check runs first, errors are caught innermost
    app.add_middleware(UnexpectedErrors)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s)
    if access.api_key is not None:
        app.add_middleware(BearerKey, key=access.api_key)
    app.add_middleware(RequestCounter, metrics=metrics, routes=app.router.routes)
    if access.allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=access.allowed_hosts, www_redirect=False)
    app.state.registry, app.state.limits, app.state.queue, app.state.worker = registry, limits, admission, worker

    _add_error_handlers(app, metrics)
    _add_page_and_health_routes(app, registry, access)
    _add_adapter_routes(app, registry, access, metrics)
    _add_predict_route(app, registry, limits, admission, worker, metrics)
    _add_metrics_route(app, metrics)
    return app


def _add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    """Every error a client causes is a 4xx (a full queue: 503) with a one-line {"detail": ...}."""
    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            error = next(e for e in errors if e.get("type") == "json_invalid")
            position = next((p for p in error.get("loc", ())[1:] if isinstance(p, int)), None)
            detail = f"malformed JSON: {(error.get('ctx') or {}).get('error', 'cannot parse the body')}"
            detail += f" at position {position}" if position is not None else ""
            return JSONResponse({"detail": detail}, status_code=400)
        return JSONResponse({"detail": _readable(errors)}, status_code=422)

    # the most specific class wins (starlette looks handlers up along the exception's MRO)
    for error_class, status in ((UnknownAdapterError, 404), (AdapterConflictError, 409), (DataError, 422),
                                (AccessDenied, 403), (LightuneError, 400)):
        app.add_exception_handler(error_class, _detail_response(status))

    @app.exception_handler(ServerBusy)
    async def busy(request: Request, exc: ServerBusy):
        metrics.rejected.inc()
        return JSONResponse({"detail": str(exc)}, status_code=503,
                            headers={"Retry-After": str(ServerBusy.retry_after_s)})


def _add_page_and_health_routes(app: FastAPI, registry: AdapterRegistry, access: Access) -> None:
    """/ (the web page) and /health."""
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return index_html()

    @app.get("/health", response_model=Health, response_model_exclude_none=True,
             summary="Liveness and what is loaded")
    async def health(request: Request) -> dict:
        # async and without the model lock: answers at once while predictions queue (a liveness probe must not
        # wait for them, nor for a free worker thread)
        if access.api_key is not None and not key_matches(request.headers, access.api_key):
            return {"status": "ok"}
        return {"status": "ok", "base_model": registry.base_model_name, "device": str(registry.device),
                "adapters": len(registry.adapters)}


def _add_adapter_routes(app: FastAPI, registry: AdapterRegistry, access: Access, metrics: ServerMetrics) -> None:
    """GET /adapters, and POST and DELETE /adapters (only with run-time loading from access.adapter_root)."""
    @app.get("/adapters", response_model=AdapterList, summary="The loaded adapters")
    def list_adapters() -> dict:
        with registry._table:
            return {"default": registry.default, "adapters": [a.info() for a in registry.adapters.values()]}

    @app.post("/adapters", response_model=AdapterInfo, status_code=201, responses=ERRORS,
              summary="Load a finished run's adapter onto the shared base model")
    def add_adapter(body: AddAdapterRequest) -> dict:
        return loading_root().add(registry, body.name, body.run_dir).info()

    @app.delete("/adapters/{name}", response_model=AdapterList, responses=ERRORS, summary="Unload an adapter")
    def delete_adapter(name: str) -> dict:
        loading_root()
        registry.remove(name)
        metrics.forget(name)
        return list_adapters()

    def loading_root() -> AdapterRoot:
        if access.adapter_root is None:
            raise AccessDenied("run-time adapter loading is off: start the server with --allow-adapter-loading ROOT")
        return access.adapter_root


def _add_predict_route(app: FastAPI, registry: AdapterRegistry, limits: Limits, admission: PredictionQueue,
                       worker: BatchingWorker | None, metrics: ServerMetrics) -> None:
    """POST /predict: through the batching worker, or (batching off) one request at a time."""
    @app.post("/predict", response_model=PredictResponse, responses=ERRORS, response_model_exclude_none=True,
              summary="Classify texts with one adapter (batched with concurrent requests)")
    async def predict(body: PredictRequest) -> dict:
        start = time.perf_counter()
        texts = body.texts
        if not texts:
            raise DataError("texts is empty: give at least one text")
        if len(texts) > limits.max_texts:
            raise DataError(f"too many texts: {len(texts)}, the limit is {limits.max_texts} per request")
        for i, text in enumerate(texts, 1):
            if len(text) > limits.max_chars:
                raise DataError(f"text {i} is too long: {len(text)} characters, the limit is {limits.max_chars}")
        with admission.slot():  # admitted here, in the event loop, before waiting for a thread or the model
            if worker is None:
                served, predictions = await run_in_threadpool(registry.predict, texts, body.adapter)
            else:
                request = await run_in_threadpool(registry.encode, texts, body.adapter)
                logits = await asyncio.wrap_future(worker.submit(request))
                served, predictions = request.adapter, to_predictions(texts, logits, request.adapter.label_names,
                                                                         request.adapter.thresholds,
                                                                         request.adapter.temperature)
        metrics.predictions.labels(served.name).inc()
        metrics.texts.labels(served.name).inc(len(texts))
        metrics.latency.labels(served.name).observe(time.perf_counter() - start)
        return {"adapter": served.name, "labels": served.label_names, "predictions": predictions}


def _add_metrics_route(app: FastAPI, metrics: ServerMetrics) -> None:
    """/metrics in Prometheus' text format."""
    @app.get("/metrics", response_class=Response, summary="Prometheus metrics: requests, latency, queue, adapters")
    def prometheus_metrics() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)
