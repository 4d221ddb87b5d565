"""`lightune evaluate`: a finished run scored on a data source, written beside the run."""

import json
import shutil

import pytest

from conftest import synthetic_reviews, write_csv
from lightune import inference
from lightune.cli import main


def evaluate(*args) -> int:
    return main(["evaluate", *map(str, args)])


def last_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return lines[-1]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a model starts loading: the error must come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(inference.Classifier, "__init__", refuse)


def test_the_runs_own_test_split_reproduces_its_metrics(trained_tiny_run, tmp_path, capsys):
    run = tmp_path / "runs" / "lora"
    shutil.copytree(trained_tiny_run.run_dir, run)
    assert evaluate(run) == 0
    out = capsys.readouterr().out
    assert "| accuracy |" in out and "the run's own test split" in out
    written = run.parent / "evaluations" / "lora-on-reviews-test"
    assert sorted(p.name for p in written.iterdir()) == ["confusion_matrix.png", "metrics.json", "report.md"]
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in trained_tiny_run.run_dir.iterdir())
    result, own = json.loads((written / "metrics.json").read_text()), trained_tiny_run.metrics
    for key in ("accuracy", "f1", "precision", "recall", "confusion_matrix"):
        assert result["metrics"][key] == own["test"][key], key
    # evaluate scores the probabilities as the run predicts them: its logits divided by its temperature
    assert result["metrics"]["loss"] == pytest.approx(own["calibration"]["test_nll_after"], abs=1e-5)
    assert result["metrics"]["ece"] == pytest.approx(own["calibration"]["ece_after"], abs=1e-6)
    assert result["temperature"] == own["calibration"]["temperature"]
    assert result["data"]["fingerprint"] == own["data"]["fingerprints"]["test"]
    assert f"{own['test']['accuracy']:.4f}" in (written / "report.md").read_text()
    assert evaluate(run) == 0  # a second default evaluation gets a new directory
    assert (run.parent / "evaluations" / "lora-on-reviews-test-2" / "metrics.json").is_file()


def test_another_source_labels_matched_by_name(trained_tiny_run, tmp_path):
    # the same texts with the labels' class indices swapped: names decide, not indices
    rows = [(text, {"neg": "pos", "pos": "neg"}[label]) for text, label in synthetic_reviews(60, seed=9)]
    swapped = write_csv(tmp_path / "swapped.csv", [(t, 1 if lab == "neg" else 0) for t, lab in rows])
    assert evaluate(trained_tiny_run.run_dir, "--data", swapped, "--split", "all", "--labels", "pos,neg",
                    "--output-dir", tmp_path / "ev", "--name", "swapped") == 0
    result = json.loads((tmp_path / "ev" / "swapped" / "metrics.json").read_text())
    assert result["data"]["size"] == 60 and result["data"]["source_label_names"] == ["pos", "neg"]
    assert result["metrics"]["accuracy"] < 0.3  # the texts' sentiment now disagrees with their labels


def test_a_source_with_other_labels_is_one_line_naming_both(trained_tiny_run, tmp_path, capsys, no_model_loads):
    other = write_csv(tmp_path / "other.csv", [(t, {"pos": "good", "neg": "bad"}[lab])
                                               for t, lab in synthetic_reviews(40)])
    assert evaluate(trained_tiny_run.run_dir, "--data", other, "--output-dir", tmp_path / "ev") == 2
    line = last_error_line(capsys)
    assert "has the labels bad, good but the run was trained on neg, pos" in line
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("args, message", [
    (["--split-seed", "-1"], "split_seed must be >= 0"),
    (["--name", "../x"], "name must be a plain directory name"),
    (["--output-dir", "{run}/inside"], "is inside the run directory"),
    (["--data", "no/such.csv"], "data not found"),
    (["--output-dir", "/proc/xyz"], "output_dir /proc/xyz: cannot create a directory in /proc"),
])
def test_bad_options_fail_before_the_model_loads(trained_tiny_run, capsys, no_model_loads, args, message):
    args = [a.replace("{run}", str(trained_tiny_run.run_dir)) for a in args]
    assert evaluate(trained_tiny_run.run_dir, *args) == 2
    assert message in last_error_line(capsys)


def test_an_unfinished_run_is_refused(trained_tiny_run, tmp_path, capsys, no_model_loads):
    unfinished = tmp_path / "lora.incomplete"
    shutil.copytree(trained_tiny_run.run_dir, unfinished)
    (unfinished / "metrics.json").unlink()
    assert evaluate(unfinished) == 2
    assert "is not a finished lightune run" in last_error_line(capsys)
    assert not (tmp_path / "evaluations").exists()
    named = tmp_path / "ev" / "taken"
    named.mkdir(parents=True)
    assert evaluate(trained_tiny_run.run_dir, "--output-dir", tmp_path / "ev", "--name", "taken") == 2
    assert "already exists; choose another --name" in last_error_line(capsys)


@pytest.mark.parametrize("method", ["head", "qlora"])
def test_other_methods_evaluate(shared_tiny_run, method, tmp_path):
    from test_training import method_run

    run = method_run(shared_tiny_run, method)  # the run test_training checks
    assert evaluate(run.run_dir, "--output-dir", tmp_path / "ev") == 0
    result = json.loads((tmp_path / "ev" / f"{method}-on-reviews-test" / "metrics.json").read_text())
    assert result["method"] == method
    assert result["metrics"]["confusion_matrix"] == run.metrics["test"]["confusion_matrix"]


def test_a_source_with_a_subset_of_the_runs_labels_is_scored(trained_tiny_run, tmp_path, capsys):
    """Only 'pos' rows: per-class figures for the label present, no ROC-AUC (one class), the same predictions."""
    rows = [(text, label) for text, label in synthetic_reviews(80, seed=5) if label == "pos"]
    only_pos = write_csv(tmp_path / "only_pos.csv", rows)
    assert evaluate(trained_tiny_run.run_dir, "--data", only_pos, "--split", "all", "--output-dir", tmp_path / "ev",
                    "--name", "pos") == 0
    result = json.loads((tmp_path / "ev" / "pos" / "metrics.json").read_text())
    metrics = result["metrics"]
    assert result["data"]["source_label_names"] == ["pos"] and result["data"]["label_names"] == ["neg", "pos"]
    predicted = inference.Classifier(trained_tiny_run.run_dir, device="cpu").predict([t for t, _ in rows])
    right = sum(p["label"] == "pos" for p in predicted)
    assert metrics["accuracy"] == pytest.approx(right / len(rows))
    assert metrics["confusion_matrix"] == [[0, 0], [len(rows) - right, right]]
    assert list(metrics["per_class"]) == ["pos"] and metrics["per_class"]["pos"]["support"] == len(rows)
    assert metrics["per_class"]["pos"]["recall"] == pytest.approx(right / len(rows))
    assert metrics["recall"] == pytest.approx(right / len(rows))  # macro figures over the labels present
    assert metrics["roc_auc"] is None and metrics["pr_auc"] is None
    assert "| accuracy |" in capsys.readouterr().out
