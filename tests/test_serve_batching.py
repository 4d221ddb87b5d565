"""`lightune serve`, batching: requests of several adapters in shared forward passes, the worker, and a full
queue answered with 503."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import synthetic_reviews

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lightune.errors import UnknownAdapterError  # noqa: E402
from lightune.inference import Classifier  # noqa: E402
from lightune.serving import AdapterRegistry, Batching, BatchingWorker, Limits, create_app  # noqa: E402
from serve_fixtures import (TEXTS, CountingCompile, flip, free_port, labels_of, model_held,  # noqa: E402
                            serve_in_process, train_tiny_run)

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


def test_with_compile_a_mixed_pass_runs_eagerly_and_one_adapter_passes_compiled(mean_runs, mean_registry,
                                                                                   monkeypatch):
    from lightune import compiling

    monkeypatch.setattr(torch, "compile", CountingCompile)
    reg = AdapterRegistry(device="cpu", batch_size=4, compile=True)
    for name, run in mean_runs.items():
        reg.add(name, run)
    assert isinstance(reg.forward_model, compiling.CompiledModel)
    mixed = [reg.encode(MIXED_TEXTS[:4], "a"), reg.encode(MIXED_TEXTS[:4], "b")]  # LoRA rows that mix
    alone = [reg.encode(MIXED_TEXTS[:4], "d")]  # DoRA: one adapter per pass
    got = reg.forward_batch(mixed)
    assert reg.forward_model.compiled.calls == 0  # per-row adapter_names: the eager model
    got += reg.forward_batch(alone)
    assert reg.forward_model.compiled.calls == 1  # 4 texts, one pass
    for request, logits in zip(mixed + alone, got):
        expected = mean_registry.forward_batch([mean_registry.encode(request.texts, request.adapter.name)])[0]
        torch.testing.assert_close(logits, expected)


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


# -- back-pressure and metrics ----------------------------------------------------------------------------------

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


def test_cli_batching_off_serves_one_request_at_a_time(trained_tiny_run, monkeypatch):
    code, served = serve_in_process(monkeypatch, str(trained_tiny_run.run_dir), "--port", str(free_port()),
                                    "--batching", "off")
    assert code == 0 and served["app"].state.worker is None
    client = TestClient(served["app"], base_url="http://localhost")
    assert labels_of(client.post("/predict", json={"texts": TEXTS})) == ["pos", "neg", "pos", "neg"]
