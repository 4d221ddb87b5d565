"""Multi-label classification (--problem multi_label): label parsing, BCE loss, thresholds, metrics, and a tiny run
trained, reloaded in stock peft, predicted, served and evaluated."""

from __future__ import annotations

import json
from pathlib import Path
import random
import types

import numpy as np
import pytest
import torch

from conftest import NEGATIVE, NEUTRAL, POSITIVE, write_csv

LABELS = ["happy", "sad", "funny"]
CUES = {"happy": POSITIVE[:4], "sad": NEGATIVE[:4], "funny": POSITIVE[4:]}


def toy_rows(n: int, seed: int = 0) -> list[tuple[str, set[str]]]:
    """Texts whose cue words decide each label independently (any set of the three, the empty one included)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        chosen = {label for label in LABELS if rng.random() < 0.5}
        words = rng.choices(NEUTRAL, k=rng.randint(1, 3))
        for label in chosen:
            words += rng.choices(CUES[label], k=2)
        rng.shuffle(words)
        rows.append((" ".join(words) + f" {i}", chosen))
    return rows


def columns_csv(path, rows):
    return write_csv(path, [(text, *(int(label in chosen) for label in LABELS)) for text, chosen in rows],
                     header=("text", *LABELS))


def tags_csv(path, rows, delimiter=","):
    return write_csv(path, [(text, delimiter.join(sorted(chosen))) for text, chosen in rows], header=("text", "tags"))


# -- data ---------------------------------------------------------------------------------------------------------

def test_multi_hot_labels_parse_the_same_from_columns_and_from_a_delimited_column(tmp_path):
    from lightune.data import prepare_source
    from lightune.labels import is_multi_label

    rows = toy_rows(40)
    by_columns, names = prepare_source(str(columns_csv(tmp_path / "c.csv", rows)), "text", "label", None,
                                       label_columns=LABELS)
    by_tags, tag_names = prepare_source(str(tags_csv(tmp_path / "t.csv", rows, "|")), "text", "tags", LABELS,
                                        label_delimiter="|")
    assert names == tag_names == LABELS and is_multi_label(by_columns)
    expected = [[float(label in chosen) for label in LABELS] for _, chosen in rows]
    assert by_columns["label"] == by_tags["label"] == expected
    # without --labels, the names found, sorted
    _, found = prepare_source(str(tags_csv(tmp_path / "t2.csv", rows)), "text", "tags", None, label_delimiter=",")
    assert found == sorted(LABELS)


def test_multi_label_splits_are_seeded_and_disjoint(tmp_path):
    from lightune.data import carve_splits, prepare_source

    ds, _ = prepare_source(str(columns_csv(tmp_path / "c.csv", toy_rows(60))), "text", "label", None,
                           label_columns=LABELS)
    first, again = carve_splits(ds, 0.1, 0.1, 7), carve_splits(ds, 0.1, 0.1, 7)
    assert first["test"]["text"] == again["test"]["text"]
    parts = [set(first[name]["text"]) for name in ("train", "validation", "test")]
    assert sum(map(len, parts)) == 60 and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


@pytest.mark.parametrize("args, message", [
    (["--problem", "multi_label"], "multi-label data needs its labels: --label-columns"),
    (["--label-columns", "a,b"], "--label-columns is for multi-label data; add --problem multi_label"),
    (["--problem", "multi_label", "--label-columns", "a,b", "--label-delimiter", ","], "not both"),
    (["--problem", "multi_label", "--label-columns", "a,b", "--class-weights", "balanced"],
     "class_weights is for single-label data"),
    (["--problem", "multi_label", "--label-delimiter", ",", "--data", "imdb"], "imdb is single-label data"),
])
def test_bad_multi_label_settings_are_one_line(args, message, capsys):
    from lightune.cli import main

    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightune: error:") and message in err and "\n" not in err


@pytest.mark.parametrize("write, flags, message", [
    (lambda p: write_csv(p, [("a text", 1, 0), ("b text", 2, 1)], header=("text", "x", "y")),
     ["--label-columns", "x,y"], "row 2 has 2 in the label column 'x'; multi-label columns hold 0 or 1"),
    (lambda p: write_csv(p, [("a text", "x;y"), ("b text", "y")], header=("text", "tags")),
     ["--label-column", "tags", "--label-delimiter", ","], "no row of 'tags' holds the delimiter ','"),
    (lambda p: write_csv(p, [("a text", "x,,y"), ("b text", "y")], header=("text", "tags")),
     ["--label-column", "tags", "--label-delimiter", ","], "row 1 has an empty label name in 'x,,y'"),
    (lambda p: write_csv(p, [("a text", 0, 0), ("b text", 0, 0)], header=("text", "x", "y")),
     ["--label-columns", "x,y"], "no row has any label"),
    (lambda p: write_csv(p, [("a text", "x"), ("b text", "z")], header=("text", "tags")),
     ["--label-column", "tags", "--label-delimiter", ",", "--labels", "x,y"], "row 2 has unknown label 'z'"),
])
def test_bad_multi_label_data_fails_before_the_model_loads(tiny_model_dir, tmp_path, capsys, monkeypatch, write,
                                                           flags, message):
    from lightune import models
    from lightune.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_base_model", no_model)
    data = write(tmp_path / "bad.csv")
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--problem", "multi_label",
                 "--output-dir", str(tmp_path / "runs"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lightune: error:") and message in err and "\n" not in err


# -- loss, thresholds, metrics ------------------------------------------------------------------------------------

def test_multi_label_loss_is_the_hand_computed_binary_cross_entropy_and_transformers_own():
    from transformers import BertConfig, BertForSequenceClassification

    from lightune.objectives import multi_label_loss

    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 0.8, -2.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    p = torch.sigmoid(logits)
    by_hand = -(labels * p.log() + (1 - labels) * (1 - p).log()).mean()
    torch.testing.assert_close(multi_label_loss(logits, labels, labels.numel()), by_hand)
    # the chunks of a batch add up to its mean
    halves = multi_label_loss(logits[:1], labels[:1], labels.numel()) + multi_label_loss(logits[1:], labels[1:],
                                                                                         labels.numel())
    torch.testing.assert_close(halves, by_hand)
    # the loss transformers computes for a multi_label_classification model
    config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                        num_labels=3, problem_type="multi_label_classification")
    model = BertForSequenceClassification(config).eval()
    out = model(input_ids=torch.tensor([[1, 5, 2], [1, 7, 2]]), labels=labels)
    torch.testing.assert_close(out.loss, multi_label_loss(out.logits, labels, labels.numel()))


def f1_at(threshold: float, probabilities: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return f1_score(labels, (probabilities >= threshold).astype(int), zero_division=0)


def test_tuned_thresholds_maximise_validation_f1():
    from lightune.evaluation import tune_thresholds

    # label 0: positives score 0.2-0.4 (a low threshold is best); label 1: negatives score up to 0.8
    probabilities = np.array([[0.30, 0.90], [0.20, 0.85], [0.40, 0.95], [0.05, 0.80], [0.10, 0.60], [0.02, 0.10]])
    labels = np.array([[1, 1], [1, 1], [1, 1], [0, 0], [0, 0], [0, 0]])
    thresholds = tune_thresholds(probabilities, labels)
    grid = np.linspace(0, 1, 201)
    for j, threshold in enumerate(thresholds):
        best = max(f1_at(t, probabilities[:, j], labels[:, j]) for t in grid)
        assert f1_at(threshold, probabilities[:, j], labels[:, j]) == pytest.approx(best) == 1.0
    assert f1_at(0.5, probabilities[:, 0], labels[:, 0]) == 0.0 and thresholds[0] <= 0.2
    assert 0.8 < thresholds[1] <= 0.85
    assert tune_thresholds(probabilities, np.zeros_like(labels)) == [0.5, 0.5]  # no positives: the default


def test_multi_label_metrics_are_scikit_learns():
    from lightune.evaluation import score

    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    logits = torch.tensor([[3.0, -3.0], [3.0, -3.0], [-3.0, 3.0], [3.0, -3.0]])  # rows 1 and 3 are exactly right
    m = score(logits, labels, 2, ["x", "y"])
    assert m["subset_accuracy"] == m["accuracy"] == 0.5
    # x: tp 2, fp 1 -> P 2/3, R 1; y: tp 1, fn 1 -> P 1, R 1/2; micro: tp 3, fp 1, fn 1
    assert m["per_class"]["x"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["per_class"]["y"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["f1_micro"] == pytest.approx(0.75) and m["f1"] == m["f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2)
    # a threshold per label moves the decision: y at 0.01 predicts y on every row
    assert score(logits, labels, 2, ["x", "y"], [0.5, 0.01])["per_class"]["y"]["recall"] == 1.0


# -- a tiny run end to end ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def multi_label_run(tiny_model_dir, tmp_path_factory):
    from lightune.config import load_config
    from lightune.training import run_training

    root = tmp_path_factory.mktemp("multi-label")
    data = tags_csv(root / "tags.csv", toy_rows(500, seed=1))
    cfg = load_config(overrides=dict(
        model=str(tiny_model_dir), data=str(data), label_column="tags", problem="multi_label", label_delimiter=",",
        tune_thresholds=True, train_size=None, eval_size=None, max_length=32, epochs=3, batch_size=16,
        learning_rate=1e-2, output_dir=str(root / "runs"), run_name="ml", head_init="random"))
    return run_training(cfg, progress=False)


TEXTS = ["great wonderful the movie", "awful boring", "the plot was", "delightful excellent moving"]


def test_a_tiny_model_learns_a_separable_multi_label_set(multi_label_run):
    metrics = multi_label_run.metrics
    assert metrics["config"]["problem"] == "multi_label" and metrics["data"]["label_names"] == sorted(LABELS)
    test = metrics["test"]
    # chance: predicting every label gives micro F1 about 2/3, guessing gives 1/8 subset accuracy
    assert test["f1_micro"] > 0.75 and test["subset_accuracy"] > 0.35, test
    assert test["subset_accuracy"] > metrics["base"]["subset_accuracy"] + 0.2, (test, metrics["base"])
    assert set(test["per_class"]) == set(LABELS) and "confusion_matrix" not in test
    assert set(metrics["thresholds"]) == set(LABELS) and all(0 <= t <= 1 for t in metrics["thresholds"].values())
    report = (multi_label_run.run_dir / "report.md").read_text()
    assert "Subset accuracy" in report and "Multi-label thresholds" in report


def test_a_multi_label_run_measures_its_calibration_but_fits_no_temperature(multi_label_run):
    from lightune.calibration import NOT_FITTED_MULTI_LABEL
    from lightune.runs import read_run

    metrics = multi_label_run.metrics
    cal = metrics["calibration"]
    assert cal["temperature"] == 1.0 and cal["fitted_on"] is None and cal["not_fitted"] == NOT_FITTED_MULTI_LABEL
    assert cal["ece_before"] == cal["ece_after"] == pytest.approx(metrics["test"]["ece"])  # the mean over labels
    assert 0 <= cal["ece_before"] < 0.5
    # the reliability bins pool every (text, label) probability of the test split
    assert sum(cal["reliability_before"]["count"]) == metrics["data"]["sizes"]["test"] * len(LABELS)
    assert read_run(multi_label_run.run_dir).temperature == 1.0
    assert "no temperature (multi-label run" in (multi_label_run.run_dir / "report.md").read_text()


def test_predict_returns_the_label_set_and_each_probability(multi_label_run):
    from lightune.inference import Classifier, predict

    out = predict(TEXTS, multi_label_run.run_dir)
    assert len(out) == len(TEXTS) and all(set(p) == {"text", "labels", "probabilities"} for p in out)
    logits = Classifier(multi_label_run.run_dir).logits(TEXTS)
    thresholds = multi_label_run.metrics["thresholds"]
    names = multi_label_run.metrics["data"]["label_names"]
    for p, row in zip(out, torch.sigmoid(logits).tolist()):
        assert list(p["probabilities"].values()) == pytest.approx(row)
        assert p["labels"] == [n for n, q in zip(names, row) if q >= thresholds[n]]
    # each cue text's own label is its most probable one
    for p, label in zip(out, ("happy", "sad", None, "funny")):
        if label:
            assert max(p["probabilities"], key=p["probabilities"].get) == label, p


def test_stock_peft_reloads_the_multi_label_adapter_with_identical_logits(multi_label_run):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lightune.inference import Classifier

    adapter = multi_label_run.run_dir / "adapter"
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForSequenceClassification.from_pretrained(base_path, num_labels=3,
                                                              problem_type="multi_label_classification")
    stock = PeftModel.from_pretrained(base, adapter).eval()
    assert stock.config.problem_type == "multi_label_classification"
    enc = AutoTokenizer.from_pretrained(adapter)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        stock_logits = stock(**enc).logits
    ours = Classifier(multi_label_run.run_dir, merge=False)
    assert ours.model.config.problem_type == "multi_label_classification"
    torch.testing.assert_close(ours.logits(TEXTS), stock_logits, rtol=1e-5, atol=1e-5)


def test_serve_returns_label_sets(multi_label_run):
    from fastapi.testclient import TestClient

    from lightune.inference import predict
    from lightune.serving import AdapterRegistry, Limits, create_app

    registry = AdapterRegistry()
    registry.add("ml", multi_label_run.run_dir)
    body = TestClient(create_app(registry, Limits())).post("/predict", json={"texts": TEXTS}).json()
    expected = predict(TEXTS, multi_label_run.run_dir)
    assert [p["labels"] for p in body["predictions"]] == [p["labels"] for p in expected]
    assert all("label" not in p for p in body["predictions"])
    for served, local in zip(body["predictions"], expected):
        assert served["probabilities"] == pytest.approx(local["probabilities"], abs=1e-5)


def test_evaluate_a_multi_label_run_reproduces_its_test_metrics(multi_label_run, tmp_path, capsys):
    from lightune.cli import main

    assert main(["evaluate", str(multi_label_run.run_dir), "--output-dir", str(tmp_path / "ev")]) == 0
    out = tmp_path / "ev" / "ml-on-tags-test"
    result = json.loads((out / "metrics.json").read_text())
    test = multi_label_run.metrics["test"]
    for key in ("subset_accuracy", "f1_micro", "f1_macro", "per_class", "label_confusion_matrices"):
        assert result["metrics"][key] == test[key], key  # the same decisions from the same thresholds
    assert result["thresholds"] == multi_label_run.metrics["thresholds"]
    assert "F1 (micro)" in capsys.readouterr().out and not (out / "confusion_matrix.png").exists()


def test_a_multi_label_probe_head_gives_each_labels_logistic_regression():
    """--head-init probe on multi-hot labels: one logistic regression per label, loaded so that the sigmoid of each
    logit is that regression's probability; a label on every row (or none) is refused."""
    from lightune import heads
    from lightune.errors import ModelError

    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 4))
    labels = np.stack([features[:, 0] > 0, features[:, 1] + features[:, 2] > 0, features[:, 3] > 0.5], 1).astype(float)
    probe = heads.fit_probe(features, labels, 3)
    model = types.SimpleNamespace(classifier=torch.nn.Linear(4, 3))  # final_linear reads model.classifier
    heads.set_head_from_probe(model, probe)
    with torch.no_grad():
        ours = torch.sigmoid(model.classifier(torch.tensor(features, dtype=torch.float32))).numpy()
    expected = np.stack([p[:, 1] for p in probe.predict_proba(features)], 1)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)
    labels[:, 2] = 1.0
    with pytest.raises(ModelError, match="label index 2 is on every row or on none"):
        heads.fit_probe(features, labels, 3)


def test_a_probe_started_run_on_label_columns(tiny_config, tmp_path):
    """The default head start (probe) on 0/1 label columns: the probe alone already reads the cue words."""
    from lightune.training import run_training

    data = columns_csv(tmp_path / "cols.csv", toy_rows(300, seed=2))
    run = run_training(tiny_config(data=str(data), problem="multi_label", label_columns=LABELS, head_init="probe",
                                   pooling="mean", max_steps=2, run_name="probe"), progress=False)
    assert run.metrics["data"]["label_names"] == LABELS and run.metrics["thresholds"] == dict.fromkeys(LABELS, 0.5)
    assert run.metrics["base"]["f1_micro"] > 0.7, run.metrics["base"]


def test_evaluate_a_multi_label_run_on_single_label_data_is_one_line(multi_label_run, capsys):
    from lightune.cli import main

    assert main(["evaluate", str(multi_label_run.run_dir), "--data", "imdb"]) == 2
    err = capsys.readouterr().err.strip()
    assert "multi-label data needs its labels" in err and "\n" not in err


def test_predict_command_prints_each_label_with_its_probability(multi_label_run, capsys):
    from lightune.cli import main

    assert main(["predict", str(multi_label_run.run_dir), "awful boring", "the plot was"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert main(["predict", "--json", str(multi_label_run.run_dir), "awful boring", "the plot was"]) == 0
    predictions = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for line, p in zip(lines, predictions, strict=True):
        chosen = ", ".join(f"{name} {p['probabilities'][name]:.3f}" for name in p["labels"]) or "(no label)"
        assert line == f"{chosen}\t{p['text']}"
    assert "sad" in predictions[0]["labels"]


def test_a_multi_label_run_without_its_thresholds_is_one_model_error(multi_label_run, tmp_path):
    import shutil

    from lightune.errors import ModelError
    from lightune.inference import Classifier

    broken = tmp_path / "broken"
    shutil.copytree(multi_label_run.run_dir, broken)
    metrics = json.loads((broken / "metrics.json").read_text())
    metrics["thresholds"].pop("sad")
    (broken / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ModelError, match="'thresholds' does not give a threshold between 0 and 1 for every label"):
        Classifier(broken)


def test_runs_without_a_problem_are_single_label():
    from lightune.inference import to_predictions
    from lightune.runs import _saved_run

    old = {"saved": "adapter", "config": {"model": "m", "method": "lora"}, "data": {"label_names": ["neg", "pos"]},
           "max_length": 8}
    run = _saved_run(Path("old"), old)
    assert run.problem == "single_label" and run.thresholds is None
    single = to_predictions(["t"], torch.tensor([[0.0, 2.0]]), ["neg", "pos"])
    assert single[0]["label"] == "pos" and sum(single[0]["probabilities"].values()) == pytest.approx(1.0)
