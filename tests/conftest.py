"""Shared fixtures: a tiny BERT built from a config (no download) and small synthetic sentiment files."""

from __future__ import annotations

import csv
import os
import random
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore")
# Tests never use the network: fail at once instead of retrying an unreachable hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The suite runs on the CPU on every machine, a GPU machine too: its assertions compare seeded runs and logits
# with stock peft's exactly, which holds for the CPU's fp32 kernels, not for bf16 autocast and CUDA's
# nondeterministic reductions. The GPU-only code paths (fixed padded widths, chunked batches) are tested on the
# CPU against the plain path. LIGHTUNE_TEST_DEVICE=cuda leaves the GPU visible (device "auto" then picks it).
if os.environ.get("LIGHTUNE_TEST_DEVICE", "cpu") == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch first asks for a GPU; subprocesses inherit it

POSITIVE = ["great", "wonderful", "superb", "loved", "brilliant", "delightful", "excellent", "moving"]
NEGATIVE = ["awful", "boring", "terrible", "hated", "dull", "poor", "mess", "waste"]
NEUTRAL = ["the", "movie", "film", "plot", "actors", "was", "and", "a", "story", "scenes", "it", "this"]


def synthetic_reviews(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Short reviews whose sentiment words decide the label; easy for a tiny model to learn."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        cue = POSITIVE if label == "pos" else NEGATIVE
        words = rng.choices(NEUTRAL, k=rng.randint(2, 6)) + rng.choices(cue, k=rng.randint(2, 4))
        rng.shuffle(words)
        rows.append((" ".join(words) + f" {i}", label))
    return rows


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT with a word-level vocabulary, saved like a hub model."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + NEUTRAL
    vocab += [str(i) for i in range(1000)]
    BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True).save_pretrained(path)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2,
                        hidden_dropout_prob=0.0)
    import torch

    torch.manual_seed(0)
    BertForSequenceClassification(config).bert.save_pretrained(path)
    return path


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def reviews_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "reviews.csv", synthetic_reviews(400))


def tiny_settings(model_dir: Path, data: Path, output_dir: Path, **overrides):
    """The TrainConfig of tiny_config: a fast run of the tiny model on the synthetic reviews (with overrides)."""
    from lightune.config import load_config

    values = dict(model=str(model_dir), data=str(data), train_size=None, eval_size=None,
                  max_length=32, epochs=3, batch_size=16, learning_rate=1e-2, output_dir=str(output_dir),
                  run_name="tiny", head_init="random")  # tests measure learning from an untrained head
    values.update(overrides)
    return load_config(overrides=values)


@pytest.fixture
def tiny_config(tiny_model_dir, reviews_csv, tmp_path):
    """Factory: a TrainConfig for a fast run of the tiny model on the synthetic reviews."""

    def make(**overrides):
        return tiny_settings(tiny_model_dir, **{"data": reviews_csv, "output_dir": tmp_path / "runs", **overrides})

    return make


@pytest.fixture(scope="session")
def shared_tiny_run(tiny_model_dir, tmp_path_factory):
    """Factory: the finished run of tiny_config(**overrides), trained once per distinct overrides in the session and
    shared by every test that asks for the same ones (training is most of the suite's time). For tests that only
    read a run: one that alters it works on a copy (shutil.copytree)."""
    import json

    from lightune.training import run_training

    root = tmp_path_factory.mktemp("shared-tiny-runs")
    data = write_csv(root / "reviews.csv", synthetic_reviews(400))  # the name and rows of reviews_csv
    finished = {}

    def get(**overrides):
        key = json.dumps(overrides, sort_keys=True, default=str)
        if key not in finished:
            cfg = tiny_settings(tiny_model_dir, **{"data": data, "output_dir": root / f"runs-{len(finished)}",
                                                   **overrides})
            finished[key] = run_training(cfg, progress=False)
        return finished[key]

    return get


@pytest.fixture(scope="session")
def trained_tiny_run(tiny_model_dir, tmp_path_factory):
    """One finished LoRA run of the tiny model, shared by the inference tests."""
    from lightune.config import load_config
    from lightune.training import run_training

    root = tmp_path_factory.mktemp("shared-run")
    data = write_csv(root / "reviews.csv", synthetic_reviews(400))
    cfg = load_config(overrides=dict(model=str(tiny_model_dir), data=str(data), train_size=None, eval_size=None,
                                     max_length=32, epochs=5, batch_size=16, learning_rate=1e-2,
                                     output_dir=str(root / "runs"), run_name="lora", head_init="random"))
    # the model's own attention dropout (0.1): the non-default path; tiny_config runs cover the default (0)
    cfg.attention_dropout = None
    return run_training(cfg, progress=False)


@pytest.fixture
def lightune_cli(capsys, monkeypatch):
    """`lightune ARGS` run by cli.main in this process (no interpreter start and torch import per call), read back
    as test_cli.run_cli's result: the exit status (main's return value, or argparse's SystemExit code), stdout and
    stderr. An exception escaping main fails the test, as its traceback would fail test_cli.assert_one_line_error."""
    import io
    import subprocess
    import sys

    from lightune.cli import main

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        if stdin is not None:  # piped standard input, as subprocess.run(input=...) gives it
            monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode()), encoding="utf-8"))
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run


def as_old_run(run_dir: Path, dest: Path, method: str | None = None) -> Path:
    """A copy of a finished run as lightune wrote it before peft and quantize existed: its config (config.json
    and metrics.json's) names only the method."""
    import json
    import shutil

    shutil.copytree(run_dir, dest)
    for path, key in ((dest / "config.json", None), (dest / "metrics.json", "config")):
        data = json.loads(path.read_text())
        config = data if key is None else data[key]
        for new_key in ("peft", "quantize", "rslora", "init"):
            del config[new_key]
        if method is not None:
            config["method"] = method
        path.write_text(json.dumps(data))
    return dest


# -- `lightune serve` (test_serve_*.py; their helpers are in serve_fixtures.py) -------------------------------------

@pytest.fixture(scope="session")
def flipped_run(tiny_model_dir, tmp_path_factory):
    """A second LoRA run of the same tiny base, trained on swapped labels: it must disagree with the first."""
    from serve_fixtures import flip, train_tiny_run

    return train_tiny_run(tiny_model_dir, tmp_path_factory.mktemp("flipped-run"), "flipped",
                          flip(synthetic_reviews(240, seed=1)))


@pytest.fixture(scope="module")
def registry(trained_tiny_run, flipped_run):
    from lightune.serving import AdapterRegistry

    reg = AdapterRegistry(device="cpu", batch_size=3)
    reg.add("good", trained_tiny_run.run_dir)
    reg.add("flipped", flipped_run)
    return reg


@pytest.fixture(scope="module")
def client(registry):
    from fastapi.testclient import TestClient
    from serve_fixtures import LIMITS

    from lightune.serving import create_app

    return TestClient(create_app(registry, LIMITS))


def packaged_model_hub_cache(root: Path) -> Path:
    """A Hugging Face hub cache (under root) holding the packaged all-MiniLM-L6-v2 under its hub id, as a user
    online would have it after a download: what a run's adapter names as its base loads offline from there
    (pass it as cache_dir, or as HF_HUB_CACHE to a subprocess)."""
    from lightune.models import resolve_model_path

    source = Path(resolve_model_path("all-MiniLM-L6-v2"))
    repo = root / "models--sentence-transformers--all-MiniLM-L6-v2"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    for file in source.rglob("*"):
        if file.is_file():
            link = snapshot / file.relative_to(source)
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(file)
    return root


def pytest_runtest_logreport(report):
    """With LIGHTUNE_FAILURE_LOG set (benchmarks/gpu/check.sh), one line per failing test appended to that file as
    it fails (the error's own line too), so a run cut off by its time limit still names what failed and why."""
    path = os.environ.get("LIGHTUNE_FAILURE_LOG")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return  # under pytest-xdist the controller writes the line (the workers' reports reach it)
    crash = getattr(report.longrepr, "reprcrash", None)
    message = crash.message if crash is not None else (str(report.longrepr).strip().splitlines() or [""])[-1]
    message = " ".join(message.split())[:300]
    kind = "FAILED" if report.when == "call" else f"ERROR at {report.when}"
    with open(path, "a") as fh:
        fh.write(f"{kind} {report.nodeid} - {message}\n")
