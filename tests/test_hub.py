"""Hub ids without network: one line at once (HF_HUB_OFFLINE, or an unreachable hub probed once), and a model in the
local Hugging Face cache still loads."""

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest

from lightune import hub
from lightune.errors import DataError, ModelError

# run in a fresh process: how long the command takes to fail, and whether torch had to load for it
TIMED_MAIN = ("import sys, time; start = time.perf_counter(); from lightune.cli import main; code = main(sys.argv[1:]); "
              "print(code, round(time.perf_counter() - start, 2), 'torch' in sys.modules)")


def closed_port() -> int:
    """A local port nothing listens on: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lightune_env(tmp_path, offline: bool, **extra) -> dict:
    """The environment of a user with an empty Hugging Face cache, offline or not."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                                            "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), **extra)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def run_timed(args, env):
    out = subprocess.run([sys.executable, "-c", TIMED_MAIN, *args], capture_output=True, text=True, env=env,
                         timeout=120)
    code, seconds, torch_loaded = out.stdout.split()
    return int(code), float(seconds), torch_loaded == "True", [line for line in out.stderr.splitlines() if line]


@pytest.mark.parametrize("args, message", [
    (["--model", "bert-base-uncased"], "lightune: error: cannot load model 'bert-base-uncased': it is not in the local "
                                       "Hugging Face cache and HF_HUB_OFFLINE is set (give a local model directory, "
                                       "or the packaged all-MiniLM-L6-v2)"),
    (["--data", "hub:sst2"], "lightune: error: cannot load hub dataset 'sst2': it is not in the local Hugging Face "
                             "cache and HF_HUB_OFFLINE is set (offline sources are imdb, rotten_tomatoes (packaged) or "
                             "a local file)"),
])
def test_offline_without_the_cache_is_one_line_at_once(tmp_path, args, message):
    code, seconds, torch_loaded, stderr = run_timed(["train", *args, "--output-dir", str(tmp_path / "runs")],
                                                    lightune_env(tmp_path, offline=True))
    assert code == 2 and stderr == [message]
    assert seconds < 5 and not torch_loaded  # checked before the heavy imports, nothing retried


def test_an_unreachable_hub_is_one_line_at_once(tmp_path):
    env = lightune_env(tmp_path, offline=False, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    code, seconds, torch_loaded, stderr = run_timed(["train", "--model", "bert-base-uncased", "--output-dir",
                                                     str(tmp_path / "runs")], env)
    assert code == 2 and stderr == ["lightune: error: cannot load model 'bert-base-uncased': the Hugging Face hub "
                                    "(127.0.0.1) cannot be reached and it is not in the local cache (give a local "
                                    "model directory, or the packaged all-MiniLM-L6-v2)"]
    assert seconds < 5 + hub.PROBE_TIMEOUT and not torch_loaded


def cache_model(tiny_model_dir, hf_home, repo="lightune-test/tiny-bert", commit="0" * 40) -> str:
    """The tiny model in a Hugging Face cache laid out as huggingface_hub downloads it."""
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(tiny_model_dir, folder / "snapshots" / commit)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return repo


LOAD_CACHED = ("import sys; from lightune import models; config = models.load_model_config(sys.argv[1]); "
               "tokenizer = models.load_tokenizer(sys.argv[1]); print(config.hidden_size, len(tokenizer))")


@pytest.mark.parametrize("offline", [True, False])
def test_a_cached_model_loads_without_network(tiny_model_dir, tmp_path, offline):
    repo = cache_model(tiny_model_dir, tmp_path / "hf-home")
    # not offline: the hub is probed, found unreachable, and the libraries are put in their offline mode
    env = lightune_env(tmp_path, offline, **({} if offline else {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}))
    out = subprocess.run([sys.executable, "-c", LOAD_CACHED, repo], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "32"


@pytest.fixture
def online(monkeypatch):
    """Not in offline mode (the tests' environment is), with go_offline recorded instead of done."""
    went = []
    monkeypatch.setattr(hub, "offline_mode", lambda: False)
    monkeypatch.setattr(hub, "go_offline", lambda: went.append(True))
    return went


def test_unreachable_goes_offline_and_refuses_what_is_not_cached(online, monkeypatch):
    probes = []
    monkeypatch.setattr(hub, "hub_reachable", lambda: probes.append(1) or False)
    with pytest.raises(ModelError, match=r"^cannot load model 'org/not-cached': the Hugging Face hub \(huggingface.co\) "
                                         r"cannot be reached and it is not in the local cache"):
        hub.check_hub_model("org/not-cached")
    with pytest.raises(DataError, match=r"^cannot load hub dataset 'sst2': the Hugging Face hub \(huggingface.co\) "
                                        r"cannot be reached"):
        hub.check_hub_dataset("sst2")
    assert online == [True, True] and probes == [1, 1]


def test_a_reachable_hub_lets_the_libraries_download(online, monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    hub.check_hub_model("org/not-cached")
    hub.check_hub_dataset("sst2")
    assert online == []


def test_the_probe_answers_for_a_listening_endpoint_and_not_for_a_closed_one(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests' environment is offline
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)  # answers 501: an answer
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for endpoint, expected in ((f"http://127.0.0.1:{server.server_port}", True),
                                   (f"http://127.0.0.1:{closed_port()}", False)):
            monkeypatch.setattr(constants, "ENDPOINT", endpoint)
            hub.hub_reachable.cache_clear()
            assert hub.hub_reachable() is expected
    finally:
        server.shutdown()
        hub.hub_reachable.cache_clear()


def test_going_offline_sets_the_libraries_offline_mode(monkeypatch):
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    hub.go_offline()
    assert constants.HF_HUB_OFFLINE is True and datasets.config.HF_HUB_OFFLINE is True
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hub.offline_mode()


def test_dataset_cache_is_found_in_either_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    assert not hub.dataset_cached("stanfordnlp/sst2")
    (tmp_path / "datasets" / "stanfordnlp___sst2").mkdir(parents=True)  # prepared by datasets
    assert hub.dataset_cached("stanfordnlp/sst2")
    (tmp_path / "hub" / "datasets--cornell-movie-review-data--rotten_tomatoes").mkdir(parents=True)  # downloaded
    assert hub.dataset_cached(hub.hub_dataset_path("rotten_tomatoes"))
