"""Calibration: the expected calibration error, the temperature fitted on validation, and every reader of a run
(predict, serve, evaluate) applying it; runs from before it predict as they did."""

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import write_csv
from lightune import predict
from lightune.calibration import (ECE_BINS, MAX_TEMPERATURE, MIN_TEMPERATURE, apply_temperature,
                                  expected_calibration_error, fit_temperature, reliability_bins)
from lightune.cli import main
from lightune.errors import ModelError
from lightune.evaluation import score
from lightune.inference import Classifier
from lightune.runs import read_run

TEXTS = ["great superb film loved", "awful boring mess hated", "the plot was brilliant", "dull film and story",
         "movie it was", "wonderful poor"]
LABELS = ["pos", "neg", "pos", "neg", "pos", "neg"]


def synthetic(n: int = 20000, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated logits and labels drawn from their softmax: the right temperature for them is 1."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator) * 2
    labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
    return logits, labels


@pytest.mark.parametrize("temperature", [0.4, 1.0, 2.5, 6.0])
def test_fitting_recovers_a_known_temperature(temperature):
    logits, labels = synthetic()
    # a model whose logits are `temperature` times too large (over-confident for T > 1): dividing by T calibrates
    fitted = fit_temperature(logits * temperature, labels)
    assert fitted == pytest.approx(temperature, rel=0.05)
    nll = lambda t: torch.nn.functional.cross_entropy(logits * temperature / t, labels).item()  # noqa: E731
    assert nll(fitted) <= min(nll(fitted * 0.9), nll(fitted * 1.1))


def test_the_fitted_temperature_stays_in_bounds_when_validation_is_all_right_or_all_wrong():
    logits = torch.tensor([[3.0, -3.0], [-2.0, 2.0], [4.0, 0.0]])
    sharper = fit_temperature(logits, torch.tensor([0, 1, 0]))  # every row right: the optimum is T -> 0
    softer = fit_temperature(logits, torch.tensor([1, 0, 1]))  # every row wrong: T -> infinity
    assert MIN_TEMPERATURE <= sharper < 1 < softer <= MAX_TEMPERATURE


def test_a_temperature_never_changes_the_label_or_the_accuracy():
    logits, labels = synthetic(n=500, classes=4, seed=1)
    plain = score(logits, labels, 4)
    for temperature in (0.05, 0.7, 3.0, 20.0):
        scaled = apply_temperature(logits, temperature)
        assert torch.equal(scaled.argmax(-1), logits.argmax(-1))
        scored = score(scaled, labels, 4)
        for key in ("accuracy", "f1", "confusion_matrix", "roc_auc"):
            assert scored.get(key) == plain.get(key), key


def test_ece_is_the_weighted_gap_between_confidence_and_accuracy():
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]])
    labels = np.array([0, 1, 0, 0])  # right, wrong, right, right
    # bins of width 1/15: {0.6, 0.55} (accuracy 1, confidence 0.575), {0.8} (0 vs 0.8), {0.9} (1 vs 0.9)
    assert expected_calibration_error(probabilities, labels) == pytest.approx(
        2 / 4 * 0.425 + 1 / 4 * 0.8 + 1 / 4 * 0.1)
    bins = reliability_bins(probabilities.max(1), (probabilities.argmax(1) == labels).astype(float))
    assert len(bins["count"]) == ECE_BINS and sum(bins["count"]) == 4
    assert [c for c in bins["confidence"] if c is not None] == pytest.approx([0.575, 0.8, 0.9])
    # multi-label: each label's probability against whether the text has it, averaged over the labels
    multi = np.array([[0.9, 0.2], [0.3, 0.7]])
    hot = np.array([[1, 0], [1, 1]])
    first = 1 / 2 * abs(1 - 0.9) + 1 / 2 * abs(1 - 0.3)
    second = 1 / 2 * abs(0 - 0.2) + 1 / 2 * abs(1 - 0.7)
    assert expected_calibration_error(multi, hot) == pytest.approx((first + second) / 2)


def test_calibrated_synthetic_logits_have_a_small_ece_and_overconfident_ones_a_large_one():
    logits, labels = synthetic()
    assert expected_calibration_error(torch.softmax(logits, -1).numpy(), labels.numpy()) < 0.02
    assert expected_calibration_error(torch.softmax(logits * 4, -1).numpy(), labels.numpy()) > 0.1


def test_a_run_records_its_temperature_and_its_calibration_before_and_after(trained_tiny_run):
    m = trained_tiny_run.metrics
    cal = m["calibration"]
    assert cal["fitted_on"] == "validation" and cal["bins"] == ECE_BINS
    assert read_run(trained_tiny_run.run_dir).temperature == cal["temperature"] != 1.0
    assert cal["ece_before"] == pytest.approx(m["test"]["ece"])  # the test split's ECE at T = 1
    assert cal["validation_nll_after"] <= cal["validation_nll_before"]  # what the temperature minimises
    assert sum(cal["reliability_before"]["count"]) == sum(cal["reliability_after"]["count"]) == m["data"]["sizes"][
        "test"]
    report = (trained_tiny_run.run_dir / "report.md").read_text()
    assert (f"{cal['ece_before']:.4f} before, {cal['ece_after']:.4f} after temperature {cal['temperature']:.3f}"
            in report)
    assert "![reliability](plots/reliability.png)" in report
    assert (trained_tiny_run.run_dir / "plots" / "reliability.png").read_bytes().startswith(b"\x89PNG")


def test_predict_serve_and_evaluate_give_the_softmax_of_the_logits_over_the_temperature(trained_tiny_run, client,
                                                                                        tmp_path):
    run_dir = trained_tiny_run.run_dir
    temperature = read_run(run_dir).temperature
    assert temperature != 1.0
    logits = Classifier(run_dir, device="cpu").logits(TEXTS)
    expected = torch.softmax(logits / temperature, -1)
    assert not torch.allclose(expected, torch.softmax(logits, -1), atol=1e-3)  # the temperature matters here

    def probabilities(predictions):
        return torch.tensor([[p["probabilities"][name] for name in ("neg", "pos")] for p in predictions])

    predicted = predict(TEXTS, run_dir)
    torch.testing.assert_close(probabilities(predicted), expected, atol=1e-6, rtol=0)
    # the label is the logits' arg-max: a temperature changes no prediction, so no accuracy
    assert [p["label"] for p in predicted] == [["neg", "pos"][i] for i in logits.argmax(-1).tolist()]

    from lightune.serving import AdapterRegistry

    registry = AdapterRegistry(device="cpu")
    registry.add("tiny", run_dir)
    _, served = registry.predict(TEXTS, "tiny")
    torch.testing.assert_close(probabilities(served), expected, atol=1e-5, rtol=0)  # unmerged adapter: arithmetic
    # the HTTP route (the batching worker's path; the test server takes 4 texts a request)
    response = client.post("/predict", json={"texts": TEXTS[:4], "adapter": "good"})
    assert response.status_code == 200
    torch.testing.assert_close(probabilities(response.json()["predictions"]), expected[:4], atol=1e-5, rtol=0)

    source = write_csv(tmp_path / "six.csv", list(zip(TEXTS, LABELS)))
    assert main(["evaluate", str(run_dir), "--data", str(source), "--split", "all", "--output-dir",
                 str(tmp_path / "ev"), "--name", "six"]) == 0
    result = json.loads((tmp_path / "ev" / "six" / "metrics.json").read_text())
    classes = torch.tensor([["neg", "pos"].index(label) for label in LABELS])
    assert result["temperature"] == temperature
    assert result["metrics"]["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits / temperature, classes).item(), abs=1e-5)
    assert result["metrics"]["accuracy"] == pytest.approx((logits.argmax(-1) == classes).sum().item() / len(LABELS))


def without_calibration(run_dir, dest):
    """A copy of a run as lightune wrote it before calibration: no "calibration" in metrics.json."""
    shutil.copytree(run_dir, dest)
    metrics = json.loads((dest / "metrics.json").read_text())
    del metrics["calibration"]
    (dest / "metrics.json").write_text(json.dumps(metrics))
    return dest


def test_an_old_run_without_calibration_predicts_the_plain_softmax(trained_tiny_run, tmp_path):
    old = without_calibration(trained_tiny_run.run_dir, tmp_path / "old")
    assert read_run(old).temperature == 1.0
    classifier = Classifier(old, device="cpu")
    plain = torch.softmax(classifier.logits(TEXTS), -1)
    got = torch.tensor([[p["probabilities"][n] for n in ("neg", "pos")] for p in classifier.predict(TEXTS)])
    torch.testing.assert_close(got, plain, atol=1e-6, rtol=0)
    new = Classifier(trained_tiny_run.run_dir, device="cpu").predict(TEXTS)
    assert [p["label"] for p in new] == [p["label"] for p in classifier.predict(TEXTS)]


@pytest.mark.parametrize("value", [0, -1.5, "2", None, True])
def test_a_damaged_temperature_is_one_line(trained_tiny_run, tmp_path, capsys, value):
    damaged = tmp_path / "damaged"
    shutil.copytree(trained_tiny_run.run_dir, damaged)
    metrics = json.loads((damaged / "metrics.json").read_text())
    metrics["calibration"]["temperature"] = value
    (damaged / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(ModelError, match=r"'calibration.temperature' is .*, not a positive number"):
        read_run(damaged)
    assert main(["predict", str(damaged), "great film"]) == 2
    assert "not a positive number" in capsys.readouterr().err


def test_no_temperature_is_fitted_on_a_handful_of_validation_texts():
    """A few-shot run validates on 8 of its own labels: a temperature fitted there would swing between the bounds
    (all right: probabilities of 1), so below MIN_FIT_ROWS the run keeps T = 1 and says why."""
    from lightune.calibration import MIN_FIT_ROWS, calibrate, summary_line

    logits, labels = synthetic()
    sharp = logits * 4  # over-confident: with enough validation texts the fitted temperature softens them
    enough = calibrate((sharp[:MIN_FIT_ROWS], labels[:MIN_FIT_ROWS]), (sharp, labels))
    assert enough["fitted_on"] == "validation" and enough["temperature"] > 1.5
    few = calibrate((sharp[:8], labels[:8]), (sharp, labels))
    assert few["temperature"] == 1.0 and few["fitted_on"] is None and few["ece_after"] == few["ece_before"]
    assert few["test_nll_after"] == few["test_nll_before"]  # scored at T = 1, as predict and evaluate do
    assert few["not_fitted"].startswith(f"the validation split has 8 texts (under {MIN_FIT_ROWS})")
    assert summary_line(few) == f"calibration on test: ECE {few['ece_before']:.4f} (validation too small: no temperature)"
