"""Helpers shared by the `lightune serve` tests (test_serve_*.py): texts, limits, tiny runs, a live server, a
headless browser, `lightune serve` in this process. Their fixtures are in conftest.py."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import write_csv
from lightune.serving import Limits

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


def labels_of(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [p["label"] for p in response.json()["predictions"]]


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


def _edited_copy(run_dir: Path, dest: Path, **config) -> Path:
    shutil.copytree(run_dir, dest)
    metrics = json.loads((dest / "metrics.json").read_text())
    metrics["config"].update(config)
    (dest / "metrics.json").write_text(json.dumps(metrics))
    return dest


def serve_in_process(monkeypatch, *args: str) -> tuple[int, dict]:
    """`lightune serve ARGS` up to the point where uvicorn would start: (exit status, what it would serve)."""
    import uvicorn

    from lightune.cli import main

    served = {}

    def run(server, sockets):
        served.update(app=server.config.app, address=sockets[0].getsockname())

    monkeypatch.setattr(uvicorn.Server, "run", run)
    return main(["serve", *args]), served


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, int]:
    """`python -m lightune serve ARGS` on a free port of 127.0.0.1, once it accepts connections (`env`: variables
    added to this process's environment)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "lightune", "serve", *args, "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, port
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError(f"the server did not start: {process.communicate()[1][-2000:]}")


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


class CountingCompile:
    """Stands in for torch.compile's module: the model itself, counting the passes it runs."""

    def __init__(self, model, **options):
        self.model, self.calls = model, 0

    def __call__(self, **inputs):
        self.calls += 1
        return self.model(**inputs)
