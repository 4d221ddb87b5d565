"""Serving: one base model with several named adapters behind a JSON API (FastAPI) and a small web page.

Concurrent requests are batched: a worker thread runs the requests waiting together, rows of different LoRA
adapters in one forward pass (peft's per-row `adapter_names`)."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import hashlib
import hmac
import ipaddress
import logging
import queue
import re
import threading
import time
from collections import OrderedDict, defaultdict
from concurrent.futures import Future
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Annotated

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from peft import PeftModel
from peft.utils.other import ModulesToSaveWrapper
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import AfterValidator, BaseModel, Field
from pydantic_core import PydanticCustomError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware
from transformers import AutoTokenizer

from . import heads, methods, models, quantization
from .errors import AdapterConflictError, ConfigError, DataError, LightuneError, ModelError, UnknownAdapterError
from .forward import (check_texts, clean_text, encode_texts, eval_chunk_tokens, forward_logits, pad_multiple,
                      resolve_device, texts_logits, token_budget_batches)
from .inference import to_predictions
from .runs import read_run

log = logging.getLogger("lightune.serve")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def adapter_name_for(run_dir: str | Path) -> str:
    """A default adapter name: the run directory's name with characters peft cannot take replaced by '_'."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", Path(run_dir).resolve().name)[:64]
    return name or "adapter"


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its class name when it has none."""
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


def _with_shown_path(message: str, run_dir: Path, shown: str) -> str:
    """The message with the server's path of a run replaced by the name the client gave for it."""
    return message.replace(str(run_dir), shown)


def _tokenizer_key(saved: Path) -> str:
    """A digest of the tokenizer files in an adapter folder (every file but the adapter's own and its README)."""
    digest = hashlib.sha256()
    for file in sorted(saved.iterdir()):
        if file.is_file() and not file.name.startswith("adapter_") and file.name != "README.md":
            digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()


def _release_freed_memory() -> None:
    """Collect an unloaded adapter's objects and hand the freed heap back to the system.

    glibc keeps freed memory for reuse: 50 adapters of all-MiniLM-L6-v2, each with its own tokenizer, took 540 MB;
    after deleting them RSS stayed 450 MB higher without malloc_trim and 66 MB higher with it."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


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
    tokenizer_key: str  # a digest of the tokenizer's files: equal keys share one tokenizer
    saved: Path
    shown: str  # the run directory as errors and /adapters name it
    pooling: str = "cls"  # what the head reads (heads.py); runs from before it was recorded read [CLS]
    mixes: bool = False  # its rows can share a forward pass with other adapters' rows (AdapterRegistry._mixes)
    truncation: str = "head"  # which tokens of a long text are kept (forward.encode_texts)
    kind: str | None = None  # what adapters on one base must share (methods.sharing_kind): lora, ia3, vera r=8 ...
    thresholds: list[float] | None = None  # a multi-label run's threshold per label (to_predictions)

    def info(self) -> dict:
        return {"name": self.name, "run_dir": self.shown, "model": self.model, "method": self.method,
                "labels": list(self.label_names), "max_length": self.max_length}


@dataclass
class Encoded:
    """A prediction request tokenized for its adapter (its tokenizer and max_length), not yet padded."""

    adapter: ServedAdapter
    texts: list[str]
    rows: list[dict]  # per text: input_ids, attention_mask (and token_type_ids) as lists

    @property
    def tokens(self) -> int:
        return sum(len(row["input_ids"]) for row in self.rows)


def padding_key(tokenizer) -> tuple:
    """What padding depends on: rows from tokenizers with equal keys (each row tokenized with its own run's tokenizer
    and max_length; runs' tokenizer files differ by their saved truncation alone) can be padded together."""
    return (tokenizer.pad_token_id, tokenizer.pad_token_type_id, tokenizer.padding_side,
            tuple(tokenizer.model_input_names))


# The layers peft 0.21 can run with per-row adapter_names when they are a copied head (ModulesToSaveWrapper).
MIXED_BATCH_HEADS = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


class AdapterRegistry:
    """ONE base model in memory with several named adapters of one kind (peft multi-adapter), switched per request.

    Each adapter brings its own classification head (peft's modules_to_save), label names and max_length.
    Adapters are never merged, so switching is cheap, and rows of several LoRA adapters can share one forward pass
    (forward_batch). A lock serialises forward passes and adapter changes.
    At most max_adapters are loaded at once; adapters with identical tokenizer files share one tokenizer (about
    10 MB each for a BERT vocabulary, more than the adapter itself).
    """

    def __init__(self, device: str = "auto", batch_size: int = 32, max_adapters: int = 16):
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.max_adapters = max_adapters
        self.model: PeftModel | None = None
        self.adapters: OrderedDict[str, ServedAdapter] = OrderedDict()
        self.base_model: str | None = None  # the resolved model path or hub id shared by every adapter
        self.quantization: str | None = None  # the served base's storage: none, nf4 or int8
        self.kind: str | None = None  # the peft kind of the served adapters (methods registry): lora, ia3
        self.pooling: str | None = None
        self.num_labels: int | None = None
        self._lock = threading.RLock()  # the model: forward passes, set_adapter, loading and unloading adapters
        # the adapters table alone (changed under both locks): a request looks its adapter up without waiting for
        # the forward pass in progress, so requests are tokenized and queued while the model runs
        self._table = threading.Lock()
        # fast tokenizers set their truncation per call and fail ("Already borrowed") when two threads call one
        self._tokenizing = threading.Lock()

    # -- adapters ---------------------------------------------------------------------------------------------
    @property
    def default(self) -> str | None:
        """The adapter used when a request names none: the oldest one still loaded."""
        return next(iter(self.adapters), None)

    def names(self) -> list[str]:
        with self._table:
            return list(self.adapters)

    def check_run(self, name: str, run_dir: str | Path, shown: str | None = None) -> ServedAdapter:
        """Read and check a run without touching the model: ModelError for anything that cannot be served.

        Messages name the run directory as `shown` (default: as given), never by another path."""
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ModelError(f"bad adapter name {name!r}: use 1-64 letters, digits, '_' or '-'")
        shown = shown or str(run_dir)
        try:
            return self._read_adapter(name, Path(run_dir), shown)
        except ModelError as exc:
            raise type(exc)(_with_shown_path(str(exc), Path(run_dir), shown)) from None

    def _read_adapter(self, name: str, run_dir: Path, shown: str) -> ServedAdapter:
        run = read_run(run_dir)  # the one reader: every field checked and resolved there
        method = methods.get(run.peft)
        if not method.shares_base or not run.is_adapter:
            sharing = ", ".join(m.name for m in methods.REGISTRY.values() if m.shares_base)
            raise ModelError(f"{shown} is a {run.method} run without a LoRA adapter (or another shareable peft "
                             f"adapter); only {sharing} runs can be served together on one base model (use "
                             f"`lightune predict` for it)")
        problem = method.serving_problem(run.config) if method.serving_problem else None
        if problem:
            raise ModelError(f"{shown}: {problem} (use `lightune predict` for it)")
        try:
            tokenizer_key = _tokenizer_key(run.saved)
            with self._table:
                tokenizer = next((a.tokenizer for a in self.adapters.values() if a.tokenizer_key == tokenizer_key),
                                 None)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(run.saved)
        except Exception as exc:  # whatever its files hold: the run cannot be served, the server is fine
            raise ModelError(f"cannot load the tokenizer of {shown}: {_first_line(exc)}") from None
        return ServedAdapter(name=name, run_dir=run.run_dir.resolve(), model=run.model, method=run.method,
                             peft=run.peft, quantize=run.quantize, label_names=run.label_names,
                             max_length=run.max_length, tokenizer=tokenizer, tokenizer_key=tokenizer_key,
                             saved=run.saved, shown=shown, pooling=run.pooling, truncation=run.truncation,
                             kind=methods.sharing_kind(run.config), thresholds=run.thresholds)

    def _check_compatible(self, adapter: ServedAdapter) -> None:
        if adapter.name in self.adapters:
            raise AdapterConflictError(f"an adapter named {adapter.name!r} is already loaded")
        if self.model is None:
            self._check_positions(adapter, models.load_model_config(adapter.model))
            return
        try:
            base = models.resolve_model_path(adapter.model)
        except (LightuneError, ValueError, OSError):  # one answer whatever is (not) at that path on the server
            base = None
        if base != self.base_model:  # (the served base is not named: it may be a path of the server)
            raise ModelError(f"{adapter.run_dir} was trained on {adapter.model!r}, not on the served base model; "
                             f"all served adapters must share one base model")
        if adapter.quantize != self.quantization:
            raise ModelError(f"{adapter.run_dir} is a {adapter.method} run (base quantization {adapter.quantize}), but "
                             f"the served base has quantization {self.quantization}; serve runs on the same base "
                             f"storage together")
        kind = adapter.kind
        if kind != self.kind:
            raise ModelError(f"{adapter.run_dir} is a run of kind {kind} ({adapter.method}), but the served adapters "
                             f"are of kind {self.kind}; peft puts adapters of one kind on a shared base")
        if adapter.pooling != self.pooling:
            raise ModelError(f"{adapter.run_dir} reads {adapter.pooling} pooling, but the served adapters read "
                             f"{self.pooling}; adapters on one base must pool the same way")
        if len(adapter.label_names) != self.num_labels:
            raise ModelError(f"{adapter.run_dir} has {len(adapter.label_names)} labels, but the served adapters have "
                             f"{self.num_labels}; all served adapters need the same number of labels")
        self._check_positions(adapter, self.model.config)

    @staticmethod
    def _check_positions(adapter: ServedAdapter, base_config) -> None:
        """max_length must fit the base model's position embeddings, or long texts would fail in the forward."""
        positions = getattr(base_config, "max_position_embeddings", None)
        if positions and adapter.max_length > positions:
            raise ModelError(f"{adapter.run_dir} has max_length {adapter.max_length}, more than the base model's "
                             f"{positions} positions")

    def add(self, name: str, run_dir: str | Path) -> ServedAdapter:
        """Load a finished adapter run under a name (the first one also loads the base model)."""
        adapter = self.check_run(name, run_dir)
        return self.add_checked(replace(adapter, shown=str(adapter.run_dir)))  # the operator's path, in full

    def add_checked(self, adapter: ServedAdapter) -> ServedAdapter:
        """Load an adapter that check_run accepted; if loading fails the served model is left as it was."""
        name, saved = adapter.name, adapter.saved
        with self._lock:
            try:
                self._check_compatible(adapter)
            except ModelError as exc:
                raise type(exc)(_with_shown_path(str(exc), adapter.run_dir, adapter.shown)) from None
            if len(self.adapters) >= self.max_adapters:
                raise AdapterConflictError(f"{len(self.adapters)} adapters are loaded, the most this server holds "
                                           f"(--max-adapters); delete one before adding {adapter.name!r}")
            try:
                if self.model is None:
                    base = models.load_base_on_device(adapter.model, adapter.label_names, adapter.quantize,
                                                      self.device)
                    heads.apply_pooling(base, adapter.pooling)
                    self.model = PeftModel.from_pretrained(base, saved, adapter_name=name).eval()
                    quantization.allow_cpu_inference_layout(self.model)  # serving never trains
                    self.base_model = models.resolve_model_path(adapter.model)
                    self.quantization = adapter.quantize
                    self.kind = adapter.kind
                    self.pooling = adapter.pooling
                    self.num_labels = len(adapter.label_names)
                else:
                    self.model.load_adapter(saved, adapter_name=name)
                    self.model.eval()
                adapter.mixes = self._mixes(name)
            except Exception as exc:  # a truncated or foreign weights file, a head of another shape, ...
                if self.model is not None and name in self.model.peft_config:
                    self.model.delete_adapter(name)
                message = _with_shown_path(_first_line(exc), adapter.run_dir, adapter.shown)
                raise ModelError(f"cannot load the adapter of {adapter.shown}: {message}") from None
            with self._table:
                self.adapters[name] = adapter
            return adapter

    def remove(self, name: str) -> None:
        """Unload an adapter; the last one cannot be removed (the server would have nothing to serve)."""
        with self._lock:
            self._get(name)
            if len(self.adapters) == 1:
                raise AdapterConflictError(f"{name!r} is the only adapter loaded; add another before removing it")
            self.model.delete_adapter(name)
            with self._table:
                del self.adapters[name]
        _release_freed_memory()

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
            out = texts_logits(self.model, served.tokenizer, texts, served.max_length, len(served.label_names),
                               self.batch_size, self.device, truncation=served.truncation)
        return served, out

    def predict(self, texts: list[str], adapter: str | None = None) -> tuple[ServedAdapter, list[dict]]:
        """(the adapter used, [{text, label, probabilities}] in input order), like Classifier.predict."""
        texts = check_texts(texts)
        if not texts:
            return self._get(adapter), []
        served, logits = self.logits(texts, adapter)
        return served, to_predictions(texts, logits, served.label_names, served.thresholds)

    # -- batched prediction: several requests, several adapters, shared forward passes ---------------------------
    def _mixes(self, name: str) -> bool:
        """Whether an adapter's rows can share a forward pass with other adapters' rows (peft's per-row
        adapter_names, peft 0.21): LoRA only (IA3 layers have no mixed forward), not DoRA (peft refuses it), never
        merged (serving never merges), and every head module it copies a single layer: peft's ModulesToSaveWrapper
        mixes Linear, Embedding and Conv layers only, so a [CLS]-pooled BERT head (its pooler is Linear + tanh)
        does not mix, while a mean-pooled head (the classifier Linear alone) does."""
        if self.kind != "lora" or getattr(self.model.peft_config[name], "use_dora", False):
            return False
        return all(isinstance(module.original_module, MIXED_BATCH_HEADS) for module in self.model.modules()
                   if isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save)

    def encode(self, texts: list[str], adapter: str | None = None) -> Encoded:
        """A request's texts tokenized for its adapter (default: the oldest loaded), for forward_batch."""
        texts = check_texts(texts)
        with self._table:
            served = self._get(adapter)
        with self._tokenizing:
            encoded = encode_texts(served.tokenizer, [clean_text(t) for t in texts], served.max_length,
                                   served.truncation)
        return Encoded(served, texts, [{key: encoded[key][i] for key in encoded} for i in range(len(texts))])

    @torch.no_grad()
    def forward_batch(self, requests: list[Encoded]) -> list[torch.Tensor | UnknownAdapterError]:
        """Each request's logits in input order (or UnknownAdapterError if its adapter was unloaded meanwhile).

        The rows of all requests are sorted by length into token-budget passes of at most batch_size texts. Rows of
        adapters that mix (and pad alike) share passes whatever their adapter, each row through its own adapter;
        the others run one adapter per pass, after set_adapter."""
        out: list[torch.Tensor | UnknownAdapterError] = []
        groups = defaultdict(list)  # (mixed or alone, padding or adapter) -> [(request index, row index)]
        with self._lock:
            for r, request in enumerate(requests):
                served = request.adapter
                if self.adapters.get(served.name) is not served:
                    out.append(UnknownAdapterError(f"adapter {served.name!r} was unloaded before the request ran"))
                    continue
                out.append(torch.empty(len(request.rows), self.num_labels))
                key = ("mixed", padding_key(served.tokenizer)) if served.mixes else ("alone", served.name)
                groups[key] += [(r, i) for i in range(len(request.rows))]
            for (how, _), members in groups.items():
                self._forward_rows(requests, members, out, mixed=how == "mixed")
        return out

    def _forward_rows(self, requests: list[Encoded], members: list[tuple[int, int]], out: list, mixed: bool) -> None:
        tokenizer = requests[members[0][0]].adapter.tokenizer  # every member's tokenizer pads alike
        lengths = [len(requests[r].rows[i]["input_ids"]) for r, i in members]
        for idx in token_budget_batches(lengths, eval_chunk_tokens(self.device.type), self.batch_size):
            chosen = [members[k] for k in idx]
            widest = max(requests[r].adapter.max_length for r, _ in chosen)
            batch = tokenizer.pad([requests[r].rows[i] for r, i in chosen], return_tensors="pt",
                                  pad_to_multiple_of=pad_multiple(self.device.type, widest))
            names = [requests[r].adapter.name for r, _ in chosen]
            if mixed:
                logits = forward_logits(self.model, batch, self.device, adapter_names=names)
            else:
                self.model.set_adapter(names[0], inference_mode=True)
                logits = forward_logits(self.model, batch, self.device)
            for (r, i), row in zip(chosen, logits):
                out[r][i] = row


class AccessDenied(LightuneError):
    """A request that the server's access settings refuse (HTTP 403)."""


class AdapterRoot:
    """The one folder whose runs clients may load at run time (`--allow-adapter-loading ROOT`).

    A client names a run relative to it, or by an absolute path inside it. Paths are resolved (symlinks followed)
    before the check, and errors name a run as the client did, never by a path of the server."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        if not self.path.is_dir():
            raise ConfigError(f"--allow-adapter-loading: {path} is not a directory")

    def locate(self, sent: str) -> Path:
        """The run directory a client named; AccessDenied for one outside the root or with links out of it."""
        run_dir = (self.path / sent).resolve()  # an absolute `sent` replaces the root, `..` climbs out of it
        if not run_dir.is_relative_to(self.path):
            raise AccessDenied(f"run_dir {sent!r} is outside the folder runs may be loaded from")
        try:
            self._check_links(run_dir, sent)
        except OSError as exc:
            raise ModelError(f"cannot read run_dir {sent!r}: {exc.strerror or exc}") from None
        return run_dir

    def _check_links(self, run_dir: Path, sent: str) -> None:
        """What loading reads (the run's files and those of its folders) must not link out of the root either."""
        if not run_dir.is_dir():
            return  # check_run says it is missing
        for entry in run_dir.iterdir():
            for path in (entry, *(entry.iterdir() if entry.is_dir() else ())):
                if not path.resolve().is_relative_to(self.path):
                    raise AccessDenied(f"run_dir {sent!r} links outside the folder runs may be loaded from "
                                       f"({path.relative_to(run_dir)})")

    def add(self, registry: AdapterRegistry, name: str | None, sent: str) -> ServedAdapter:
        """Check and load the run a client named, under `name` (default: the run directory's name)."""
        run_dir = self.locate(sent)
        return registry.add_checked(registry.check_run(name or adapter_name_for(run_dir), run_dir, shown=sent))


# -- the HTTP API ---------------------------------------------------------------------------------------------

@dataclass
class Limits:
    """Per-request limits; anything beyond them is a 4xx (or a 503 for a full queue) with a message, never a crash."""

    max_texts: int = 64
    max_chars: int = 5000
    max_body_bytes: int = 1_000_000
    max_queue: int = 32  # prediction requests admitted at once, running or waiting for the model


class ServerBusy(LightuneError):
    """The prediction queue is full (HTTP 503 with Retry-After)."""

    retry_after_s = 1


class PredictionQueue:
    """Admission to the model: at most `size` prediction requests at once, each holding its texts while it waits;
    one more is refused at once with ServerBusy, so a burst never becomes an unbounded climb in memory or latency.
    Used from the event loop only (admission and release happen there), so a plain counter is enough."""

    def __init__(self, size: int):
        self.size = size
        self.depth = 0

    @contextmanager
    def slot(self):
        if self.depth >= self.size:
            raise ServerBusy(f"the server is busy: {self.depth} prediction requests are queued, the most it takes "
                             f"(--max-queue); retry after {ServerBusy.retry_after_s} s")
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1


@dataclass
class Batching:
    """How concurrent prediction requests reach the model."""

    enabled: bool = True  # off: one request at a time, set_adapter and its own forward passes (a naive server)
    wait_ms: float = 2.0  # once a request is taken, how long the worker waits for more to fill the pass


class BatchingWorker:
    """One thread runs every prediction, so concurrent requests share forward passes.

    It takes the first request waiting, then more (for up to wait_s after the first, or at once while they are
    queued) until the texts reach batch_size or the tokens the device's pass budget, runs them through
    registry.forward_batch and hands each request its own logits. Requests that arrive during a pass wait for the
    next one: under load every pass is full, and at low load none waits longer than wait_s."""

    STOP = ("stop",)  # queued by close(): answer what came before it, then end

    def __init__(self, registry: AdapterRegistry, wait_s: float = 0.002):
        self.registry = registry
        self.wait_s = wait_s
        self.max_texts = registry.batch_size
        self.max_tokens = eval_chunk_tokens(registry.device.type)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # (Encoded, Future), or STOP
        self._held = None  # an item taken that did not fit the last pass: the first of the next
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()

    def submit(self, request: Encoded) -> Future:
        """A future of the request's logits (or of the error that ended its pass)."""
        with self._starting:  # started by the first request: apps that never predict hold no thread
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lightune-batching", daemon=True)
                self._thread.start()
        future = Future()
        self._queue.put((request, future))
        return future

    def close(self, timeout: float | None = None) -> None:
        """Answer every request queued so far, then stop the thread."""
        if self._thread is not None:
            self._queue.put(self.STOP)
            self._thread.join(timeout)

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            taken = [(request, future) for request, future in taken if future.set_running_or_notify_cancel()]
            if not taken:  # every client of the pass went away
                continue
            try:
                results = self.registry.forward_batch([request for request, _ in taken])
            except Exception as exc:  # a bug: each request of the pass answers 500, the worker goes on
                results = [exc] * len(taken)
            for (_, future), result in zip(taken, results):
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    def _take(self) -> list | None:
        """The requests of the next pass, or None to stop."""
        first, self._held = self._held or self._queue.get(), None
        if first is self.STOP:
            return None
        taken, texts, tokens = [first], len(first[0].rows), first[0].tokens
        deadline = time.monotonic() + self.wait_s
        while texts < self.max_texts and tokens < self.max_tokens:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is self.STOP or texts + len(item[0].rows) > self.max_texts \
                    or tokens + item[0].tokens > self.max_tokens:
                self._held = item
                break
            taken.append(item)
            texts, tokens = texts + len(item[0].rows), tokens + item[0].tokens
        return taken


class ServerMetrics:
    """Prometheus metrics of one app, in a registry of its own (several apps in one process do not clash)."""

    def __init__(self, registry: AdapterRegistry, queue: PredictionQueue):
        self.collector = CollectorRegistry()
        self.requests = Counter("lightune_http_requests", "HTTP requests answered, by route, method and status",
                                ["route", "method", "status"], registry=self.collector)
        self.predictions = Counter("lightune_predictions", "prediction requests answered, by adapter", ["adapter"],
                                   registry=self.collector)
        self.texts = Counter("lightune_texts", "texts classified, by adapter", ["adapter"], registry=self.collector)
        self.latency = Histogram("lightune_prediction_seconds", "time to answer a prediction request, waiting in "
                                 "the queue included, by adapter", ["adapter"], registry=self.collector,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.rejected = Counter("lightune_queue_full", "prediction requests refused with 503: the queue was full",
                                registry=self.collector)
        Gauge("lightune_queue_depth", "prediction requests admitted: running or waiting for the model",
              registry=self.collector).set_function(lambda: queue.depth)
        Gauge("lightune_queue_size", "the most prediction requests admitted at once (--max-queue)",
              registry=self.collector).set(queue.size)
        Gauge("lightune_adapters_loaded", "adapters loaded on the base model",
              registry=self.collector).set_function(lambda: len(registry.adapters))

    def forget(self, adapter: str) -> None:
        """Drop an unloaded adapter's series: names that come and go must not pile up."""
        for metric in (self.predictions, self.texts, self.latency):
            try:
                metric.remove(adapter)
            except KeyError:  # it never answered a request
                pass

    def text(self) -> bytes:
        return generate_latest(self.collector)


HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


class RequestCounter:
    """ASGI middleware: counts every answered request in lightune_http_requests_total by its route's path
    template (/adapters/{name}, not the name itself: the label set stays small) and status."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":  # labels from small sets only: no series per client
                route = getattr(scope.get("route"), "path", "other")
                method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
                self.metrics.requests.labels(route, method, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


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


LOOPBACK_NAMES = ["localhost", "127.0.0.1", "[::1]"]


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def trusted_hosts(bind_host: str, extra: list[str] | None = None) -> list[str] | None:
    """The Host header values to answer (None: any).

    On a loopback address only loopback names, any port, plus `extra`: a web page elsewhere cannot reach the server
    through DNS rebinding (its requests carry the page's own host name). Elsewhere `extra`, or any host."""
    extra = list(extra or [])
    for pattern in extra:
        if "*" in pattern[1:] or (pattern.startswith("*") and pattern != "*" and not pattern.startswith("*.")):
            raise ConfigError(f"bad allowed host {pattern!r}: give a host name, '*.example.com' or '*'")
    if not is_loopback(bind_host):
        return extra or None
    own = f"[{bind_host.strip('[]')}]" if ":" in bind_host else bind_host.lower()
    return list(dict.fromkeys(LOOPBACK_NAMES + [own] + extra))


@dataclass
class Access:
    """Who may use the server, and what clients may load."""

    allowed_hosts: list[str] | None = None  # Host header values answered, as trusted_hosts gives them; None: any
    api_key: str | None = None  # needed as `Authorization: Bearer <key>` everywhere but OPEN_PATHS; None: open
    adapter_root: AdapterRoot | None = None  # POST and DELETE /adapters load from there only; None: refused


OPEN_PATHS = {"/", "/health"}  # the page (it asks for the key) and the liveness probe


def key_matches(headers: Headers, key: str) -> bool:
    """True when the request carries `Authorization: Bearer <key>` (compared in constant time)."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    sent = hashlib.sha256(token.strip().encode("latin-1")).digest()  # digests: equal lengths, nothing to time
    return scheme.lower() == "bearer" and hmac.compare_digest(sent, hashlib.sha256(key.encode()).digest())


class BearerKey:
    """ASGI middleware: 401 with `WWW-Authenticate: Bearer` for a request to a closed path without the API key."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key

    async def __call__(self, scope, receive, send):
        headers = Headers(scope=scope)
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or key_matches(headers, self.key):
            return await self.app(scope, receive, send)
        detail = "wrong API key" if "authorization" in headers else \
            "this server needs an API key: send the header 'Authorization: Bearer <key>'"
        await JSONResponse({"detail": detail}, status_code=401,
                           headers={"WWW-Authenticate": 'Bearer realm="lightune"'})(scope, receive, send)


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
    run_dir: str
    model: str
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
    base_model: str | None = Field(default=None, description="(with an API key set: only for requests with it)")
    device: str | None = None
    adapters: int | None = None


class ErrorResponse(BaseModel):
    detail: str


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 422, 500, 503)}


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


class UnexpectedErrors:
    """ASGI middleware: an exception that no handler turns into a 4xx (a bug) is a one-line 500.

    The traceback goes to the server's log, not to the client, and the keep-alive connection stays open
    (starlette's own 500 handler re-raises, and uvicorn then drops the connection)."""

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
    that was asked for. uvicorn (0.29+) raises the signal again once it has shut down, which would end the process
    with SIGTERM's status or a KeyboardInterrupt instead. A second Ctrl-C quits at once (uvicorn's force exit)."""

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
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    if access.api_key is not None:
        app.add_middleware(BearerKey, key=access.api_key)
    app.add_middleware(RequestCounter, metrics=metrics)
    if access.allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=access.allowed_hosts, www_redirect=False)
    app.state.registry, app.state.limits, app.state.queue, app.state.worker = registry, limits, admission, worker

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
        return {"status": "ok", "base_model": registry.base_model, "device": str(registry.device),
                "adapters": len(registry.adapters)}

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
                                                                         request.adapter.thresholds)
        metrics.predictions.labels(served.name).inc()
        metrics.texts.labels(served.name).inc(len(texts))
        metrics.latency.labels(served.name).observe(time.perf_counter() - start)
        return {"adapter": served.name, "labels": served.label_names, "predictions": predictions}

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics: requests, latency, queue, adapters")
    def prometheus_metrics() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    return app
