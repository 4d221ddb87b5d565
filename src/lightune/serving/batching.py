"""Batching: admission to the model (a bounded queue, 503 when full) and the worker thread that runs concurrent
prediction requests in shared forward passes."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import LightuneError
from ..forward import eval_chunk_tokens
from .registry import AdapterRegistry, Encoded


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
