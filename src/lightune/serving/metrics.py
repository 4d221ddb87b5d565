"""Prometheus metrics of the HTTP app, and the middleware that counts every answered request."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .batching import PredictionQueue
from .registry import AdapterRegistry


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
    template (/adapters/{name}, not the name itself: the label set stays small) and status.

    Requests answered before routing (401 without the API key, 413, a bad Host) are counted under the route their
    path matches among `routes` (the app's), not as "other"."""

    def __init__(self, app, metrics: ServerMetrics, routes: list | None = None):
        self.app = app
        self.metrics = metrics
        self.routes = routes if routes is not None else []  # the app's list: routes added later are in it

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":  # labels from small sets only: no series per client
                route = getattr(scope.get("route") or self._route(scope), "path", "other")
                method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
                self.metrics.requests.labels(route, method, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)

    def _route(self, scope):
        """The route whose path matches the request's (any method), or None."""
        from starlette.routing import Match

        return next((route for route in self.routes if route.matches(scope)[0] != Match.NONE), None)
