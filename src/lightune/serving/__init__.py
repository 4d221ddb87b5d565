"""Serving: one base model with several named adapters behind a JSON API (FastAPI) and a small web page.

Concurrent requests are batched: a worker thread runs the requests waiting together, rows of different LoRA
adapters in one forward pass (peft's per-row `adapter_names`).

registry.py holds the adapters and runs the forward passes, batching.py queues requests and batches them,
access.py decides who may use the server, metrics.py counts for Prometheus, files.py bounds what adding a run reads
and names it to clients, app.py is the FastAPI app."""

from .access import OPEN_PATHS, Access, AccessDenied, AdapterRoot, BearerKey, is_loopback, key_matches, trusted_hosts
from .app import (ERRORS, AddAdapterRequest, AdapterInfo, AdapterList, BodySizeLimit, BodyTooLarge, ErrorResponse,
                  GracefulServer, Health, Limits, PredictRequest, Prediction, PredictResponse, UnexpectedErrors,
                  create_app, index_html)
from .batching import Batching, BatchingWorker, PredictionQueue, ServerBusy
from .metrics import RequestCounter, ServerMetrics
from .registry import MIXED_BATCH_HEADS, NAME_PATTERN, AdapterRegistry, Encoded, ServedAdapter, adapter_name_for, \
    padding_key

__all__ = [
    "OPEN_PATHS", "Access", "AccessDenied", "AdapterRoot", "BearerKey", "is_loopback", "key_matches", "trusted_hosts",
    "ERRORS", "AddAdapterRequest", "AdapterInfo", "AdapterList", "BodySizeLimit", "BodyTooLarge", "ErrorResponse",
    "GracefulServer", "Health", "Limits", "PredictRequest", "Prediction", "PredictResponse", "UnexpectedErrors",
    "create_app", "index_html",
    "Batching", "BatchingWorker", "PredictionQueue", "ServerBusy",
    "RequestCounter", "ServerMetrics",
    "MIXED_BATCH_HEADS", "NAME_PATTERN", "AdapterRegistry", "Encoded", "ServedAdapter", "adapter_name_for",
    "padding_key",
]
