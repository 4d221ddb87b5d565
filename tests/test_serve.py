"""`lightune serve`: several adapters on one base model behind the JSON API, the web page in a real browser."""

from __future__ import annotations

import json
import shutil
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import synthetic_reviews, write_csv
from test_cli import assert_one_line_error, run_cli

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lightune.errors import AdapterConflictError, ModelError, UnknownAdapterError  # noqa: E402
from lightune.inference import Classifier  # noqa: E402
from lightune.serving import AdapterRegistry, Limits, adapter_name_for, create_app  # noqa: E402

TEXTS = ["great superb film loved", "awful boring mess hated", "brilliant wonderful story",
         "waste dull terrible movie"]
LIMITS = Limits(max_texts=4, max_chars=200, max_body_bytes=2000)


@pytest.fixture(scope="module")
def flipped_run(tiny_model_dir, tmp_path_factory):
    """A second LoRA run of the same tiny base, trained on swapped labels: it must disagree with the first."""
    from lightune.config import load_config
    from lightune.training import run_training

    root = tmp_path_factory.mktemp("flipped-run")
    rows = [(text, "neg" if label == "pos" else "pos") for text, label in synthetic_reviews(240, seed=1)]
    data = write_csv(root / "reviews.csv", rows)
    cfg = load_config(overrides=dict(model=str(tiny_model_dir), data=str(data), train_size=None, eval_size=None,
                                     max_length=32, epochs=3, batch_size=16, learning_rate=1e-2,
                                     output_dir=str(root / "runs"), run_name="flipped"))
    return run_training(cfg, progress=False).run_dir


@pytest.fixture(scope="module")
def registry(trained_tiny_run, flipped_run):
    reg = AdapterRegistry(device="cpu", batch_size=3)
    reg.add("good", trained_tiny_run.run_dir)
    reg.add("flipped", flipped_run)
    return reg


@pytest.fixture(scope="module")
def client(registry):
    return TestClient(create_app(registry, LIMITS))


@pytest.fixture
def fresh_client(trained_tiny_run):
    """A server with one adapter, for tests that add and remove adapters."""
    reg = AdapterRegistry(device="cpu")
    reg.add("good", trained_tiny_run.run_dir)
    return TestClient(create_app(reg, LIMITS))


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


def test_add_and_delete_adapters_at_run_time(fresh_client, flipped_run):
    added = fresh_client.post("/adapters", json={"run_dir": str(flipped_run)})
    assert added.status_code == 201, added.text
    assert added.json()["name"] == adapter_name_for(flipped_run) == "flipped"
    assert labels_of(fresh_client.post("/predict", json={"texts": TEXTS, "adapter": "flipped"})) == [
        "neg", "pos", "neg", "pos"]

    again = fresh_client.post("/adapters", json={"name": "flipped", "run_dir": str(flipped_run)})
    assert again.status_code == 409 and "already loaded" in again.json()["detail"]
    missing = fresh_client.post("/adapters", json={"name": "x", "run_dir": "/no/such/run"})
    assert missing.status_code == 400 and missing.json()["detail"] == "run directory not found: /no/such/run"
    bad_name = fresh_client.post("/adapters", json={"name": "a.b", "run_dir": str(flipped_run)})
    assert bad_name.status_code == 400 and "bad adapter name" in bad_name.json()["detail"]

    deleted = fresh_client.delete("/adapters/good")
    assert deleted.status_code == 200
    assert deleted.json()["default"] == "flipped" and [a["name"] for a in deleted.json()["adapters"]] == ["flipped"]
    assert fresh_client.post("/predict", json={"texts": TEXTS, "adapter": "good"}).status_code == 404
    assert labels_of(fresh_client.post("/predict", json={"texts": TEXTS})) == ["neg", "pos", "neg", "pos"]
    assert fresh_client.delete("/adapters/nope").status_code == 404


def test_deleting_the_last_adapter_is_refused(fresh_client):
    response = fresh_client.delete("/adapters/good")
    assert response.status_code == 409
    assert response.json()["detail"] == "'good' is the only adapter loaded; add another before removing it"
    assert labels_of(fresh_client.post("/predict", json={"texts": TEXTS})) == ["pos", "neg", "pos", "neg"]


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


# -- runs that cannot share the base -----------------------------------------------------------------------------

def _edited_copy(run_dir: Path, dest: Path, **config) -> Path:
    shutil.copytree(run_dir, dest)
    metrics = json.loads((dest / "metrics.json").read_text())
    metrics["config"].update(config)
    (dest / "metrics.json").write_text(json.dumps(metrics))
    return dest


def test_runs_that_cannot_share_the_base_are_refused(registry, trained_tiny_run, tmp_path):
    run = trained_tiny_run.run_dir
    with pytest.raises(ModelError, match="all served adapters must share one base model"):
        registry.add("other", _edited_copy(run, tmp_path / "other", model="prajjwal1/bert-tiny"))
    with pytest.raises(ModelError, match="served base has quantization none"):
        registry.add("q", _edited_copy(run, tmp_path / "q", method="qlora"))
    with pytest.raises(ModelError, match="is a full run without a LoRA adapter"):
        registry.add("full", _edited_copy(run, tmp_path / "full", method="full"))
    with pytest.raises(AdapterConflictError, match="already loaded"):
        registry.add("good", run)
    with pytest.raises(UnknownAdapterError):
        registry.predict(["great"], "other")
    assert registry.names() == ["good", "flipped"]


def test_cli_bad_run_dir_is_one_line():
    assert_one_line_error(run_cli("serve", "no-such-run"), "run directory not found: no-such-run")


@pytest.mark.parametrize("args, message", [
    (["RUN", "RUN"], "adapter names must be unique, got lora, lora; use --name"),
    (["RUN", "--name", "a", "--name", "b"], "--name was given 2 time(s) for 1 run directories"),
    (["RUN", "--port", "0"], "--port must be between 1 and 65535, got 0"),
    (["RUN", "--max-texts", "0"], "--max-texts must be >= 1, got 0"),
])
def test_cli_bad_serve_arguments(trained_tiny_run, capsys, args, message):
    from lightune.cli import main

    assert main(["serve", *[str(trained_tiny_run.run_dir) if a == "RUN" else a for a in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightune: error: ") and message in err and "\n" not in err


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


# -- other methods and older runs --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dora_run(tiny_model_dir, tmp_path_factory):
    """A DoRA run of the same tiny base: a LoRA-kind adapter, so it can share the base with LoRA runs."""
    from lightune.config import load_config
    from lightune.training import run_training

    root = tmp_path_factory.mktemp("dora-run")
    data = write_csv(root / "reviews.csv", synthetic_reviews(240, seed=2))
    cfg = load_config(overrides=dict(model=str(tiny_model_dir), data=str(data), train_size=None, eval_size=None,
                                     max_length=32, max_steps=10, batch_size=16, learning_rate=1e-2, peft="dora",
                                     output_dir=str(root / "runs"), run_name="dora"))
    return run_training(cfg, progress=False).run_dir


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


def test_adapters_of_another_kind_or_a_rewritten_base_are_refused(registry, trained_tiny_run, tmp_path):
    run = trained_tiny_run.run_dir
    with pytest.raises(ModelError, match="is a run of kind ia3 \\(ia3\\), but the served adapters are of kind lora"):
        registry.add("ia3", _edited_copy(run, tmp_path / "ia3", method="ia3"))
    with pytest.raises(ModelError, match="init 'pissa' rewrote the base weights under its adapter"):
        registry.add("pissa", _edited_copy(run, tmp_path / "pissa", init="pissa"))
    with pytest.raises(ModelError, match="is a head run without a LoRA adapter"):
        registry.add("head", _edited_copy(run, tmp_path / "head", method="head"))
    assert registry.names() == ["good", "flipped"]

