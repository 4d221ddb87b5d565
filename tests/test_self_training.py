"""Self-training on unlabelled texts (--unlabeled): reading them (overlap with the splits dropped and counted, bad
sources refused in one line), the class-balanced selection of pseudo-labels, the rounds of a run, and the rule that
a run with unlabelled texts never ends below the same run without them on validation."""

import json

import numpy as np
import pytest
import torch

from conftest import synthetic_reviews, write_csv
from lightune import data, self_training
from lightune.config import load_config
from lightune.errors import ConfigError, DataError
from lightune.training import run_training


def unlabelled_file(path, texts):
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


def test_texts_of_the_splits_are_dropped_counted_and_said_in_one_line(tiny_config, tmp_path, capsys):
    cfg = tiny_config(unlabeled=str(tmp_path / "u.txt"), unlabeled_size=None)
    splits = data.build_splits(cfg)
    test, val, train = list(splits.test["text"]), list(splits.validation["text"]), list(splits.train["text"])
    new = [f"an unseen review {i} loved it" for i in range(5)]
    # split texts come back as a user would paste them: other spaces, an HTML break; cleaning finds them all the same
    lines = ([f"  {t}  " for t in test[:3]] + [t.replace(" ", "<br />", 1) for t in val[:2]] + train[:1]
             + new + [new[0], "", "   "])
    unlabelled_file(tmp_path / "u.txt", lines)
    pool = self_training.read_unlabeled(cfg, splits)
    assert sorted(pool.texts) == sorted(new) and pool.labels is None
    assert pool.counts == {"read": len(lines) + 1, "blank": 3, "test": 3, "validation": 2, "train": 1, "repeated": 1,
                           "used": 5}  # the file's last line break leaves one empty line more
    assert capsys.readouterr().out.splitlines() == [
        f"unlabelled texts: read {len(lines) + 1} from {cfg.unlabeled}; dropped 3 in the test split, 2 in validation, "
        "1 in train, 1 repeated, 3 blank; using 5"]
    # a seeded order, cut at --unlabeled-size
    small = self_training.read_unlabeled(tiny_config(unlabeled=cfg.unlabeled, unlabeled_size=2), splits)
    assert small.texts == pool.texts[:2] == self_training.read_unlabeled(cfg, splits).texts[:2]
    assert small.counts["used"] == 2


def test_a_csv_column_of_texts_is_read(tiny_config, tmp_path):
    path = write_csv(tmp_path / "u.csv", [("a fine film 1", 3), ("a dull film 2", 4)], header=("review", "n"))
    cfg = tiny_config(unlabeled=str(path), unlabeled_column="review")
    pool = self_training.read_unlabeled(cfg, data.build_splits(cfg))
    assert sorted(pool.texts) == ["a dull film 2", "a fine film 1"]


@pytest.mark.parametrize("name, content, column, message", [
    ("missing.txt", None, None, "unlabelled texts not found: '{path}' is neither a file nor 'packaged'"),
    ("empty.txt", "", None, "{path} holds no texts"),
    ("blank.txt", "\n  \n<br />\n", None, "{path} holds no texts"),
    ("binary.txt", b"PK\x03\x04\x00\x00", None, "{path} is not UTF-8 text: a NUL byte at line 1 (byte offset 4)"),
    ("numbers.csv", "text,n\n1,2\n3,4\n", None, "{path}: the column 'text' holds int values, not texts (row 1: 1); "
                                                "set --unlabeled-column"),
    ("other.csv", "review\ngood\n", None, "{path} has no column 'text' (columns: review); set --unlabeled-column"),
    ("header.csv", "text\n", None, "{path} has a header but no rows"),
    ("texts.docx", "x", None, "unsupported unlabelled file type '.docx' for {path} (use .txt, one text a line, or "
                              ".csv, .tsv, .jsonl, .json, .parquet with a text column)"),
])
def test_bad_unlabelled_sources_are_one_line(tiny_config, tmp_path, name, content, column, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    cfg = tiny_config(unlabeled=str(path))
    with pytest.raises(DataError) as err:
        self_training.read_unlabeled(cfg, data.build_splits(cfg))
    assert str(err.value) == message.format(path=path)


def test_a_source_of_split_texts_only_is_refused(tiny_config, tmp_path):
    cfg = tiny_config(unlabeled=str(tmp_path / "u.txt"))
    splits = data.build_splits(cfg)
    unlabelled_file(tmp_path / "u.txt", list(splits.test["text"])[:4] + list(splits.train["text"])[:2])
    with pytest.raises(DataError) as err:
        self_training.read_unlabeled(cfg, splits)
    assert str(err.value) == (f"--unlabeled {cfg.unlabeled}: none of its 7 texts is left once the texts of the "
                              "run's splits and repeats are dropped (4 in the test split, 0 in validation, 2 in "
                              "train, 0 repeated, 1 blank); give texts the run does not use")


@pytest.mark.parametrize("overrides, message", [
    ({"unlabeled": "u.txt", "problem": "multi_label", "label_columns": ["a", "b"]},
     "--unlabeled (self-training on pseudo-labels) is for single-label data; multi-label runs cannot use it"),
    ({"unlabeled": "packaged", "data": "reviews.csv"},
     "--unlabeled packaged takes the texts of --data imdb or rotten_tomatoes outside the run's splits; with --data "
     "reviews.csv give a file of texts (.txt one a line, or .csv, .tsv, .jsonl, .json, .parquet with a text column)"),
    ({"self_training_rounds": 2, "unlabeled_size": 10},
     "--unlabeled-size, --self-training-rounds are for self-training; add --unlabeled SOURCE (a file of texts, or "
     "packaged)"),
    ({"unlabeled": "u.txt", "self_training_rounds": 0}, "self_training_rounds must be >= 1; got 0"),
    ({"unlabeled": "u.txt", "unlabeled_size": 0}, "unlabeled_size must be >= 1; got 0"),
    ({"validation_labels": "some"}, "validation_labels must be one of auto, given, separate; got 'some'"),
])
def test_self_training_settings_are_checked_before_anything_loads(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert str(err.value) == message


def test_the_packaged_data_list_is_the_sources_own():
    from lightune.config import PACKAGED_DATA
    from lightune.sources import PACKAGED_SOURCES

    assert PACKAGED_DATA == PACKAGED_SOURCES


def test_selection_is_the_most_confident_and_balanced_over_labels():
    probabilities = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55], [0.99, 0.01], [0.3, 0.7],
                                  [0.1, 0.9]])
    indices, labels = self_training.select_balanced(probabilities, per_label=2)
    assert indices.tolist() == [4, 0, 6, 2] and labels.tolist() == [0, 0, 1, 1]
    # no more of a label than the least predicted label has: 3 predicted 0, 4 predicted 1
    indices, labels = self_training.select_balanced(probabilities, per_label=10)
    assert np.bincount(labels).tolist() == [3, 3] and indices.tolist() == [4, 0, 1, 6, 2, 5]
    # a label nobody is predicted as: nothing
    assert len(self_training.select_balanced(torch.tensor([[0.9, 0.1], [0.8, 0.2]]), per_label=1)[0]) == 0
    # round r of R keeps r / (R + 1) of the texts it scored, spread over the labels
    assert [self_training.per_label_counts(600, r, 3, 2) for r in (1, 2, 3)] == [75, 150, 225]


@pytest.fixture
def unlabelled_reviews(tmp_path):
    rows = synthetic_reviews(300, seed=7)
    return unlabelled_file(tmp_path / "unlabelled.txt", [f"{text} more" for text, _ in rows])


def test_a_run_with_unlabelled_texts_trains_rounds_and_records_them(tiny_config, unlabelled_reviews, monkeypatch):
    monkeypatch.setattr(self_training, "ROUND_TEXTS", 120)  # a round scores at most this many of the 300
    cfg = tiny_config(train_size=40, epochs=20, unlabeled=str(unlabelled_reviews), self_training_rounds=2,
                      run_name="unl")
    result = run_training(cfg, progress=False)
    m = json.loads((result.run_dir / "metrics.json").read_text())
    # validation is carved out of the 40 given labels
    assert m["data"]["labelled"] == {"train": 30, "validation": 10, "total": 40, "validation_from": "given"}
    record = m["self_training"]
    assert (record["read"], record["used"], record["blank"]) == (301, 300, 1)
    assert [r["round"] for r in record["rounds"]] == [1, 2] and [r["scored"] for r in record["rounds"]] == [120, 120]
    for r in record["rounds"]:  # as many of each label as round r of 2 keeps: r / 3 of the texts it scored
        expected = self_training.per_label_counts(120, r["round"], 2, 2)
        assert r["pseudo_labels"] == {"neg": expected, "pos": expected}
        assert r["train_examples"] == 30 + 2 * expected and r["steps"] == -(-r["train_examples"] // 16)
    rounds = [h for h in m["history"] if h.get("self_training_round")]
    assert [h["self_training_round"] for h in rounds] == [1, 2]
    assert [h["validation"]["loss"] for h in rounds] == [r["validation"]["loss"] for r in record["rounds"]]
    assert m["training"]["steps"] == rounds[-1]["step"] == rounds[0]["step"] + record["rounds"][1]["steps"]
    # the kept model is the best on validation, never below the run's own
    assert m["best"]["value"] <= record["validation_before"] and m["best"]["metric"] == "loss"
    kept = record["kept_round"]
    assert kept == 0 or next(h for h in m["history"] if h["step"] == m["best"]["step"])["self_training_round"] == kept
    report = (result.run_dir / "report.md").read_text()
    assert f"- Self-training on `{unlabelled_reviews}`: 300 unlabelled texts used of 301 read" in report
    assert "- Labels: 40 in all: 30 to train on, 10 for validation (held out of the given labels)" in report


def test_a_round_is_kept_only_when_no_worse_by_the_metric_and_the_loss():
    best = {"accuracy": 0.625, "loss": 0.74}
    assert self_training.round_is_kept({"accuracy": 0.625, "loss": 0.70}, best, "accuracy")  # a tie: the round
    # one review more on 8 validation texts, but a more confident student of the teacher's mistakes: not kept
    assert not self_training.round_is_kept({"accuracy": 0.875, "loss": 1.06}, best, "accuracy")
    assert not self_training.round_is_kept({"accuracy": 0.5, "loss": 0.5}, best, "accuracy")
    assert self_training.round_is_kept({"accuracy": 0.5, "loss": 0.5}, best, "loss")
    assert not self_training.round_is_kept({"accuracy": 1.0, "loss": float("nan")}, best, "accuracy")


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("seconds", "samples_per_s")}


def test_a_run_never_ends_below_the_same_run_without_unlabelled_texts(tiny_config, unlabelled_reviews, monkeypatch):
    plain = run_training(tiny_config(train_size=40, epochs=20, run_name="plain"), progress=False).metrics
    real = self_training.select_balanced

    def wrong(probabilities, per_label):  # pseudo-labels that are all wrong: every round is worse
        indices, labels = real(probabilities, per_label)
        return indices, 1 - labels

    monkeypatch.setattr(self_training, "select_balanced", wrong)
    m = run_training(tiny_config(train_size=40, epochs=20, unlabeled=str(unlabelled_reviews), run_name="with"),
                     progress=False).metrics
    before = len(plain["history"])
    # the same run up to the rounds
    assert [{**h, "validation": untimed(h["validation"])} for h in m["history"][:before]] == [
        {**h, "validation": untimed(h["validation"])} for h in plain["history"]]
    assert [h["self_training_round"] for h in m["history"][before:]] == [1, 2, 3]
    assert all(h["validation"]["loss"] > plain["best"]["value"] for h in m["history"][before:])
    assert m["self_training"]["kept_round"] == 0 and m["best"] == plain["best"]
    assert untimed(m["test"]) == untimed(plain["test"])  # the same weights back
    assert m["calibration"]["temperature"] == plain["calibration"]["temperature"]


@pytest.mark.e2e
def test_self_training_on_packaged_reviews_with_the_packaged_model(tmp_path):
    cfg = load_config(overrides=dict(data="rotten_tomatoes", train_size=32, eval_size=64, max_length=48, max_steps=5,
                                     unlabeled="packaged", unlabeled_size=240, self_training_rounds=2,
                                     output_dir=str(tmp_path), run_name="u32"))
    m = run_training(cfg, progress=False).metrics
    record = m["self_training"]
    assert m["data"]["labelled"]["total"] == 32 and record["used"] == 240
    assert record["dropped"] == {"test": 0, "validation": 0, "train": 0, "repeated": 0}  # outside every split
    for r, most in zip(record["rounds"], (20, 40)):  # 120 texts a round; r / 3 of them, as many of each label
        assert len(set(r["pseudo_labels"].values())) == 1 and 0 < r["pseudo_labels"]["positive"] <= most
    assert all(0 <= r["agreement"]["selected"] <= 1 for r in record["rounds"])
    assert m["best"]["value"] >= record["validation_before"]  # accuracy: the contrastive run's metric
