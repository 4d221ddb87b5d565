"""The portable adapter a run saves: the base named by its hub id, the labels in config.json, a model card, and the
README's stock-peft snippet run as written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
LONG = " ".join(["the film was great and moving then dull and boring"] * 6)  # longer than max_length 32


def code_after(text: str, marker: str) -> str:
    """The first ```python block after `marker` in text."""
    start = text.index(marker)
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block, f"no python block after {marker!r}"
    return block.group(1)


def run_snippet(code: str, path: str, old_path: str, texts: list[str] | None = None) -> dict:
    """Execute a documented snippet as written, with its path (and example texts) replaced; its variables."""
    assert old_path in code
    code = code.replace(old_path, path)
    if texts is not None:
        code = re.sub(r"^texts = .*$", f"texts = {texts!r}", code, count=1, flags=re.M)
    namespace: dict = {}
    exec(compile(code, "<snippet>", "exec"), namespace)
    return namespace


def test_hub_id_names_packaged_models_by_their_hub_id_and_local_directories_by_none(tiny_model_dir):
    from lightune.model_card import hub_id

    assert hub_id("all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_id("bert-base-uncased") == "bert-base-uncased"
    assert hub_id(str(tiny_model_dir)) is None
    assert hub_id("./some/model") is None


@pytest.fixture
def mean_run(shared_tiny_run):
    """A run as the default job makes it: mean pooling, tail truncation (shared with test_export's)."""
    return shared_tiny_run(pooling="mean", epochs=1)


def test_saved_adapter_has_labels_a_model_card_and_loads_through_lightune_whatever_it_names(mean_run, tmp_path):
    import dataclasses
    import shutil

    from lightune import predict
    from lightune.inference import Classifier

    # a copy: this test edits the adapter's config, and the run is shared
    mean_run = dataclasses.replace(mean_run, run_dir=Path(shutil.copytree(mean_run.run_dir, tmp_path / "tiny")))
    adapter = mean_run.run_dir / "adapter"
    config = json.loads((adapter / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["label2id"] == {"neg": 0, "pos": 1}
    assert config["problem_type"] == "single_label_classification"
    assert "_name_or_path" not in config
    card = (adapter / "README.md").read_text()
    assert "[More Information Needed]" not in card  # not peft's template
    test = mean_run.metrics["test"]
    for part in ("| 0 | neg |", "| 1 | pos |", f"| accuracy | {test['accuracy']:.4f} |", "reviews.csv",
                 "AutoPeftModelForSequenceClassification", "use_mean_pooling", 'truncation_side = "left"'):
        assert part in card, part
    # lightune reads the base from the run's config.json, never from adapter_config.json: a base named by a hub id
    # that cannot be reached here (tests are offline) changes nothing
    texts = ["great wonderful film", LONG]
    expected = [p["probabilities"] for p in predict(texts, mean_run.run_dir)]
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(Path(mean_run.metrics["config"]["model"]).resolve())
    adapter_config["base_model_name_or_path"] = "sentence-transformers/all-MiniLM-L6-v2"
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    got = [p["probabilities"] for p in Classifier(mean_run.run_dir).predict(texts)]
    assert got == expected


def test_readme_and_card_stock_peft_snippets_give_lightunes_probabilities(mean_run):
    from lightune.inference import Classifier

    adapter = str(mean_run.run_dir / "adapter")
    texts = ["great wonderful film", "awful boring plot", "the   movie<br /><br />was a dull mess", LONG]
    # lightune's probabilities before the run's calibration temperature (which predict and exports apply)
    expected = torch.softmax(Classifier(mean_run.run_dir, device="cpu").logits(texts), -1)
    readme = code_after(README.read_text(), "The adapter is portable")
    assert "runs/<run>/adapter" in readme and "max_length=256" in readme
    # as written; the run's max_length (32) is what its own tokens are cut at
    ns = run_snippet(readme.replace("max_length=256", "max_length=32"), adapter, "runs/<run>/adapter", texts)
    # (without use_mean_pooling reaching into the peft model, the head would read [CLS] and these would differ)
    torch.testing.assert_close(ns["probabilities"], expected, rtol=0, atol=1e-5)
    assert ns["model"].config.id2label == {0: "neg", 1: "pos"}  # the labels, not LABEL_0 / LABEL_1
    card = code_after((mean_run.run_dir / "adapter" / "README.md").read_text(), "## How to load")
    ns = run_snippet(card, f'path = "{adapter}"', 'path = "."', texts)
    torch.testing.assert_close(ns["probabilities"], expected, rtol=0, atol=1e-5)
