"""End to end on the packaged real model (all-MiniLM-L6-v2) and a few dozen real IMDb / Rotten Tomatoes reviews."""

import pytest
import torch

from lightune import predict, quantization
from lightune.inference import Classifier
from lightune.config import load_config
from lightune.training import run_training

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A run with the architecture's usual head ([CLS] pooler, random start): stock peft reproduces it exactly."""
    cfg = load_config(overrides=dict(data="rotten_tomatoes", train_size=384, eval_size=128, max_length=64, epochs=2,
                                     pooling="cls", head_init="random", batch_size=16,
                                     output_dir=str(tmp_path_factory.mktemp("real")), run_name="e2e"))
    return run_training(cfg, progress=False)


def test_lora_on_real_reviews_beats_the_base_model(real_run):
    m = real_run.metrics
    assert m["data"]["sizes"] == {"train": 384, "validation": 128, "test": 128}
    assert m["test"]["accuracy"] > m["base"]["accuracy"] + 0.05
    assert m["test"]["accuracy"] > 0.6
    assert m["target_modules"] == ["query", "value"]
    assert 0.002 < m["parameters"]["share"] < 0.02


def test_real_adapter_reloads_with_stock_peft_and_same_logits(real_run, tmp_path):
    import json

    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    from conftest import packaged_model_hub_cache
    from lightune.inference import Classifier

    texts = ["A moving, beautifully acted film.", "Two hours of my life I will never get back."]
    adapter = real_run.run_dir / "adapter"
    # the adapter names its base by its hub id, which loads from a hub cache as it would online
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "sentence-transformers/all-MiniLM-L6-v2"
    stock = AutoPeftModelForSequenceClassification.from_pretrained(
        adapter, cache_dir=str(packaged_model_hub_cache(tmp_path / "hub"))).eval()
    enc = AutoTokenizer.from_pretrained(adapter)(texts, padding=True, truncation=True, max_length=128,
                                                 return_tensors="pt")
    with torch.no_grad():
        expected = stock(**enc).logits
    torch.testing.assert_close(Classifier(real_run.run_dir).logits(texts), expected, rtol=1e-4, atol=1e-4)
    labels = [p["label"] for p in predict(texts, real_run.run_dir)]
    assert set(labels) <= {"negative", "positive"}


def test_train_on_imdb_evaluate_on_rotten_tomatoes(tmp_path):
    cfg = load_config(overrides=dict(data="imdb", test_data="rotten_tomatoes", train_size=32, eval_size=32,
                                     max_length=64, max_steps=2, output_dir=str(tmp_path), run_name="cross"))
    m = run_training(cfg, progress=False).metrics
    assert m["data"]["test_source"] == "rotten_tomatoes" and m["data"]["sizes"]["test"] == 32


def test_qlora_nf4_trains_the_real_model_on_cpu(tmp_path):
    cfg = load_config(overrides=dict(method="qlora", data="rotten_tomatoes", train_size=32, eval_size=32,
                                     max_length=48, max_steps=2, output_dir=str(tmp_path), run_name="qlora"))
    result = run_training(cfg, progress=False)
    m = result.metrics
    # NF4 shrinks the encoder's linear layers; the 47 MB word-embedding table stays fp32 (87.5 MB in all)
    assert m["memory"]["weights_bytes"] < 0.7 * 87.5e6
    out = predict(["a gorgeous, witty film"], result.run_dir)
    assert out[0]["label"] in {"negative", "positive"}
    # on a CPU with AVX512-BF16, prediction runs bitsandbytes' packed layout: same probabilities as the standard one
    classifier = Classifier(result.run_dir, device="cpu")
    texts = ["a gorgeous, witty film", "a tedious mess", "fine"]
    fast = torch.softmax(classifier.logits(texts), -1)
    quantization.keep_standard_layout(classifier.model)
    torch.testing.assert_close(fast, torch.softmax(classifier.logits(texts), -1), atol=2e-2, rtol=0)
