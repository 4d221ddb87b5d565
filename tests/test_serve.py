"""`lightune serve`: several adapters on one base model behind the JSON API, the web page in a real browser."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import synthetic_reviews, write_csv
from test_cli import assert_one_line_error, run_cli

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lightune.errors import AdapterConflictError, ConfigError, ModelError, UnknownAdapterError  # noqa: E402
from lightune.inference import Classifier  # noqa: E402
from lightune.serving import (  # noqa: E402
    Access, AdapterRegistry, AdapterRoot, Batching, BatchingWorker, Limits, adapter_name_for, create_app,
    trusted_hosts)

TEXTS = ["great superb film loved", "awful boring mess hated", "brilliant wonderful story",
         "waste dull terrible movie"]
LIMITS = Limits(max_texts=4, max_chars=200, max_body_bytes=2000)


def train_tiny_run(tiny_model_dir, root: Path, name: str, rows: list[tuple[str, str]], **overrides) -> Path:
    """A finished run of the tiny base on the given (text, label) rows; its run directory."""
    from lightune.config import load_config
    from lightune.training import run_training

    data = write_csv(root / f"{name}.csv", rows)
    settings = dict(model=str(tiny_model_dir), data=str(data), train_size=None, eval_size=None, max_length=32,
                    epochs=5, batch_size=16, learning_rate=1e-2, output_dir=str(root / "runs"), run_name=name)
    return run_training(load_config(overrides={**settings, **overrides}), progress=False).run_dir


def flip(rows, labels=("pos", "neg")):
    """The rows with swapped labels, named `labels` (for pos, for neg)."""
    return [(text, labels[1] if label == "pos" else labels[0]) for text, label in rows]


@pytest.fixture(scope="module")
def flipped_run(tiny_model_dir, tmp_path_factory):
    """A second LoRA run of the same tiny base, trained on swapped labels: it must disagree with the first."""
    return train_tiny_run(tiny_model_dir, tmp_path_factory.mktemp("flipped-run"), "flipped",
                          flip(synthetic_reviews(240, seed=1)))


@pytest.fixture(scope="module")
def registry(trained_tiny_run, flipped_run):
    reg = AdapterRegistry(device="cpu", batch_size=3)
    reg.add("good", trained_tiny_run.run_dir)
    reg.add("flipped", flipped_run)
    return reg


@pytest.fixture(scope="module")
def client(registry):
    return TestClient(create_app(registry, LIMITS))


@pytest.fixture(scope="module")
def loading(tmp_path_factory) -> Access:
    """Run-time adapter loading from the folder that holds every run the tests train."""
    return Access(adapter_root=AdapterRoot(tmp_path_factory.getbasetemp()))


@pytest.fixture
def fresh_client(trained_tiny_run, loading):
    """A server with one adapter, for tests that add and remove adapters."""
    reg = AdapterRegistry(device="cpu")
    reg.add("good", trained_tiny_run.run_dir)
    return TestClient(create_app(reg, LIMITS, loading))


def labels_of(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [p["label"] for p in response.json()["predictions"]]


# -- predictions -------------------------------------------------------------------------------------------------

def test_predict_with_the_default_adapter(client):
    response = client.post("/predict", json={"texts": TEXTS})
    body = response.json()
    assert labels_of(response) == ["pos", "neg", "pos", "neg"]
    assert body["adapter"] == "good" and body["labels"] == ["neg", "pos"]
    for text, p in zip(TEXTS, body["predictions"]):
        assert p["text"] == text
        assert sum(p["probabilities"].values()) == pytest.approx(1.0)
        assert p["probabilities"][p["label"]] >= 0.5


def test_predict_with_a_named_adapter_switches_lora_and_head(client):
    flipped = client.post("/predict", json={"texts": TEXTS, "adapter": "flipped"})
    assert labels_of(flipped) == ["neg", "pos", "neg", "pos"]
    # and back: switching does not leave the other adapter's weights or head active
    assert labels_of(client.post("/predict", json={"texts": TEXTS, "adapter": "good"})) == ["pos", "neg", "pos", "neg"]


def test_served_probabilities_equal_the_classifier(registry, trained_tiny_run, flipped_run):
    texts = TEXTS + [t for t, _ in synthetic_reviews(9, seed=7)]
    good = trained_tiny_run.run_dir
    for name, run_dir in (("good", good), ("flipped", flipped_run), ("good", good)):  # switch there and back
        expected = Classifier(run_dir, device="cpu", merge=False).predict(texts)
        served, got = registry.predict(texts, name)
        assert served.name == name
        assert [p["label"] for p in got] == [p["label"] for p in expected]
        for g, e in zip(got, expected):
            for label in ("neg", "pos"):
                assert g["probabilities"][label] == pytest.approx(e["probabilities"][label], abs=1e-5)


def test_two_adapters_on_one_base_give_different_predictions(registry):
    _, good = registry.logits(TEXTS, "good")
    _, flipped = registry.logits(TEXTS, "flipped")
    assert not torch.allclose(good, flipped, atol=1e-3)
    assert (good.argmax(-1) != flipped.argmax(-1)).all()
    # one base model: the two adapters share every backbone weight
    assert set(registry.model.peft_config) == {"good", "flipped"}


def test_concurrent_requests_on_both_adapters(registry):
    expected = {name: registry.predict(TEXTS, name)[1] for name in ("good", "flipped")}
    jobs = ["good", "flipped"] * 6
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda name: registry.predict(TEXTS, name)[1], jobs))
    for name, got in zip(jobs, results):
        assert [p["label"] for p in got] == [p["label"] for p in expected[name]]


# -- batching: requests of several adapters in shared forward passes ---------------------------------------------

@pytest.fixture(scope="module")
def mean_runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Mean-pooled runs, whose heads are a Linear that peft can run per row: LoRA on the synthetic reviews
    (max_length 32), LoRA on swapped labels named yes/no with max_length 8 (long texts truncated differently),
    and DoRA (which peft does not mix)."""
    root = tmp_path_factory.mktemp("mean-runs")
    reviews = synthetic_reviews(240, seed=3)
    return {"a": train_tiny_run(tiny_model_dir, root, "a", reviews, pooling="mean", max_steps=30),
            "b": train_tiny_run(tiny_model_dir, root, "b", flip(reviews, ("yes", "no")), pooling="mean",
                                max_steps=30, max_length=8),
            "d": train_tiny_run(tiny_model_dir, root, "d", reviews, pooling="mean", max_steps=5, peft="dora")}


@pytest.fixture(scope="module")
def mean_registry(mean_runs):
    reg = AdapterRegistry(device="cpu", batch_size=4)
    for name, run in mean_runs.items():
        reg.add(name, run)
    return reg


def forward_calls(model, monkeypatch) -> list[dict]:
    """Record the keyword arguments of every forward pass of a peft model."""
    calls, real_forward = [], model.forward

    def recording_forward(*args, **kwargs):
        calls.append(kwargs)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", recording_forward)
    return calls


MIXED_TEXTS = TEXTS + [t for t, _ in synthetic_reviews(9, seed=7)] + ["great " * 40 + "awful"]


def test_a_mixed_batch_equals_each_adapter_alone(mean_registry, mean_runs, monkeypatch):
    reg = mean_registry
    assert [a.mixes for a in reg.adapters.values()] == [True, True, False]  # DoRA: one adapter per pass
    calls = forward_calls(reg.model, monkeypatch)
    small = [reg.encode(["great film", "awful boring mess hated"], "a"),
             reg.encode(["brilliant story", "waste dull terrible movie"], "b")]
    mixture = [reg.encode(MIXED_TEXTS[:6], "a"), reg.encode(MIXED_TEXTS[2:], "b"), reg.encode(MIXED_TEXTS[5:], "d"),
               reg.encode(MIXED_TEXTS[::-1], "a"), reg.encode(MIXED_TEXTS[:1], "b")]
    got = reg.forward_batch(small) + reg.forward_batch(mixture)
    assert calls[0]["adapter_names"] == ["a", "b", "a", "b"]  # 4 rows (batch_size), sorted by length, one pass
    assert any("adapter_names" not in c for c in calls)  # DoRA rows: after set_adapter
    monkeypatch.undo()
    for request, logits in zip(small + mixture, got):
        alone = Classifier(mean_runs[request.adapter.name], device="cpu", merge=False).logits(request.texts)
        torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)


def test_a_batch_of_cls_pooled_adapters_runs_one_adapter_per_pass(registry, trained_tiny_run, flipped_run):
    # BERT's [CLS] pooler is a Linear + tanh block, which peft cannot run per row: grouped by adapter instead
    assert [a.mixes for a in registry.adapters.values()] == [False, False]
    requests = [registry.encode(MIXED_TEXTS, "flipped"), registry.encode(TEXTS, "good"),
                registry.encode(MIXED_TEXTS[3:], "flipped")]
    got = registry.forward_batch(requests)
    runs = {"good": trained_tiny_run.run_dir, "flipped": flipped_run}
    for request, logits in zip(requests, got):
        alone = Classifier(runs[request.adapter.name], device="cpu", merge=False).logits(request.texts)
        torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)


def test_the_worker_answers_each_request_with_its_own_results(mean_registry, monkeypatch):
    reg = mean_registry
    passes = []
    real_forward_batch = reg.forward_batch
    monkeypatch.setattr(reg, "forward_batch", lambda requests: passes.append(len(requests)) or
                        real_forward_batch(requests))
    worker = BatchingWorker(reg, wait_s=0.5)  # long enough for the requests below to queue during the first pass
    jobs = [("a", MIXED_TEXTS[:2]), ("b", MIXED_TEXTS[2:3]), ("a", MIXED_TEXTS[3:4]), ("b", MIXED_TEXTS[4:6])]
    try:
        futures = [worker.submit(reg.encode(texts, name)) for name, texts in jobs]
        results = [future.result(30) for future in futures]
    finally:
        worker.close(10)
    assert passes == [3, 1]  # a pass takes at most batch_size (4) texts; the last request waits for the next
    for (name, texts), logits in zip(jobs, results):
        torch.testing.assert_close(logits, reg.logits(texts, name)[1], rtol=1e-5, atol=1e-5)


def test_concurrent_requests_of_two_adapters_each_get_their_own_answer(mean_registry):
    client = TestClient(create_app(mean_registry, Limits(max_queue=64)))
    jobs = [(name, MIXED_TEXTS[i % 7:i % 7 + 1 + i % 4]) for i, name in enumerate(["a", "b"] * 12)]
    expected = {(name, tuple(texts)): mean_registry.predict(texts, name)[1] for name, texts in jobs}
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda job: client.post("/predict", json={"texts": job[1], "adapter": job[0]}),
                                  jobs))
    for (name, texts), response in zip(jobs, responses):
        body = response.json()
        assert response.status_code == 200 and body["adapter"] == name
        assert body["labels"] == mean_registry.adapters[name].label_names
        assert [p["text"] for p in body["predictions"]] == texts
        for got, want in zip(body["predictions"], expected[(name, tuple(texts))]):
            assert got["label"] == want["label"]
            assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-5)


def test_a_request_for_an_adapter_unloaded_while_it_waited_is_404(mean_registry, mean_runs):
    reg = AdapterRegistry(device="cpu")
    reg.add("a", mean_runs["a"])
    reg.add("b", mean_runs["b"])
    waiting = reg.encode(TEXTS, "b")
    reg.remove("b")
    stale, fresh = reg.forward_batch([waiting, reg.encode(TEXTS, "a")])
    assert isinstance(stale, UnknownAdapterError) and str(stale) == "adapter 'b' was unloaded before the request ran"
    torch.testing.assert_close(fresh, reg.logits(TEXTS, "a")[1])


# -- bad input: 4xx with a clear message, the server keeps serving ------------------------------------------------

def test_unknown_adapter_is_404(client):
    response = client.post("/predict", json={"texts": ["great"], "adapter": "nope"})
    assert response.status_code == 404
    assert response.json()["detail"] == "unknown adapter 'nope'; loaded: good, flipped"


@pytest.mark.parametrize("content, message", [
    ('{"texts": ["great"', "malformed JSON: Expecting ',' delimiter at position 18"),
    ("not json", "malformed JSON: Expecting value at position 0"),
    ('{"texts": ["a"],}', "malformed JSON: Expecting property name enclosed in double quotes at position 16"),
])
def test_malformed_json_is_400(client, content, message):
    response = client.post("/predict", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["detail"] == message


@pytest.mark.parametrize("body, message", [
    ({"texts": []}, "texts is empty: give at least one text"),
    ({"texts": ["great", ""]}, "text 2 is empty"),
    ({"texts": ["great", "   "]}, "text 2 is empty"),
    ({"texts": ["great"] * 5}, "too many texts: 5, the limit is 4 per request"),
    ({"texts": ["great", "x" * 201]}, "text 2 is too long: 201 characters, the limit is 200"),
    ({"texts": "great film"}, "texts: Input should be a valid list"),
    ({"texts": ["great", 3]}, "texts.1: Input should be a valid string"),
    ({"text": ["great"]}, "texts: Field required"),
    (["great"], "Input should be a valid dictionary"),
    ({"texts": ["great"], "adapter": 5}, "adapter: Input should be a valid string"),
])
def test_bad_requests_are_4xx_with_a_clear_message(client, body, message):
    response = client.post("/predict", json=body)
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


def test_oversized_body_is_413(client):
    big = json.dumps({"texts": ["great " * 100] * 4})
    assert len(big) > LIMITS.max_body_bytes
    response = client.post("/predict", content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["detail"] == "request body too large: the limit is 2000 bytes"

    def chunks():  # no Content-Length: counted while it streams in
        for _ in range(10):
            yield b" " * 500

    response = client.post("/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert client.get("/health").status_code == 200


# -- back-pressure and metrics ----------------------------------------------------------------------------------

@contextmanager
def model_held(registry):
    """While the block runs, predictions (batched or one request at a time) wait inside the model lock; yields an
    event set once one waits there."""
    held, release = threading.Event(), threading.Event()

    def holding(real):
        def slow(*args):
            with registry._lock:
                held.set()
                release.wait(30)
                return real(*args)
        return slow

    registry.logits, registry.forward_batch = holding(registry.logits), holding(registry.forward_batch)
    try:
        yield held
    finally:
        release.set()
        del registry.logits, registry.forward_batch


def wait_until(condition, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.parametrize("batching", [Batching(), Batching(enabled=False)], ids=["batched", "one-at-a-time"])
def test_a_full_queue_is_503_with_retry_after(registry, batching):
    app = create_app(registry, Limits(max_queue=2), batching=batching)
    client = TestClient(app)
    with ThreadPoolExecutor(2) as pool:
        with model_held(registry):
            admitted = [pool.submit(client.post, "/predict", json={"texts": TEXTS}) for _ in range(2)]
            wait_until(lambda: app.state.queue.depth == 2)
            refused = client.post("/predict", json={"texts": TEXTS})
            assert client.get("/health").status_code == 200  # the probe is not queued
        assert (refused.status_code, refused.headers["Retry-After"]) == (503, "1")
        assert refused.json()["detail"] == ("the server is busy: 2 prediction requests are queued, the most it "
                                            "takes (--max-queue); retry after 1 s")
        assert [labels_of(r.result(30)) for r in admitted] == [["pos", "neg", "pos", "neg"]] * 2
    assert app.state.queue.depth == 0
    assert labels_of(client.post("/predict", json={"texts": TEXTS})) == ["pos", "neg", "pos", "neg"]


def test_metrics_in_prometheus_text_format(registry):
    from prometheus_client.parser import text_string_to_metric_families

    client = TestClient(create_app(registry, LIMITS))
    client.post("/predict", json={"texts": TEXTS})
    client.post("/predict", json={"texts": TEXTS[:1], "adapter": "flipped"})
    client.post("/predict", json={"texts": TEXTS[:1], "adapter": "nope"})
    client.request("FOO", "/predict")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    parsed = [s for family in text_string_to_metric_families(response.text) for s in family.samples]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in parsed}
    requests = {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value for s in parsed
                if s.name == "lightune_http_requests_total"}
    assert samples[("lightune_predictions_total", (("adapter", "good"),))] == 1
    assert samples[("lightune_texts_total", (("adapter", "good"),))] == 4
    assert samples[("lightune_texts_total", (("adapter", "flipped"),))] == 1
    assert samples[("lightune_prediction_seconds_count", (("adapter", "flipped"),))] == 1
    assert samples[("lightune_prediction_seconds_bucket", (("adapter", "good"), ("le", "+Inf")))] == 1
    assert requests[("POST", "/predict", "200")] == 2 and requests[("POST", "/predict", "404")] == 1
    assert requests[("other", "/predict", "405")] == 1  # label values from small sets only
    assert samples[("lightune_queue_depth", ())] == 0 and samples[("lightune_queue_size", ())] == 32
    assert samples[("lightune_adapters_loaded", ())] == 2


# -- adapters, health, schema ------------------------------------------------------------------------------------

def test_list_adapters_and_health(client, trained_tiny_run):
    body = client.get("/adapters").json()
    assert body["default"] == "good"
    assert [a["name"] for a in body["adapters"]] == ["good", "flipped"]
    good = body["adapters"][0]
    assert good["labels"] == ["neg", "pos"] and good["method"] == "lora" and good["max_length"] == 32
    assert good["run_dir"] == str(trained_tiny_run.run_dir.resolve())
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["adapters"] == 2 and health["device"] == "cpu"


def test_health_answers_while_a_slow_prediction_holds_the_model_lock(client, registry):
    with ThreadPoolExecutor(3) as pool:
        with model_held(registry) as held:
            slow = pool.submit(client.post, "/predict", json={"texts": TEXTS})
            assert held.wait(10)
            queued = pool.submit(client.post, "/predict", json={"texts": TEXTS})  # waits for the lock
            health = pool.submit(client.get, "/health").result(timeout=10)  # a lock-taking /health times out
        assert health.status_code == 200 and health.json()["adapters"] == 2
        assert labels_of(slow.result(30)) == labels_of(queued.result(30)) == ["pos", "neg", "pos", "neg"]


def test_add_and_delete_adapters_at_run_time(fresh_client, flipped_run):
    assert labels_of(fresh_client.post("/predict", json={"texts": TEXTS})) == ["pos", "neg", "pos", "neg"]
    added = fresh_client.post("/adapters", json={"run_dir": str(flipped_run)})
    assert added.status_code == 201, added.text
    assert added.json()["name"] == adapter_name_for(flipped_run) == "flipped"
    assert labels_of(fresh_client.post("/predict", json={"texts": TEXTS, "adapter": "flipped"})) == [
        "neg", "pos", "neg", "pos"]

    again = fresh_client.post("/adapters", json={"name": "flipped", "run_dir": str(flipped_run)})
    assert again.status_code == 409 and "already loaded" in again.json()["detail"]
    missing = fresh_client.post("/adapters", json={"name": "x", "run_dir": "no/such/run"})
    assert missing.status_code == 400 and missing.json()["detail"] == "run directory not found: no/such/run"
    bad_name = fresh_client.post("/adapters", json={"name": "a.b", "run_dir": str(flipped_run)})
    assert bad_name.status_code == 400 and "bad adapter name" in bad_name.json()["detail"]

    assert 'adapter="good"' in fresh_client.get("/metrics").text
    deleted = fresh_client.delete("/adapters/good")
    assert deleted.status_code == 200
    assert 'adapter="good"' not in fresh_client.get("/metrics").text  # no series of unloaded adapters pile up
    assert deleted.json()["default"] == "flipped" and [a["name"] for a in deleted.json()["adapters"]] == ["flipped"]
    assert fresh_client.post("/predict", json={"texts": TEXTS, "adapter": "good"}).status_code == 404
    assert labels_of(fresh_client.post("/predict", json={"texts": TEXTS})) == ["neg", "pos", "neg", "pos"]
    assert fresh_client.delete("/adapters/nope").status_code == 404


def test_deleting_the_last_adapter_is_refused(fresh_client):
    response = fresh_client.delete("/adapters/good")
    assert response.status_code == 409
    assert response.json()["detail"] == "'good' is the only adapter loaded; add another before removing it"
    assert labels_of(fresh_client.post("/predict", json={"texts": TEXTS})) == ["pos", "neg", "pos", "neg"]


def test_adapters_are_bounded_by_max_adapters(trained_tiny_run, flipped_run, loading):
    reg = AdapterRegistry(device="cpu", max_adapters=2)
    reg.add("good", trained_tiny_run.run_dir)
    client = TestClient(create_app(reg, LIMITS, loading))
    assert client.post("/adapters", json={"name": "second", "run_dir": str(flipped_run)}).status_code == 201
    refused = client.post("/adapters", json={"name": "third", "run_dir": str(flipped_run)})
    assert refused.status_code == 409
    assert refused.json()["detail"] == ("2 adapters are loaded, the most this server holds (--max-adapters); "
                                        "delete one before adding 'third'")
    assert set(reg.model.peft_config) == {"good", "second"}
    assert client.delete("/adapters/second").status_code == 200
    assert client.post("/adapters", json={"name": "third", "run_dir": str(flipped_run)}).status_code == 201


def test_a_removed_adapter_leaves_nothing_behind(trained_tiny_run):
    import gc
    import weakref

    reg = AdapterRegistry(device="cpu")
    reg.add("good", trained_tiny_run.run_dir)
    reg.add("copy", trained_tiny_run.run_dir)
    # one tokenizer for runs with the same tokenizer files (it weighs more than a LoRA adapter)
    assert reg.adapters["copy"].tokenizer is reg.adapters["good"].tokenizer
    tensors = [weakref.ref(p) for n, p in reg.model.named_parameters() if ".copy." in n]
    assert len(tensors) > 4  # LoRA A and B of each target, and the copied head
    reg.remove("copy")
    gc.collect()
    assert all(ref() is None for ref in tensors)
    assert not [n for n, _ in reg.model.named_modules() if n.endswith(".copy")]
    assert set(reg.model.peft_config) == {"good"}


def test_openapi_schema_lists_the_api(client):
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/adapters", "/adapters/{name}", "/health"} <= set(schema["paths"])
    assert {"post", "get"} <= set(schema["paths"]["/adapters"])
    assert {"PredictRequest", "PredictResponse", "AdapterList", "ErrorResponse"} <= set(schema["components"]["schemas"])
    assert "413" in schema["paths"]["/predict"]["post"]["responses"]


def test_a_loopback_server_answers_loopback_host_names_only(registry):
    """DNS rebinding: a page on evil.example that resolves its name to 127.0.0.1 sends `Host: evil.example`."""
    app = create_app(registry, LIMITS, Access(allowed_hosts=trusted_hosts("127.0.0.1", ["lightune.example"])))
    client = TestClient(app, base_url="http://127.0.0.1:8000")
    for host in ("127.0.0.1:8000", "localhost", "LOCALHOST:1", "[::1]:9", "lightune.example:8000"):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example", ""):
        response = client.post("/predict", json={"texts": ["great"]}, headers={"Host": host})
        assert (response.status_code, response.text) == (400, "Invalid host header"), host


def test_trusted_hosts():
    assert trusted_hosts("::1") == trusted_hosts("localhost") == ["localhost", "127.0.0.1", "[::1]"]
    assert trusted_hosts("127.0.0.2", ["*.corp.example"]) == ["localhost", "127.0.0.1", "[::1]", "127.0.0.2",
                                                              "*.corp.example"]
    assert trusted_hosts("0.0.0.0") is None and trusted_hosts("192.0.2.1", ["a.example"]) == ["a.example"]
    with pytest.raises(ConfigError, match="bad allowed host 'a.\\*.example'"):
        trusted_hosts("127.0.0.1", ["a.*.example"])


def test_web_page_is_served(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert 'id="classify"' in response.text and "/predict" in response.text


# -- access control: API key, run-time loading only from one folder ----------------------------------------------

KEY = "s3cret-Key_0123456789"


def test_run_time_adapter_loading_is_off_by_default(client, flipped_run):
    for response in (client.post("/adapters", json={"run_dir": str(flipped_run)}), client.delete("/adapters/good")):
        assert response.status_code == 403
        assert response.json()["detail"] == ("run-time adapter loading is off: start the server with "
                                             "--allow-adapter-loading ROOT")
    assert client.get("/adapters").json()["default"] == "good"


@pytest.fixture
def runs_root(trained_tiny_run, tmp_path) -> Path:
    """ROOT with one good run, and ways out: a symlinked run, a run with a linked weights file or metrics.json."""
    root = tmp_path / "root"
    run, outside = trained_tiny_run.run_dir, tmp_path / "outside"
    shutil.copytree(run, root / "ok")
    (root / "escape").symlink_to(run, target_is_directory=True)
    shutil.copytree(run, outside)
    for name, linked in (("weights", "adapter/adapter_model.safetensors"), ("metrics", "metrics.json")):
        shutil.copytree(run, root / name)
        (root / name / linked).unlink()
        (root / name / linked).symlink_to(outside / linked)
    shutil.copytree(run, root / "pickled")
    (root / "pickled/adapter/adapter_model.safetensors").rename(root / "pickled/adapter/adapter_model.bin")
    _edited_copy(run, root / "otherbase", model="prajjwal1/bert-tiny")
    _edited_copy(run, root / "nulbase", model="/a\x00b")
    return root


def test_run_time_loading_stays_inside_the_root(trained_tiny_run, runs_root, tmp_path, tiny_model_dir):
    reg = AdapterRegistry(device="cpu")
    reg.add("good", trained_tiny_run.run_dir)
    client = TestClient(create_app(reg, LIMITS, Access(adapter_root=AdapterRoot(runs_root))))
    refused = {
        "../outside": "run_dir '../outside' is outside the folder runs may be loaded from",
        "ok/../../outside": "run_dir 'ok/../../outside' is outside the folder runs may be loaded from",
        str(trained_tiny_run.run_dir): f"run_dir '{trained_tiny_run.run_dir}' is outside the folder",
        "/etc": "run_dir '/etc' is outside the folder runs may be loaded from",
        "escape": "run_dir 'escape' is outside the folder runs may be loaded from",
        "weights": "run_dir 'weights' links outside the folder runs may be loaded from "
                   "(adapter/adapter_model.safetensors)",
        "metrics": "run_dir 'metrics' links outside the folder runs may be loaded from (metrics.json)",
    }
    for sent, message in refused.items():
        response = client.post("/adapters", json={"name": "x", "run_dir": sent})
        assert response.status_code == 403 and response.json()["detail"].startswith(message), (sent, response.text)
    pickled = client.post("/adapters", json={"run_dir": "pickled"})
    assert (pickled.status_code, pickled.json()["detail"]) == (400, (
        "pickled has its adapter weights as adapter_model.bin, a pickle, which is never loaded here; save them as "
        "adapter_model.safetensors"))
    missing = client.post("/adapters", json={"run_dir": "ok/nope"})
    assert (missing.status_code, missing.json()["detail"]) == (400, "run directory not found: ok/nope")
    other_bases = []
    for name, model in (("otherbase", "'prajjwal1/bert-tiny'"), ("nulbase", "'/a\\x00b'")):
        other_bases.append(client.post("/adapters", json={"run_dir": name}))
        assert (other_bases[-1].status_code, other_bases[-1].json()["detail"]) == (400, (
            f"{name} was trained on {model}, not on the served base model; all served adapters must share one "
            "base model"))
    for response in (*(client.post("/adapters", json={"run_dir": s}) for s in refused), pickled, missing,
                     *other_bases):
        assert str(tmp_path) not in response.text and str(tiny_model_dir) not in response.text  # no server path
    assert reg.names() == ["good"]

    added = client.post("/adapters", json={"run_dir": str(runs_root / "ok")})  # absolute, inside: fine
    assert (added.status_code, added.json()["name"], added.json()["run_dir"]) == (201, "ok", str(runs_root / "ok"))
    added = client.post("/adapters", json={"name": "again", "run_dir": "./ok/"})
    assert (added.status_code, added.json()["run_dir"]) == (201, "./ok/")
    assert client.delete("/adapters/again").status_code == 200


def test_an_api_key_closes_every_endpoint_but_the_page_and_health(registry):
    client = TestClient(create_app(registry, LIMITS, Access(api_key=KEY)))
    calls = [("GET", "/adapters", None), ("POST", "/predict", {"texts": ["great"]}),
             ("POST", "/adapters", {"run_dir": "x"}), ("DELETE", "/adapters/good", None),
             ("GET", "/openapi.json", None), ("GET", "/docs", None), ("GET", "/metrics", None),
             ("GET", "/no-such-page", None)]
    for method, path, body in calls:
        for auth, detail in ((None, "this server needs an API key: send the header 'Authorization: Bearer <key>'"),
                             (f"Bearer {KEY}x", "wrong API key"), (f"Bearer {KEY[:-1]}", "wrong API key"),
                             (f"Basic {KEY}", "wrong API key"), (KEY, "wrong API key")):
            response = client.request(method, path, json=body, headers={"Authorization": auth} if auth else {})
            assert (response.status_code, response.json()["detail"]) == (401, detail), (method, path, auth)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
    authorized = {"Authorization": f"bearer  {KEY} "}
    assert labels_of(client.post("/predict", json={"texts": TEXTS}, headers=authorized)) == ["pos", "neg", "pos", "neg"]
    assert client.get("/openapi.json", headers=authorized).status_code == 200
    assert client.delete("/adapters/good", headers=authorized).status_code == 403  # the key does not open loading
    assert client.get("/").status_code == 200
    assert client.get("/health").json() == {"status": "ok"}  # what is served: only with the key
    assert client.get("/health", headers=authorized).json()["adapters"] == 2


# -- runs that cannot share the base -----------------------------------------------------------------------------

def _edited_copy(run_dir: Path, dest: Path, **config) -> Path:
    shutil.copytree(run_dir, dest)
    metrics = json.loads((dest / "metrics.json").read_text())
    metrics["config"].update(config)
    (dest / "metrics.json").write_text(json.dumps(metrics))
    return dest


@pytest.mark.parametrize("edit, message", [
    (dict(model="prajjwal1/bert-tiny"), "all served adapters must share one base model"),
    (dict(method="qlora"), "served base has quantization none"),
    (dict(method="full"), "is a full run without a LoRA adapter"),
    (dict(method="head"), "is a head run without a LoRA adapter"),
    (dict(method="ia3"), "is a run of kind ia3 \\(ia3\\), but the served adapters are of kind lora"),
    (dict(init="pissa"), "init 'pissa' rewrote the base weights under its adapter"),
], ids=["other-base", "qlora", "full", "head", "ia3", "pissa"])
def test_runs_that_cannot_share_the_base_are_refused(registry, trained_tiny_run, tmp_path, edit, message):
    with pytest.raises(ModelError, match=message):
        registry.add("other", _edited_copy(trained_tiny_run.run_dir, tmp_path / "other", **edit))
    with pytest.raises(UnknownAdapterError):
        registry.predict(["great"], "other")
    assert registry.names() == ["good", "flipped"]


def test_a_name_in_use_is_refused(registry, trained_tiny_run):
    with pytest.raises(AdapterConflictError, match="already loaded"):
        registry.add("good", trained_tiny_run.run_dir)
    assert registry.names() == ["good", "flipped"]


def test_cli_bad_run_dir_is_one_line():
    assert_one_line_error(run_cli("serve", "no-such-run"), "run directory not found: no-such-run")


@pytest.mark.parametrize("args, message", [
    (["RUN", "RUN"], "adapter names must be unique, got lora, lora; use --name"),
    (["RUN", "--name", "a", "--name", "b"], "--name was given 2 time(s) for 1 run directories"),
    (["RUN", "--port", "0"], "--port must be between 1 and 65535, got 0"),
    (["RUN", "--max-texts", "0"], "--max-texts must be >= 1, got 0"),
    (["RUN", "--max-adapters", "0"], "--max-adapters must be >= 1, got 0"),
    (["RUN", "--batch-wait-ms", "-1"], "--batch-wait-ms must be between 0 and 1000, got -1"),
    (["RUN", "RUN", "--name", "a", "--name", "b", "--max-adapters", "1"],
     "2 run directories but --max-adapters is 1"),
])
def test_cli_bad_serve_arguments(trained_tiny_run, capsys, args, message):
    from lightune.cli import main

    assert main(["serve", *[str(trained_tiny_run.run_dir) if a == "RUN" else a for a in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightune: error: ") and message in err and "\n" not in err


def serve_in_process(monkeypatch, *args: str) -> tuple[int, dict]:
    """`lightune serve ARGS` up to the point where uvicorn would start: (exit status, what it would serve)."""
    import uvicorn

    from lightune.cli import main

    served = {}

    def run(server, sockets):
        served.update(app=server.config.app, address=sockets[0].getsockname())

    monkeypatch.setattr(uvicorn.Server, "run", run)
    return main(["serve", *args]), served


def test_cli_serves_on_a_socket_bound_before_loading(trained_tiny_run, monkeypatch, capsys):
    port = free_port()
    code, served = serve_in_process(monkeypatch, str(trained_tiny_run.run_dir), "--port", str(port), "--name", "good")
    assert code == 0 and served["address"] == ("127.0.0.1", port)
    client = TestClient(served["app"], base_url=f"http://127.0.0.1:{port}")
    assert labels_of(client.post("/predict", json={"texts": TEXTS})) == ["pos", "neg", "pos", "neg"]
    assert client.get("/health", headers={"Host": "evil.example"}).status_code == 400
    assert "serving good on " in capsys.readouterr().err


def test_cli_port_in_use_fails_before_loading_anything(trained_tiny_run, monkeypatch, capsys):
    from lightune import cli
    from lightune.commands import serve as serve_command

    loads = []
    monkeypatch.setattr(serve_command, "build_registry", lambda *args: loads.append(args))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", str(trained_tiny_run.run_dir), "--port", str(port)]) == 2
    assert capsys.readouterr().err == (f"lightune: error: cannot listen on 127.0.0.1:{port}: the port is in use; "
                                       "stop the other server or choose another --port\n")
    assert loads == []


def test_cli_api_key_from_the_environment_and_a_warning_off_loopback(trained_tiny_run, monkeypatch, capsys):
    monkeypatch.setenv("LIGHTUNE_API_KEY", KEY)
    code, served = serve_in_process(monkeypatch, str(trained_tiny_run.run_dir), "--port", str(free_port()))
    assert code == 0 and "warning" not in capsys.readouterr().err
    client = TestClient(served["app"], base_url="http://localhost")
    assert client.get("/adapters").status_code == 401
    assert client.get("/adapters", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200

    monkeypatch.delenv("LIGHTUNE_API_KEY")
    code, served = serve_in_process(monkeypatch, str(trained_tiny_run.run_dir), "--host", "0.0.0.0",
                                    "--port", str(free_port()))
    lines = capsys.readouterr().err.splitlines()
    assert code == 0 and lines[0] == ("lightune: warning: serving on 0.0.0.0 without an API key: anyone who can "
                                      "reach this port can use the server; set LIGHTUNE_API_KEY")
    assert TestClient(served["app"], base_url="http://192.0.2.7").get("/adapters").status_code == 200


def test_cli_adapter_loading_root(trained_tiny_run, flipped_run, monkeypatch):
    args = [str(trained_tiny_run.run_dir), "--port", str(free_port())]
    code, served = serve_in_process(monkeypatch, *args, "--allow-adapter-loading", str(flipped_run.parent))
    client = TestClient(served["app"], base_url="http://localhost")
    assert client.post("/adapters", json={"run_dir": "flipped"}).status_code == 201
    assert client.post("/adapters", json={"run_dir": str(trained_tiny_run.run_dir)}).status_code == 403


@pytest.mark.parametrize("args, message", [
    (["--api-key", "two words"], "the API key must be printable ASCII without spaces"),
    (["--api-key", ""], "the API key must be printable ASCII without spaces"),
    (["--allow-adapter-loading", "no-such-dir"], "--allow-adapter-loading: no-such-dir is not a directory"),
    (["--allowed-hosts", "a.*.example"], "bad allowed host 'a.*.example'"),
])
def test_cli_bad_access_arguments(trained_tiny_run, monkeypatch, capsys, args, message):
    code, served = serve_in_process(monkeypatch, str(trained_tiny_run.run_dir), "--port", str(free_port()), *args)
    err = capsys.readouterr().err
    assert (code, served) == (2, {}) and err.startswith(f"lightune: error: {message}") and err.count("\n") == 1


def test_cli_batching_off_serves_one_request_at_a_time(trained_tiny_run, monkeypatch):
    code, served = serve_in_process(monkeypatch, str(trained_tiny_run.run_dir), "--port", str(free_port()),
                                    "--batching", "off")
    assert code == 0 and served["app"].state.worker is None
    client = TestClient(served["app"], base_url="http://localhost")
    assert labels_of(client.post("/predict", json={"texts": TEXTS})) == ["pos", "neg", "pos", "neg"]


def start_server(*args: str) -> tuple[subprocess.Popen, int]:
    """`python -m lightune serve ARGS` on a free port of 127.0.0.1, once /health answers."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "lightune", "serve", *args, "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError(f"the server did not start: {process.communicate()[1][-2000:]}")


def test_sigterm_answers_the_request_in_flight_then_exits_0(trained_tiny_run):
    process, port = start_server(str(trained_tiny_run.run_dir))
    try:
        body = json.dumps({"texts": TEXTS}).encode()
        head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
            conn.sendall(head + body[:10])  # in flight: the server has its head and waits for the rest
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(ConnectionRefusedError):  # shutting down: no new connections
                socket.create_connection(("127.0.0.1", port), timeout=5)
            conn.sendall(body[10:])
            response = http.client.HTTPResponse(conn)
            response.begin()
            answer = json.loads(response.read())
        assert response.status == 200 and [p["label"] for p in answer["predictions"]] == ["pos", "neg", "pos", "neg"]
        assert process.wait(60) == 0
    finally:
        process.kill()
    err = process.communicate()[1]
    assert "Waiting for connections to close" in err and "Traceback" not in err


# -- the real server and the page in headless Chromium ----------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """uvicorn serving the app on 127.0.0.1 in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def headless_chromium(user_data_dir: str):
    """A selenium driver for Debian's chromium; pytest.skip when it, chromium-driver or selenium is missing."""
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1000,760", f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def classify_in_page(driver, url: str, text: str, adapter: str | None = None, timeout: float = 20):
    """Load the page, type a review, pick an adapter, click Classify; the first result's label."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#adapter option"))
    if adapter:
        Select(driver.find_element(By.ID, "adapter")).select_by_value(adapter)
    box = driver.find_element(By.ID, "texts")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "classify").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#results .result .label")))
    return driver.find_element(By.CSS_SELECTOR, "#results .result .label").text


def test_page_in_headless_chromium_against_the_real_server(registry):
    with tempfile.TemporaryDirectory() as profile, LiveServer(create_app(registry)) as server:
        driver = headless_chromium(profile)
        try:
            assert classify_in_page(driver, server.url, "great superb film loved it") == "pos"
            assert classify_in_page(driver, server.url, "great superb film loved it", adapter="flipped") == "neg"
            from selenium.webdriver.common.by import By

            bars = driver.find_elements(By.CSS_SELECTOR, "#results .result .bar-row")
            assert [b.text.split("\n")[0] for b in bars] == ["neg", "pos"]
        finally:
            driver.quit()


# -- hostile input against the real server: one-line 4xx, the keep-alive connection kept ---------------------------

@pytest.fixture(scope="module")
def live(registry, loading):
    with LiveServer(create_app(registry, LIMITS, loading)) as server:
        yield server


class KeptConnection:
    """One HTTP/1.1 connection to a live server; every request must be answered over the same socket."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.sock = None

    def request(self, method: str, path: str, body: str | None = None, headers: dict | None = None):
        """(status, headers, body text); fails if the server dropped or announced closing the connection."""
        self.conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = self.conn.getresponse()
        text = response.read().decode()
        assert not response.will_close, f"the server closes the connection after {method} {path}"
        self.sock = self.sock or self.conn.sock
        assert self.conn.sock is self.sock
        return response.status, response.headers, text


def _broken_copy(run_dir: Path, dest: Path, edit) -> Path:
    shutil.copytree(run_dir, dest)
    edit(dest)
    return dest


def _edit_metrics(change):
    def edit(run: Path):
        metrics = json.loads((run / "metrics.json").read_text())
        change(metrics)
        (run / "metrics.json").write_text(json.dumps(metrics))
    return edit


def _truncate_weights(run: Path):
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


BROKEN_RUNS = {  # name: (how the copy is broken, what the 400 says: one of two wordings, as inference.read_run
    # checks metrics.json itself where it has those checks)
    "malformed": (lambda run: (run / "metrics.json").write_text('{"config": '),
                  "Expecting value: line 1 column 12 (char 11)"),
    "list": (lambda run: (run / "metrics.json").write_text("[]"), ("metrics.json is malformed", "not a JSON object")),
    "empty": (lambda run: (run / "metrics.json").write_text("{}"), ("metrics.json has no valid", "'saved' is None")),
    "nolabels": (_edit_metrics(lambda m: m["data"].pop("label_names")), "'data.label_names'"),
    "textlength": (_edit_metrics(lambda m: m.update(max_length="32")), "'max_length'"),
    "toolong": (_edit_metrics(lambda m: m.update(max_length=100_000)),
                "has max_length 100000, more than the base model's 64 positions"),
    "savedout": (_edit_metrics(lambda m: m.update(saved="../empty/adapter")), "'saved'"),
    "truncated": (_truncate_weights, "Error while deserializing header"),
}


@pytest.fixture(scope="module")
def broken_runs(trained_tiny_run, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken-runs")
    return {name: _broken_copy(trained_tiny_run.run_dir, root / name, edit)
            for name, (edit, _) in BROKEN_RUNS.items()}


def test_client_errors_are_one_line_4xx_on_a_kept_connection(live, registry, broken_runs):
    conn = KeptConnection(live.port)
    cases = [
        ("/predict", '{"texts": ["great", "\\ud800 film"]}', 422,
         "texts.1: not valid Unicode: a lone surrogate at character 1"),
        ("/predict", '{"texts": ["great"], "adapter": "x\\udfff"}', 422,
         "adapter: not valid Unicode: a lone surrogate at character 2"),
        ("/adapters", json.dumps({"name": "n", "run_dir": "runs/\x00x"}), 422, "run_dir: contains a NUL character"),
    ]
    cases += [("/adapters", json.dumps({"name": name, "run_dir": str(run)}), 400, f"{run}")
              for name, run in broken_runs.items()]
    for path, body, status, message in cases:
        code, _, text = conn.request("POST", path, body)
        detail = json.loads(text)["detail"]
        assert code == status and message in detail and "\n" not in detail, (path, body, text)
        if path == "/adapters":
            expected = BROKEN_RUNS.get(json.loads(body)["name"], ("", "NUL"))[1]
            assert any(e in detail for e in ([expected] if isinstance(expected, str) else expected)), detail
    # nothing half-loaded stays behind, and the adapters answer as before
    assert set(registry.model.peft_config) == {"good", "flipped"} and registry.names() == ["good", "flipped"]
    code, _, text = conn.request("POST", "/predict", json.dumps({"texts": TEXTS, "adapter": "flipped"}))
    assert [p["label"] for p in json.loads(text)["predictions"]] == ["neg", "pos", "neg", "pos"]


def test_an_unexpected_error_is_a_one_line_500_on_a_kept_connection(live, registry, monkeypatch, caplog):
    def bug(requests):
        raise RuntimeError("boom\nTraceback (most recent call last): ...")

    monkeypatch.setattr(registry, "forward_batch", bug)  # in the batching worker: it answers 500 and goes on
    conn = KeptConnection(live.port)
    code, _, text = conn.request("POST", "/predict", json.dumps({"texts": ["great"]}))
    assert (code, json.loads(text)) == (500, {"detail": "internal error: RuntimeError: boom"})
    monkeypatch.undo()
    code, _, text = conn.request("POST", "/predict", json.dumps({"texts": ["great superb film loved"]}))
    assert code == 200 and json.loads(text)["predictions"][0]["label"] == "pos"
    assert "Traceback" in caplog.text  # for the operator, in the server's log


def enter_key(driver, key: str, expected_message: str, timeout: float = 20):
    """Wait for the page to ask for the API key with expected_message, then type the key and send it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(
        lambda d: d.find_element(By.ID, "key").is_displayed()
        and d.find_element(By.ID, "auth-message").text == expected_message)
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.ID, "use-key").click()


def test_page_asks_for_the_api_key_once(registry):
    with tempfile.TemporaryDirectory() as profile, \
            LiveServer(create_app(registry, access=Access(api_key=KEY))) as server:
        driver = headless_chromium(profile)
        try:
            driver.get(server.url)
            enter_key(driver, "not-the-key", "this server needs an API key")
            enter_key(driver, KEY, "wrong API key")
            # classify_in_page loads the page again: the key is kept for the tab, the page does not ask again
            assert classify_in_page(driver, server.url, "great superb film loved it", adapter="flipped") == "neg"
            assert not driver.find_element("id", "key").is_displayed()
        finally:
            driver.quit()


# -- other methods and older runs --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dora_run(tiny_model_dir, tmp_path_factory):
    """A DoRA run of the same tiny base: a LoRA-kind adapter, so it can share the base with LoRA runs."""
    return train_tiny_run(tiny_model_dir, tmp_path_factory.mktemp("dora-run"), "dora", synthetic_reviews(240, seed=2),
                          max_steps=10, peft="dora")


def test_dora_and_an_old_lora_run_share_one_base(trained_tiny_run, dora_run, tmp_path):
    from conftest import as_old_run

    old = as_old_run(trained_tiny_run.run_dir, tmp_path / "old")  # config with `method` only
    reg = AdapterRegistry(device="cpu")
    assert reg.add("old", old).info()["method"] == "lora"
    assert reg.add("dora", dora_run).info()["method"] == "dora"
    assert reg.quantization == "none" and reg.kind == "lora"
    _, old_logits = reg.logits(TEXTS, "old")
    torch.testing.assert_close(old_logits, Classifier(trained_tiny_run.run_dir, merge=False).logits(TEXTS),
                               rtol=1e-5, atol=1e-5)
    _, dora_logits = reg.logits(TEXTS, "dora")
    torch.testing.assert_close(dora_logits, Classifier(dora_run, merge=False).logits(TEXTS), rtol=1e-5, atol=1e-5)
