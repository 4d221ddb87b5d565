"""`lightune serve`, the HTTP app: predictions, bad input, metrics, adapters added and removed, the CLI and a real
server (SIGTERM, hostile input on a kept connection), the web page in a real browser."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from test_cli import assert_one_line_error

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lightune.serving import Access, AdapterRegistry, AdapterRoot, adapter_name_for, create_app  # noqa: E402
from serve_fixtures import (  # noqa: E402
    LIMITS, TEXTS, LiveServer, classify_in_page, free_port, headless_chromium, labels_of, model_held,
    serve_in_process, start_server)

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
    ({"texts": ["great", "<br />"]}, "text 2 is empty"),  # empty once cleaned: like whitespace
    ({"texts": ["\u200b\ufeff"]}, "text 1 is empty"),
    ({"texts": ["great", "\x01\u2060 <br>"]}, "text 2 is empty"),
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

def test_list_adapters_and_health(client, trained_tiny_run, tiny_model_dir):
    body = client.get("/adapters").json()
    assert body["default"] == "good"
    assert [a["name"] for a in body["adapters"]] == ["good", "flipped"]
    good = body["adapters"][0]
    assert good["labels"] == ["neg", "pos"] and good["method"] == "lora" and good["max_length"] == 32
    # names, never a path of the server: the run directory's and the base model directory's
    assert (good["run_dir"], good["model"]) == ("lora", tiny_model_dir.name)
    health = client.get("/health").json()
    assert health == {"status": "ok", "base_model": tiny_model_dir.name, "device": "cpu", "adapters": 2}
    for response in (client.get("/adapters"), client.get("/health")):
        assert "/" not in response.text


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


def test_openapi_schema_lists_the_api(client):
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/adapters", "/adapters/{name}", "/health"} <= set(schema["paths"])
    assert {"post", "get"} <= set(schema["paths"]["/adapters"])
    assert {"PredictRequest", "PredictResponse", "AdapterList", "ErrorResponse"} <= set(schema["components"]["schemas"])
    assert "413" in schema["paths"]["/predict"]["post"]["responses"]


def test_web_page_is_served(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert 'id="classify"' in response.text and "/predict" in response.text


def test_cli_bad_run_dir_is_one_line(lightune_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(lightune_cli("serve", "no-such-run"), "run directory not found: no-such-run")


@pytest.mark.parametrize("args, message", [
    (["RUN", "RUN"], "adapter names must be unique, got lora, lora; use --name"),
    (["RUN", "--name", "a", "--name", "b"], "--name was given 2 time(s) for 1 run directories"),
    (["RUN", "--port", "0"], "--port must be between 1 and 65535, got 0"),
    (["RUN", "--max-texts", "0"], "--max-texts must be >= 1, got 0"),
    (["RUN", "--max-adapters", "0"], "--max-adapters must be >= 1, got 0"),
    (["RUN", "--batch-wait-ms", "-1"], "--batch-wait-ms must be between 0 and 1000, got -1"),
    (["RUN", "--shutdown-timeout", "0"], "--shutdown-timeout must be more than 0 and at most 3600 (seconds), got 0"),
    (["RUN", "--body-timeout", "nan"], "--body-timeout must be more than 0 and at most 3600 (seconds), got nan"),
    (["RUN", "RUN", "--name", "a", "--name", "b", "--max-adapters", "1"],
     "2 run directories but --max-adapters is 1"),
])
def test_cli_bad_serve_arguments(trained_tiny_run, capsys, args, message):
    from lightune.cli import main

    assert main(["serve", *[str(trained_tiny_run.run_dir) if a == "RUN" else a for a in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightune: error: ") and message in err and "\n" not in err


def test_cli_serves_on_a_socket_bound_before_loading(trained_tiny_run, monkeypatch, capsys):
    port = free_port()
    code, served = serve_in_process(monkeypatch, str(trained_tiny_run.run_dir), "--port", str(port), "--name", "good")
    assert code == 0 and served["address"] == ("127.0.0.1", port)
    client = TestClient(served["app"], base_url=f"http://127.0.0.1:{port}")
    assert labels_of(client.post("/predict", json={"texts": TEXTS})) == ["pos", "neg", "pos", "neg"]
    assert client.get("/health", headers={"Host": "evil.example"}).status_code == 400
    err = capsys.readouterr().err
    assert "serving good on " in err
    assert f"adapter 'good' loaded from {trained_tiny_run.run_dir.resolve()}" in err  # paths: in the server's log


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
