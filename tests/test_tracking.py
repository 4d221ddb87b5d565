"""--report-to: a run's steps, evaluations and plots, read back with TensorBoard's and MLflow's own readers, equal its
metrics.json; bad tracker names and trackers that are not installed are one line."""

from __future__ import annotations

import pytest

from lightune.cli import main
from lightune.training import run_training


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory):
    """One tracked run, read back by both trackers' tests (the tests only read it)."""
    from conftest import synthetic_reviews, tiny_settings, write_csv

    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        cfg = tiny_settings(tiny_model_dir, write_csv(root / "reviews.csv", synthetic_reviews(400)), root / "runs",
                            report_to=["tensorboard", "mlflow"], epochs=1, eval_steps=4, run_name="tracked")
        return cfg, run_training(cfg, progress=False)


def test_tensorboard_logs_equal_metrics_json(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = tracked_run
    metrics = run.metrics
    events_dir = run.run_dir / "tensorboard" / "lightune"  # <run>/tensorboard/<project>
    board = EventAccumulator(str(events_dir), size_guidance={"scalars": 0, "images": 0}).Reload()
    losses = [e.value for e in board.Scalars("train/loss")]
    assert [e.step for e in board.Scalars("train/loss")] == list(range(1, metrics["training"]["steps"] + 1))
    assert losses == pytest.approx(metrics["training"]["step_losses"], rel=1e-6)
    assert all(e.value > 0 for e in board.Scalars("train/grad_norm"))
    assert len(board.Scalars("train/learning_rate")) == metrics["training"]["steps"]
    validation = {e.step: e.value for e in board.Scalars("validation/accuracy")}
    assert validation == pytest.approx({h["step"]: h["validation"]["accuracy"] for h in metrics["history"]})
    assert board.Scalars("test/accuracy")[-1].value == pytest.approx(metrics["test"]["accuracy"])
    assert board.Scalars("base/accuracy")[-1].value == pytest.approx(metrics["base"]["accuracy"])
    assert {"plots/history", "plots/before_after"} <= set(board.Tags()["images"])


def test_mlflow_store_under_the_output_dir_equals_metrics_json(tracked_run):
    from mlflow.tracking import MlflowClient

    cfg, run = tracked_run
    metrics = run.metrics
    client = MlflowClient(tracking_uri=f"sqlite:///{run.run_dir.parent.absolute() / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "lightune"]
    (found,) = client.search_runs([experiment.experiment_id], f"tags.mlflow.runName = '{run.run_dir.name}'")
    history = client.get_metric_history(found.info.run_id, "validation/loss")
    assert {m.step: m.value for m in history} == pytest.approx(
        {h["step"]: h["validation"]["loss"] for h in metrics["history"]})
    assert client.get_metric_history(found.info.run_id, "test/f1")[-1].value == pytest.approx(metrics["test"]["f1"])
    assert found.data.params["rank"] == str(cfg.rank) and found.data.params["resolved/pooling"] == metrics["pooling"]
    assert {a.path for a in client.list_artifacts(found.info.run_id, "plots")} >= {"plots/history.png",
                                                                                   "plots/before_after.png"}
    assert list((run.run_dir.parent / "mlruns").rglob("history.png"))  # artifacts beside the runs, not in the cwd


def test_without_report_to_nothing_is_logged(trained_tiny_run):
    assert not (trained_tiny_run.run_dir / "tensorboard").exists()
    assert not (trained_tiny_run.run_dir.parent / "mlflow.db").exists()


@pytest.mark.parametrize("value, message", [
    ("tensorbored", "report_to: unknown tracker 'tensorbored'; choose none or from tensorboard, mlflow"),
    ("clearml", "report_to clearml: the clearml package is not installed; pip install clearml"),
])
def test_a_bad_or_missing_tracker_is_one_line(value, message, capsys, tmp_path):
    assert main(["train", "--report-to", value, "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lightune: error: {message}")


def test_report_to_none_is_no_tracker():
    from lightune.tracking import check_report_to

    pytest.importorskip("tensorboard")
    assert check_report_to(["none"]) is None and check_report_to(None) is None and check_report_to([]) is None
    assert check_report_to([" TensorBoard", "tensorboard"]) == ["tensorboard"]
