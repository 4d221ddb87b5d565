"""Serving: one base model with several named LoRA adapters behind a JSON API (FastAPI) and a small web page."""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from peft import PeftModel
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from transformers import AutoTokenizer

from . import methods, models
from .config import saved_config
from .errors import AdapterConflictError, DataError, LightuneError, ModelError, UnknownAdapterError
from .inference import batched_logits, check_texts, read_run, to_predictions

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def adapter_name_for(run_dir: str | Path) -> str:
    """A default adapter name: the run directory's name with characters peft cannot take replaced by '_'."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(run_dir).resolve().name)[:64]
    return name or "adapter"


@dataclass
class ServedAdapter:
    """One loaded adapter and what predictions through it need: its labels, tokenizer and max_length."""

    name: str
    run_dir: Path
    model: str
    method: str  # the method name (dora+nf4); its two parts follow
    peft: str
    quantize: str  # the base storage the adapter was trained on: none, nf4 or int8
    label_names: list[str]
    max_length: int
    tokenizer: object
    saved: Path

    def info(self) -> dict:
        return {"name": self.name, "run_dir": str(self.run_dir), "model": self.model, "method": self.method,
                "labels": list(self.label_names), "max_length": self.max_length}


class AdapterRegistry:
    """ONE base model in memory with several named adapters of one kind (peft multi-adapter), switched per request.

    Each adapter brings its own classification head (peft's modules_to_save), label names and max_length.
    Adapters are never merged, so switching is cheap. A lock serialises set_adapter + forward and adapter changes.
    """

    def __init__(self, device: str = "auto", batch_size: int = 32):
        self.device = models.resolve_device(device)
        self.batch_size = batch_size
        self.model: PeftModel | None = None
        self.adapters: OrderedDict[str, ServedAdapter] = OrderedDict()
        self.base_model: str | None = None  # the resolved model path or hub id shared by every adapter
        self.quantization: str | None = None  # the served base's storage: none, nf4 or int8
        self.kind: str | None = None  # the peft kind of the served adapters (methods registry): lora, ia3
        self.num_labels: int | None = None
        self._lock = threading.RLock()

    # -- adapters ---------------------------------------------------------------------------------------------
    @property
    def default(self) -> str | None:
        """The adapter used when a request names none: the oldest one still loaded."""
        return next(iter(self.adapters), None)

    def names(self) -> list[str]:
        with self._lock:
            return list(self.adapters)

    def _check_run(self, name: str, run_dir: str | Path) -> ServedAdapter:
        """Read and check a run without touching the model: ModelError for anything that cannot be served."""
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ModelError(f"bad adapter name {name!r}: use 1-64 letters, digits, '_' or '-'")
        run_dir, metrics = read_run(run_dir)
        config = saved_config(metrics["config"])
        method = methods.get(config["peft"])
        saved = run_dir / metrics.get("saved", "adapter")
        if not method.shares_base or not (saved / "adapter_config.json").is_file():
            sharing = ", ".join(m.name for m in methods.REGISTRY.values() if m.shares_base)
            raise ModelError(f"{run_dir} is a {config['method']} run without a LoRA adapter (or other peft adapter); "
                             f"only {sharing} runs can be served together on one base model (use `lightune predict` "
                             f"for it)")
        problem = method.serving_problem(config) if method.serving_problem else None
        if problem:
            raise ModelError(f"{run_dir}: {problem} (use `lightune predict` for it)")
        label_names = list(metrics["data"]["label_names"])
        try:
            tokenizer = AutoTokenizer.from_pretrained(saved)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the tokenizer of {run_dir}: {str(exc).splitlines()[0]}") from None
        return ServedAdapter(name=name, run_dir=run_dir.resolve(), model=config["model"], method=config["method"],
                             peft=config["peft"], quantize=config["quantize"], label_names=label_names,
                             max_length=int(metrics["max_length"]), tokenizer=tokenizer, saved=saved)

    def _check_compatible(self, adapter: ServedAdapter) -> None:
        if adapter.name in self.adapters:
            raise AdapterConflictError(f"an adapter named {adapter.name!r} is already loaded")
        if self.model is None:
            return
        base = models.resolve_model_path(adapter.model)
        if base != self.base_model:
            raise ModelError(f"{adapter.run_dir} was trained on {adapter.model!r}, but the served base model is "
                             f"{self.base_model!r}; all served adapters must share one base model")
        if adapter.quantize != self.quantization:
            raise ModelError(f"{adapter.run_dir} is a {adapter.method} run (base quantization {adapter.quantize}), but "
                             f"the served base has quantization {self.quantization}; serve runs on the same base "
                             f"storage together")
        kind = methods.get(adapter.peft).kind
        if kind != self.kind:
            raise ModelError(f"{adapter.run_dir} is a run of kind {kind} ({adapter.method}), but the served adapters "
                             f"are of kind {self.kind}; peft puts adapters of one kind on a shared base")
        if len(adapter.label_names) != self.num_labels:
            raise ModelError(f"{adapter.run_dir} has {len(adapter.label_names)} labels, but the served adapters have "
                             f"{self.num_labels}; all served adapters need the same number of labels")

    def add(self, name: str, run_dir: str | Path) -> ServedAdapter:
        """Load a finished adapter run under a name (the first one also loads the base model)."""
        adapter = self._check_run(name, run_dir)
        saved = adapter.saved
        with self._lock:
            self._check_compatible(adapter)
            try:
                if self.model is None:
                    base = models.load_base_on_device(adapter.model, adapter.label_names, adapter.quantize, self.device)
                    self.model = PeftModel.from_pretrained(base, saved, adapter_name=name).eval()
                    self.base_model = models.resolve_model_path(adapter.model)
                    self.quantization = adapter.quantize
                    self.kind = methods.get(adapter.peft).kind
                    self.num_labels = len(adapter.label_names)
                else:
                    self.model.load_adapter(saved, adapter_name=name)
                    self.model.eval()
            except (OSError, ValueError, RuntimeError, KeyError) as exc:
                if self.model is not None and name in self.model.peft_config:
                    self.model.delete_adapter(name)
                raise ModelError(f"cannot load adapter from {saved}: {str(exc).splitlines()[0]}") from None
            self.adapters[name] = adapter
            return adapter

    def remove(self, name: str) -> None:
        """Unload an adapter; the last one cannot be removed (the server would have nothing to serve)."""
        with self._lock:
            self._get(name)
            if len(self.adapters) == 1:
                raise AdapterConflictError(f"{name!r} is the only adapter loaded; add another before removing it")
            self.model.delete_adapter(name)
            del self.adapters[name]

    def _get(self, name: str | None) -> ServedAdapter:
        name = self.default if name is None else name
        if name not in self.adapters:
            raise UnknownAdapterError(f"unknown adapter {name!r}; loaded: {', '.join(self.adapters) or 'none'}")
        return self.adapters[name]

    # -- prediction -------------------------------------------------------------------------------------------
    def logits(self, texts: list[str], adapter: str | None = None) -> tuple[ServedAdapter, torch.Tensor]:
        """Logits through one adapter (default: the oldest loaded), in input order."""
        texts = check_texts(texts)
        with self._lock:
            served = self._get(adapter)
            self.model.set_adapter(served.name, inference_mode=True)
            out = batched_logits(self.model, served.tokenizer, texts, served.max_length, len(served.label_names),
                                 self.batch_size, self.device)
        return served, out

    def predict(self, texts: list[str], adapter: str | None = None) -> tuple[ServedAdapter, list[dict]]:
        """(the adapter used, [{text, label, probabilities}] in input order), like Classifier.predict."""
        texts = check_texts(texts)
        if not texts:
            return self._get(adapter), []
        served, logits = self.logits(texts, adapter)
        return served, to_predictions(texts, logits, served.label_names)


# -- the HTTP API ---------------------------------------------------------------------------------------------

@dataclass
class Limits:
    """Per-request limits; anything beyond them is a 4xx with a message, never a crash."""

    max_texts: int = 64
    max_chars: int = 5000
    max_body_bytes: int = 1_000_000


class PredictRequest(BaseModel):
    texts: list[str] = Field(description="texts to classify, in order", examples=[["A wonderful, moving film."]])
    adapter: str | None = Field(default=None, description="adapter name (default: the first one loaded)")


class Prediction(BaseModel):
    text: str
    label: str = Field(description="the most probable label")
    probabilities: dict[str, float] = Field(description="probability of every label")


class PredictResponse(BaseModel):
    adapter: str
    labels: list[str]
    predictions: list[Prediction]


class AdapterInfo(BaseModel):
    name: str
    run_dir: str
    model: str
    method: str
    labels: list[str]
    max_length: int


class AdapterList(BaseModel):
    default: str | None = Field(description="the adapter used when a request names none")
    adapters: list[AdapterInfo]


class AddAdapterRequest(BaseModel):
    name: str | None = Field(default=None, description="adapter name (default: the run directory's name)")
    run_dir: str = Field(description="a finished adapter run directory on the server (lora, qlora, dora, ia3, ...)")


class Health(BaseModel):
    status: str
    base_model: str | None
    device: str
    adapters: int


class ErrorResponse(BaseModel):
    detail: str


ERRORS = {code: {"model": ErrorResponse} for code in (400, 404, 409, 413, 422)}


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body too large: the limit is {limit} bytes")


class BodySizeLimit:
    """ASGI middleware: 413 for a body over the limit, by Content-Length or while it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status, detail = (413, BodyTooLarge(self.max_bytes).detail) if length.isdigit() else \
                (400, "bad Content-Length header")
            return await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


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


def create_app(registry: AdapterRegistry, limits: Limits | None = None) -> FastAPI:
    """The FastAPI app: / (web page), /predict, /adapters, /health, and the OpenAPI schema at /openapi.json."""
    limits = limits or Limits()
    app = FastAPI(title="lightune", version="0.1.0",
                  description="Fine-tuned text classifiers: several LoRA adapters on one base model.")
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    app.state.registry, app.state.limits = registry, limits

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
                                (LightuneError, 400)):
        app.add_exception_handler(error_class, _detail_response(status))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # the server stays up; the client gets one line
        first = str(exc).splitlines()[0] if str(exc) else ""
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {first}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return index_html()

    @app.get("/health", response_model=Health, summary="Liveness and what is loaded")
    def health() -> dict:
        return {"status": "ok", "base_model": registry.base_model, "device": str(registry.device),
                "adapters": len(registry.names())}

    @app.get("/adapters", response_model=AdapterList, summary="The loaded adapters")
    def list_adapters() -> dict:
        with registry._lock:
            return {"default": registry.default, "adapters": [a.info() for a in registry.adapters.values()]}

    @app.post("/adapters", response_model=AdapterInfo, status_code=201, responses=ERRORS,
              summary="Load a finished run's adapter onto the shared base model")
    def add_adapter(body: AddAdapterRequest) -> dict:
        return registry.add(body.name or adapter_name_for(body.run_dir), body.run_dir).info()

    @app.delete("/adapters/{name}", response_model=AdapterList, responses=ERRORS, summary="Unload an adapter")
    def delete_adapter(name: str) -> dict:
        registry.remove(name)
        return list_adapters()

    @app.post("/predict", response_model=PredictResponse, responses=ERRORS,
              summary="Classify texts with one adapter (length-sorted batches)")
    def predict(body: PredictRequest) -> dict:
        texts = body.texts
        if not texts:
            raise DataError("texts is empty: give at least one text")
        if len(texts) > limits.max_texts:
            raise DataError(f"too many texts: {len(texts)}, the limit is {limits.max_texts} per request")
        for i, text in enumerate(texts, 1):
            if len(text) > limits.max_chars:
                raise DataError(f"text {i} is too long: {len(text)} characters, the limit is {limits.max_chars}")
        served, predictions = registry.predict(texts, body.adapter)
        return {"adapter": served.name, "labels": served.label_names, "predictions": predictions}

    return app
