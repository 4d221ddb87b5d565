"""`lightune serve`, the adapter registry: several adapters on one base model, each predicting like the
Classifier, and the runs that cannot share the base."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import synthetic_reviews

fastapi = pytest.importorskip("fastapi")

from lightune.errors import AdapterConflictError, ModelError, UnknownAdapterError  # noqa: E402
from lightune.inference import Classifier  # noqa: E402
from lightune.serving import AdapterRegistry  # noqa: E402
from serve_fixtures import TEXTS, CountingCompile, _edited_copy, train_tiny_run  # noqa: E402

# -- predictions -------------------------------------------------------------------------------------------------

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


# -- runs that cannot share the base -----------------------------------------------------------------------------

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


# -- what loading reads: the adapter's own files, each within a size limit; NaN weights refused ---------------------

def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _with_sparse_file(run_dir, dest, name: str, size: int):
    import shutil

    shutil.copytree(run_dir, dest)
    with open(dest / "adapter" / name, "wb") as fh:  # a new file, or one of the run's emptied
        fh.truncate(size)  # sparse: no disk, but a reader gets `size` bytes
    return dest


def test_loading_reads_only_the_adapters_files(trained_tiny_run, tmp_path):
    """A 1 GB file beside the adapter is never read (the tokenizer digest used to read every file whole)."""
    from fastapi.testclient import TestClient

    from lightune.serving import Access, AdapterRoot, create_app
    from serve_fixtures import LIMITS

    root = tmp_path / "root"
    _with_sparse_file(trained_tiny_run.run_dir, root / "big", "junk.bin", 2**30)
    reg = AdapterRegistry(device="cpu")
    reg.add("good", trained_tiny_run.run_dir)
    client = TestClient(create_app(reg, LIMITS, Access(adapter_root=AdapterRoot(root))))
    before = _peak_rss_mb()
    added = client.post("/adapters", json={"run_dir": "big"})
    assert added.status_code == 201, added.text
    assert _peak_rss_mb() - before < 300
    assert labels_of_registry(reg, "big") == labels_of_registry(reg, "good")


def labels_of_registry(reg, name: str) -> list[str]:
    return [p["label"] for p in reg.predict(TEXTS, name)[1]]


@pytest.mark.parametrize("name, message", [
    ("vocab.txt", "big/adapter/vocab.txt is 200.0 MB, more than 128.0 MB: too large for a tokenizer file"),
    ("adapter_config.json", "big/adapter/adapter_config.json is 200.0 MB, more than 1.0 MB: too large for an "
                            "adapter's configuration"),
])
def test_files_over_their_size_limit_are_refused_unread(trained_tiny_run, tmp_path, name, message):
    import time

    run = _with_sparse_file(trained_tiny_run.run_dir, tmp_path / "big", name, 200 * 2**20)  # added, or replaced
    reg = AdapterRegistry(device="cpu")
    start, before = time.monotonic(), _peak_rss_mb()
    with pytest.raises(ModelError) as error:
        reg.check_run("big", run, shown="big")
    assert str(error.value) == message
    assert time.monotonic() - start < 10 and _peak_rss_mb() - before < 100


def test_a_tokenizer_file_that_is_not_a_regular_file_is_refused(trained_tiny_run, tmp_path):
    import os
    import shutil

    run = tmp_path / "fifo"
    shutil.copytree(trained_tiny_run.run_dir, run)
    os.mkfifo(run / "adapter" / "vocab.txt")  # reading it would wait for a writer forever
    with pytest.raises(ModelError, match="^fifo/adapter/vocab.txt is not a regular file$"):
        AdapterRegistry(device="cpu").check_run("fifo", run, shown="fifo")


def test_served_weights_in_bf16_give_the_fp32_labels(registry, trained_tiny_run, flipped_run):
    reg = AdapterRegistry(device="cpu", batch_size=3, precision="bf16")
    reg.add("good", trained_tiny_run.run_dir)
    reg.add("flipped", flipped_run)  # peft loads it in fp32: cast with the rest
    assert {p.dtype for p in reg.model.parameters()} == {torch.bfloat16}
    for name in ("good", "flipped"):
        _, logits = reg.logits(TEXTS, name)
        _, expected = registry.logits(TEXTS, name)
        assert logits.dtype == torch.float32
        torch.testing.assert_close(logits, expected, rtol=0, atol=0.25)  # bf16 keeps about 3 digits a weight
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))


def test_compile_runs_single_adapter_passes_through_the_compiled_model(registry, trained_tiny_run, flipped_run,
                                                                      monkeypatch):
    from lightune import compiling

    monkeypatch.setattr(torch, "compile", CountingCompile)
    reg = AdapterRegistry(device="cpu", batch_size=3, compile=True)
    reg.add("good", trained_tiny_run.run_dir)
    reg.add("flipped", flipped_run)
    assert isinstance(reg.forward_model, compiling.CompiledModel) and reg.forward_model.eager is reg.model
    for name in ("good", "flipped"):
        torch.testing.assert_close(reg.logits(TEXTS, name)[1], registry.logits(TEXTS, name)[1])
    assert reg.forward_model.compiled.calls >= 2  # each adapter's texts ran through the compiled model
