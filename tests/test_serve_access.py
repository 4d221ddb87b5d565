"""`lightune serve`, access control: loopback host names, the API key (in the page too), run-time adapter
loading only from one folder."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lightune.errors import ConfigError  # noqa: E402
from lightune.serving import Access, AdapterRegistry, AdapterRoot, create_app, trusted_hosts  # noqa: E402
from serve_fixtures import (  # noqa: E402
    LIMITS, TEXTS, LiveServer, _edited_copy, classify_in_page, free_port, headless_chromium, labels_of,
    serve_in_process)

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
    assert (added.status_code, added.json()["name"], added.json()["run_dir"]) == (201, "ok", "ok")
    added = client.post("/adapters", json={"name": "again", "run_dir": "./ok/"})
    assert (added.status_code, added.json()["run_dir"]) == (201, "ok")  # the run directory's name, not a path
    assert str(tmp_path) not in client.get("/adapters").text
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
    listed = client.get("/adapters", headers=authorized).json()["adapters"]
    assert [(a["name"], a["run_dir"]) for a in listed] == [("good", "lora"), ("flipped", "flipped")]


def test_refused_requests_are_counted_under_their_route(registry):
    """401s are answered before routing; /metrics counts them by the path's route all the same."""
    from prometheus_client.parser import text_string_to_metric_families

    client = TestClient(create_app(registry, LIMITS, Access(api_key=KEY)))
    authorized = {"Authorization": f"Bearer {KEY}"}
    assert client.post("/predict", json={"texts": ["great"]}).status_code == 401
    assert client.post("/predict", json={"texts": ["great"]}, headers={"Authorization": "Bearer no"}).status_code == 401
    assert client.delete("/adapters/good").status_code == 401
    assert client.get("/no-such-page").status_code == 401
    assert client.post("/predict", content=b"x" * 3000, headers=authorized).status_code == 413
    text = client.get("/metrics", headers=authorized).text
    requests = {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value
                for family in text_string_to_metric_families(text) for s in family.samples
                if s.name == "lightune_http_requests_total"}
    assert requests == {("POST", "/predict", "401"): 2, ("DELETE", "/adapters/{name}", "401"): 1,
                        ("GET", "other", "401"): 1, ("POST", "/predict", "413"): 1}


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
