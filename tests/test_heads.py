"""What the classifier reads (pooling) and how it starts (a linear probe), on the tiny BERT."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from lightune import heads, models
from lightune.errors import ModelError
from lightune.inference import Classifier
from lightune.heads import start_head_from_probe
from lightune.training import make_eval_loader, run_training

LABELS = ["neg", "pos"]


def tokenize(model_dir, texts, **kwargs):
    return models.load_tokenizer(str(model_dir))(texts, return_tensors="pt", padding=True, **kwargs)


def test_mean_pooling_ignores_padding(tiny_model_dir):
    model = models.load_base_model(str(tiny_model_dir), LABELS).eval()
    heads.use_mean_pooling(model)
    short = tokenize(tiny_model_dir, ["great film"])
    padded = tokenize(tiny_model_dir, ["great film"], pad_to_multiple_of=16)
    assert padded["input_ids"].shape[1] > short["input_ids"].shape[1]
    with torch.no_grad():
        torch.testing.assert_close(model(**short).logits, model(**padded).logits, atol=1e-5, rtol=1e-5)
        states = model.bert(**short).last_hidden_state
    pooled = model.bert.pooler(states)  # the mask of the last batch is still attached
    torch.testing.assert_close(pooled, states.mean(dim=1))


def test_pooling_auto_reads_the_models_sentence_transformers_config(tiny_model_dir, tmp_path):
    model = models.load_base_model(str(tiny_model_dir), LABELS)
    assert heads.resolve_pooling("auto", str(tiny_model_dir), model) == "cls"  # ships no pooling config
    shipped = tmp_path / "model"
    shutil.copytree(tiny_model_dir, shipped)
    (shipped / "1_Pooling").mkdir()
    (shipped / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert heads.resolve_pooling("auto", str(shipped), model) == "mean"
    assert heads.resolve_pooling("cls", str(shipped), model) == "cls"
    packaged = models.resolve_model_path("all-MiniLM-L6-v2")
    assert heads.shipped_pooling(packaged) == "mean"


def test_mean_pooling_is_refused_for_a_head_without_a_pooler(tiny_model_dir):
    model = models.load_base_model(str(tiny_model_dir), LABELS)
    model.bert.pooler = None
    del model.bert.pooler
    with pytest.raises(ModelError, match="--pooling mean needs a BERT-style model"):
        heads.resolve_pooling("mean", str(tiny_model_dir), model)


@pytest.mark.parametrize("pooling,class_weights", [("cls", None), ("mean", None), ("mean", (0.25, 3.0))])
def test_probe_head_equals_scikit_learn_on_the_same_features(tiny_config, pooling, class_weights):
    from lightune import data as data_mod

    cfg = tiny_config(pooling=pooling)
    splits = data_mod.build_splits(cfg)
    tokenizer = models.load_tokenizer(cfg.model)
    train = data_mod.tokenize(splits.train, tokenizer, 32)
    model = models.load_base_model(cfg.model, splits.label_names)
    heads.apply_pooling(model, pooling)
    loader = make_eval_loader(train, tokenizer, 64, 2048)
    features, labels = heads.head_features(model, loader, progress=False)
    weights = None if class_weights is None else torch.tensor(class_weights)
    start_head_from_probe(model, loader, 2, torch.device("cpu"), progress=False, class_weights=weights)

    # with class weights, the probe weighs the classes as the training loss does
    class_weight = None if class_weights is None else dict(enumerate(class_weights))
    reference = LogisticRegression(C=heads.PROBE_C, max_iter=2000, class_weight=class_weight).fit(features, labels)
    logits = []
    layer = heads.final_linear(model)
    handle = layer.register_forward_hook(lambda m, args, out: logits.append(out))
    heads.head_features(model, loader, progress=False)
    handle.remove()
    probabilities = torch.softmax(torch.cat(logits), -1).numpy()
    np.testing.assert_allclose(probabilities, reference.predict_proba(features), atol=1e-5)


def test_probe_needs_every_class():
    with pytest.raises(ModelError, match="every class"):
        heads.fit_probe(np.zeros((4, 3)), np.array([0, 0, 2, 2]), 3)


def test_a_mean_pooled_probe_started_run_predicts_what_it_measured(tiny_config):
    result = run_training(tiny_config(pooling="mean", head_init="probe", epochs=1), progress=False)
    assert result.metrics["pooling"] == "mean"
    assert result.metrics["base"]["accuracy"] > 0.6  # the probe alone already reads the sentiment words
    assert result.metrics["parameters"]["trainable"] < result.metrics["parameters"]["total"]
    classifier = Classifier(result.run_dir, device="cpu")
    assert isinstance(classifier.model.bert.pooler, heads.MeanPooler)
    texts = ["great superb film loved", "awful boring mess hated"]
    assert [p["label"] for p in classifier.predict(texts)] == ["pos", "neg"]


def test_stock_peft_reproduces_a_mean_pooled_run_after_use_mean_pooling(tiny_config):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    result = run_training(tiny_config(pooling="mean", head_init="probe", max_steps=3, run_name="stock"),
                          progress=False)
    texts = ["great superb film loved", "awful boring mess hated"]
    expected = Classifier(result.run_dir, device="cpu").logits(texts)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_config().model, num_labels=2)
    heads.use_mean_pooling(base)
    stock = PeftModel.from_pretrained(base, result.run_dir / "adapter").eval()
    tokenizer = models.load_tokenizer(tiny_config().model)
    with torch.no_grad():
        logits = stock(**tokenizer(texts, return_tensors="pt", padding=True)).logits
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
