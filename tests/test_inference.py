import json
import shutil

import pytest
import torch

from conftest import synthetic_reviews
from lightune import predict
from lightune.errors import ConfigError, DataError, ModelError
from lightune.inference import Classifier

TEXTS = ["great superb film loved", "awful boring mess hated", "brilliant wonderful story",
         "waste dull terrible movie"]


def test_stock_peft_loads_the_adapter_with_identical_logits(trained_tiny_run):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    adapter = trained_tiny_run.run_dir / "adapter"
    stock = AutoPeftModelForSequenceClassification.from_pretrained(adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        stock_logits = stock(**enc).logits
    ours = Classifier(trained_tiny_run.run_dir, merge=False).logits(TEXTS)
    torch.testing.assert_close(ours, stock_logits, rtol=1e-5, atol=1e-5)


def test_merged_adapter_gives_the_same_logits(trained_tiny_run):
    merged = Classifier(trained_tiny_run.run_dir, merge=True)
    unmerged = Classifier(trained_tiny_run.run_dir, merge=False)
    assert not any("lora" in n for n, _ in merged.model.named_parameters())
    torch.testing.assert_close(merged.logits(TEXTS), unmerged.logits(TEXTS), rtol=1e-4, atol=1e-4)


def test_batching_order_does_not_change_results(trained_tiny_run):
    texts = [t for t, _ in synthetic_reviews(37, seed=5)]
    classifier = Classifier(trained_tiny_run.run_dir, batch_size=5)
    batched = classifier.logits(texts)
    one_by_one = torch.cat([classifier.logits([t]) for t in texts])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-4)


def test_predict_returns_labels_and_probabilities(trained_tiny_run):
    out = predict(TEXTS, trained_tiny_run.run_dir)
    assert [p["text"] for p in out] == TEXTS
    assert [p["label"] for p in out] == ["pos", "neg", "pos", "neg"]
    for p in out:
        assert set(p["probabilities"]) == {"neg", "pos"}
        assert sum(p["probabilities"].values()) == pytest.approx(1.0)
        assert p["probabilities"][p["label"]] >= 0.5


@pytest.mark.parametrize("texts, message", [("one string", "not a single string"), (["ok", ""], "text 2 is empty"),
                                            (["ok", 3], "text 2 is not a string")])
def test_predict_rejects_bad_texts(trained_tiny_run, texts, message):
    with pytest.raises(DataError, match=message):
        predict(texts, trained_tiny_run.run_dir)


def test_missing_run_and_missing_adapter(trained_tiny_run, tmp_path):
    with pytest.raises(ModelError, match="run directory not found"):
        Classifier(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(trained_tiny_run.run_dir, broken)
    shutil.rmtree(broken / "adapter")
    with pytest.raises(ModelError, match="has no saved adapter/ directory"):
        Classifier(broken)
    (broken / "metrics.json").unlink()
    with pytest.raises(ModelError, match="not a finished lightune run"):
        Classifier(broken)


def test_fast_path_matches_the_plain_padded_path(trained_tiny_run):
    """Merged adapter + token-budget batches == unmerged adapter on texts padded to max_length in one batch."""
    texts = [t for t, _ in synthetic_reviews(23, seed=9)]
    fast = Classifier(trained_tiny_run.run_dir, chunk_tokens=40)
    plain = Classifier(trained_tiny_run.run_dir, merge=False)
    enc = plain.tokenizer(texts, truncation=True, padding="max_length", max_length=plain.max_length,
                          return_tensors="pt")
    with torch.no_grad():
        expected = plain.model(**enc).logits
    torch.testing.assert_close(fast.logits(texts), expected, rtol=1e-4, atol=1e-4)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda run: _truncate(run / "adapter" / "adapter_model.safetensors"),
         "cannot load adapter from .*adapter: Error while deserializing header"),
        (lambda run: (run / "adapter" / "adapter_config.json").write_text("{"),
         "adapter_config.json is damaged: not valid JSON"),  # runs.read_run checks it before peft reads it
        (lambda run: (run / "adapter" / "tokenizer.json").write_text("{"), "cannot load tokenizer from"),
        (lambda run: (run / "metrics.json").write_text('{"saved": "adapter", '), "metrics.json is damaged: not valid JSON"),
        (lambda run: (run / "metrics.json").write_bytes(b"\xff\xfe"), "metrics.json is damaged: not valid JSON"),
        (lambda run: (run / "metrics.json").write_text("{}"), "metrics.json is damaged: 'saved' is None"),
        (lambda run: (run / "metrics.json").write_text("[]"), "metrics.json is damaged: not a JSON object"),
        (lambda run: (run / "metrics.json").write_text('{"saved": "../.."}'), "'saved' is '../..', not 'adapter'"),
    ],
    ids=["truncated-weights", "bad-adapter-config", "bad-tokenizer", "truncated-metrics", "binary-metrics",
         "empty-metrics", "list-metrics", "saved-outside"],
)
def test_a_damaged_run_is_one_model_error(trained_tiny_run, tmp_path, damage, message):
    broken = tmp_path / "broken"
    shutil.copytree(trained_tiny_run.run_dir, broken)
    damage(broken)
    with pytest.raises(ModelError, match=message):
        Classifier(broken)


def test_metrics_missing_a_needed_field_is_named(trained_tiny_run, tmp_path):
    import json

    broken = tmp_path / "broken"
    shutil.copytree(trained_tiny_run.run_dir, broken)
    metrics = json.loads((broken / "metrics.json").read_text())
    for key, value, message in [("max_length", "64", "'max_length' is '64', not a positive integer"),
                                ("data", {"label_names": ["only"]}, "'data.label_names' is not a list of distinct"),
                                ("data", {"label_names": ["neg", "neg"]}, "'data.label_names' is not a list of distinct"),
                                ("config", {"model": "x"}, "'config' lacks the model or method"),
                                ("config", {"model": "x", "method": ""}, "'config' lacks the model or method")]:
        (broken / "metrics.json").write_text(json.dumps({**metrics, key: value}))
        with pytest.raises(ModelError, match=message):
            Classifier(broken)


def test_a_truncated_full_model_is_one_model_error(tiny_config, tmp_path):
    from lightune.training import run_training

    run = run_training(tiny_config(method="head", max_steps=1, run_name="head"), progress=False).run_dir
    _truncate(run / "model" / "model.safetensors")
    with pytest.raises(ModelError, match="cannot load model from .*model: Error while deserializing header"):
        Classifier(run)


def test_a_run_written_before_peft_and_quantize_still_predicts(trained_tiny_run, tmp_path, capsys):
    """Runs saved with only `method` in their config load as they did: same logits, in Python and the CLI."""
    from conftest import as_old_run
    from lightune.cli import main

    old = as_old_run(trained_tiny_run.run_dir, tmp_path / "old")
    assert "peft" not in (old / "config.json").read_text()
    torch.testing.assert_close(Classifier(old).logits(TEXTS), Classifier(trained_tiny_run.run_dir).logits(TEXTS))
    assert main(["predict", str(old), *TEXTS, "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [json.loads(line)["label"] for line in lines] == ["pos", "neg", "pos", "neg"]


def test_truncation_is_recorded_and_reused_by_predict_and_serve(tiny_config, tmp_path):
    """A tail-truncated run keeps the end of long texts in prediction and serving; old runs load as head."""
    from lightune.serving import AdapterRegistry
    from lightune.training import run_training

    run = run_training(tiny_config(truncation="tail", max_length=8, epochs=1, run_name="tail"), progress=False)
    assert json.loads((run.run_dir / "config.json").read_text())["truncation"] == "tail"
    long_texts = ["the movie was " * 6 + "awful boring mess", "the film and story " * 5 + "superb loved great"]
    tail = Classifier(run.run_dir)
    assert tail.truncation == "tail"
    as_head = Classifier(run.run_dir, truncation="head")
    assert not torch.allclose(tail.logits(long_texts), as_head.logits(long_texts))
    # max_length 8 is [CLS], the last 6 words (one token each) and [SEP]: the same as those words alone
    torch.testing.assert_close(tail.logits(long_texts), tail.logits([" ".join(t.split()[-6:]) for t in long_texts]))
    registry = AdapterRegistry()
    registry.add("tail", run.run_dir)
    torch.testing.assert_close(registry.logits(long_texts, "tail")[1], Classifier(run.run_dir, merge=False).logits(
        long_texts), rtol=1e-5, atol=1e-5)
    old = tmp_path / "old"
    shutil.copytree(run.run_dir, old)
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["config"]["truncation"]
    (old / "metrics.json").write_text(json.dumps(metrics))
    assert Classifier(old).truncation == "head"


def test_three_labels_end_to_end(tiny_config, tmp_path):
    """Train on 3 labels, save, reload the adapter in stock peft (same logits), predict and evaluate by name."""
    import random

    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    from conftest import NEGATIVE, NEUTRAL, POSITIVE, write_csv
    from lightune.cli import main
    from lightune.training import run_training

    rng = random.Random(3)
    cues = {"pos": POSITIVE, "neg": NEGATIVE, "mid": ["plot", "actors", "story", "scenes"]}
    rows = []
    for i in range(450):
        label = ("neg", "mid", "pos")[i % 3]
        words = rng.choices(NEUTRAL[:3], k=2) + rng.choices(cues[label], k=3)
        rng.shuffle(words)
        rows.append((" ".join(words) + f" {i}", label))
    data = write_csv(tmp_path / "three.csv", rows)
    run = run_training(tiny_config(data=str(data), run_name="three", epochs=3), progress=False)
    assert run.metrics["data"]["label_names"] == ["mid", "neg", "pos"]
    assert run.metrics["test"]["accuracy"] > 0.6 and len(run.metrics["test"]["per_class"]) == 3
    texts = ["great superb loved", "awful boring mess", "the plot actors story"]
    adapter = run.run_dir / "adapter"
    stock = AutoPeftModelForSequenceClassification.from_pretrained(adapter, num_labels=3).eval()
    enc = AutoTokenizer.from_pretrained(adapter)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        stock_logits = stock(**enc).logits
    torch.testing.assert_close(Classifier(run.run_dir, merge=False).logits(texts), stock_logits, rtol=1e-5, atol=1e-5)
    assert [p["label"] for p in predict(texts, run.run_dir)] == ["pos", "neg", "mid"]
    assert set(predict(texts, run.run_dir)[0]["probabilities"]) == {"mid", "neg", "pos"}
    assert main(["evaluate", str(run.run_dir), "--output-dir", str(tmp_path / "ev")]) == 0
    result = json.loads((tmp_path / "ev" / "three-on-three-test" / "metrics.json").read_text())
    assert result["metrics"]["confusion_matrix"] == run.metrics["test"]["confusion_matrix"]


def test_library_predict_prints_no_loading_bar_and_no_warning(trained_tiny_run):
    import subprocess
    import sys

    code = ("import sys, lightune; out = lightune.predict(['great superb film', 'awful dull'], sys.argv[1]); "
            "print([p['label'] for p in out])")
    result = subprocess.run([sys.executable, "-c", code, str(trained_tiny_run.run_dir)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['pos', 'neg']"
    assert "Loading weights" not in result.stderr and "Warning" not in result.stderr, result.stderr
    # the caller's own settings are left as they were
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # whatever earlier tests in this process left
    Classifier(trained_tiny_run.run_dir)
    assert hf_logging.is_progress_bar_enabled()


def test_precision_sets_the_weights_dtype_and_keeps_the_labels(trained_tiny_run):
    from lightune.forward import inference_dtype

    assert inference_dtype("auto", torch.device("cpu")) == torch.float32  # bf16 only where a GPU supports it
    assert inference_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    texts = TEXTS
    fp32 = Classifier(trained_tiny_run.run_dir, device="cpu")
    bf16 = Classifier(trained_tiny_run.run_dir, device="cpu", precision="bf16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    logits = bf16.logits(texts)
    assert logits.dtype == torch.float32  # logits come back as float32 whatever the weights
    torch.testing.assert_close(logits, fp32.logits(texts), rtol=0.05, atol=0.05)
    assert [p["label"] for p in bf16.predict(texts)] == [p["label"] for p in fp32.predict(texts)]


def test_an_unknown_precision_is_a_config_error(trained_tiny_run):
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16; got 'fp8'"):
        Classifier(trained_tiny_run.run_dir, device="cpu", precision="fp8")
