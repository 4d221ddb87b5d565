import json
import re

import pytest

from conftest import synthetic_reviews, write_csv
from lightune import data, texts
from lightune.config import from_dict
from lightune.errors import DataError


def test_packaged_imdb_split_is_fixed_disjoint_stratified_and_named():
    cfg = from_dict({"data": "imdb", "train_size": 300, "eval_size": 100})
    first, second = data.build_splits(cfg), data.build_splits(cfg)
    assert first.info["fingerprints"] == second.info["fingerprints"]
    assert first.info["split"] == "imdb:seed42:val0.1:test0.1"
    assert first.label_names == ["negative", "positive"]
    texts = [set(getattr(first, s)["text"]) for s in ("train", "validation", "test")]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert [len(t) for t in texts] == [300, 100, 100]
    assert sum(first.train["label"]) == 150 and sum(first.test["label"]) == 50
    assert not any("<br" in t for t in first.train["text"])


def test_full_packaged_split_drops_duplicates_and_covers_all_imdb():
    cfg = from_dict({"data": "imdb", "train_size": None, "eval_size": None})
    splits = data.build_splits(cfg)
    total = sum(splits.info["sizes"].values())
    assert 24_800 < total < 25_000  # 25,000 reviews less the ~100 duplicated texts
    all_texts = list(splits.train["text"]) + list(splits.validation["text"]) + list(splits.test["text"])
    assert len(set(all_texts)) == len(all_texts)


def test_train_on_imdb_test_on_rotten_tomatoes():
    cfg = from_dict({"data": "imdb", "test_data": "rotten_tomatoes", "train_size": 50, "eval_size": 40})
    splits = data.build_splits(cfg)
    assert splits.info["test_source"] == "rotten_tomatoes"
    assert len(splits.test) == 40
    assert max(len(t) for t in splits.test["text"]) < 600  # Rotten Tomatoes snippets, not IMDb reviews
    assert not set(splits.test["text"]) & set(splits.train["text"])


def test_string_labels_and_label_names_from_file(tmp_path):
    path = write_csv(tmp_path / "r.csv", synthetic_reviews(60))
    splits = data.build_splits(from_dict({"data": str(path), "train_size": None, "eval_size": None}))
    assert splits.label_names == ["neg", "pos"]
    ordered = data.build_splits(from_dict({"data": str(path), "label_names": ["pos", "neg"]}))
    assert ordered.label_names == ["pos", "neg"]
    row = ordered.train[0]
    assert ("pos" if row["label"] == 0 else "neg") in {"pos", "neg"}
    first_pos = [r for r in ordered.train if any(w in r["text"] for w in ("great", "superb", "loved"))]
    assert first_pos and all(r["label"] == 0 for r in first_pos if not any(
        w in r["text"] for w in ("awful", "boring", "terrible", "hated", "dull", "poor", "mess", "waste")))


def test_jsonl_and_parquet_with_custom_columns(tmp_path):
    rows = synthetic_reviews(40)
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("\n".join(json.dumps({"review": t, "sentiment": lab}) for t, lab in rows))
    cfg = from_dict({"data": str(jsonl), "text_column": "review", "label_column": "sentiment"})
    assert sum(data.build_splits(cfg).info["sizes"].values()) == 40
    import pandas as pd

    parquet = tmp_path / "r.parquet"
    pd.DataFrame(rows, columns=["review", "sentiment"]).to_parquet(parquet)
    cfg = from_dict({"data": str(parquet), "text_column": "review", "label_column": "sentiment"})
    assert data.build_splits(cfg).label_names == ["neg", "pos"]


@pytest.mark.parametrize(
    "rows, overrides, message",
    [
        (None, {"data": "missing.csv"}, "data not found: 'missing.csv'"),
        ([("good film", "pos")] * 3, {"text_column": "review"}, "has no column 'review'"),
        ([("", "pos"), ("bad", "neg")], {}, "row 1 has an empty text"),
        ([("fine", "pos"), ("  ", "neg")], {}, "row 2 has an empty text"),
        ([("good", "pos"), ("bad", "meh")], {"label_names": ["neg", "pos"]}, "row 2 has unknown label 'meh'"),
        ([("good", "1"), ("bad", "7")], {"label_names": ["neg", "pos"]}, "unknown label"),
    ],
)
def test_bad_files_give_readable_errors(tmp_path, rows, overrides, message):
    values = {"data": str(write_csv(tmp_path / "d.csv", rows)) if rows is not None else "missing.csv"}
    values.update({k: v for k, v in overrides.items() if k != "data"})
    if "data" in overrides:
        values["data"] = overrides["data"]
    with pytest.raises(DataError) as err:
        data.build_splits(from_dict(values))
    assert message in str(err.value)


def _labelled(rows, label_of):
    return [(text, label_of(label)) for text, label in rows]


@pytest.mark.parametrize(
    "rows, overrides, message",
    [
        (_labelled(synthetic_reviews(100), lambda lab: "pos"), {},
         "every row has the label 'pos'; a classifier needs rows of at least two labels"),
        (_labelled(synthetic_reviews(100), lambda lab: int(lab == "pos")), {"label_names": ["a", "b", "c"]},
         "no row has the label(s) 'c' (labels: a, b, c); check --labels, or pass --allow-unusual-labels"),
        (_labelled(synthetic_reviews(100), lambda lab: 0 if lab == "pos" else 2), {},
         "no row has the label(s) '1' (labels: 0, 1, 2)"),
        (synthetic_reviews(400) + [("one odd row", "neutral")], {},
         "the label 'neutral' has only 1 of 401 rows (row 401); a stray value?"),
        (_labelled(synthetic_reviews(400), lambda lab: int(lab == "pos")) + [("odd", 2), ("odd too", 2)], {},
         "the label '2' has only 2 of 402 rows (rows 401, 402)"),
        (synthetic_reviews(50) + [("odd row", "1")], {},
         "labels mix numbers and names (row 1: 'pos', row 51: '1'); use one kind, or pass --allow-unusual-labels"),
    ],
    ids=["one-class", "unused-given-name", "unused-index", "stray-name", "stray-index", "numbers-and-names"],
)
def test_labels_that_make_no_sense_are_refused(tmp_path, rows, overrides, message):
    path = write_csv(tmp_path / "d.csv", rows)
    with pytest.raises(DataError) as err:
        data.build_splits(from_dict({"data": str(path), **overrides}))
    assert str(err.value).startswith(f"{path}: {message}")
    if "every row" in message:  # never allowed
        with pytest.raises(DataError, match="every row has the label"):
            data.build_splits(from_dict({"data": str(path), "allow_unusual_labels": True, **overrides}))
    else:
        allowed = data.build_splits(from_dict({"data": str(path), "allow_unusual_labels": True, **overrides}))
        assert len(allowed.label_names) == 3


def test_a_rare_but_real_label_and_a_test_set_with_one_label_pass(tmp_path):
    rows = synthetic_reviews(200) + [(f"neutral review {i}", "neutral") for i in range(12)]
    splits = data.build_splits(from_dict({"data": str(write_csv(tmp_path / "d.csv", rows))}))
    assert splits.label_names == ["neg", "neutral", "pos"]
    positives = write_csv(tmp_path / "pos.csv", [(t, lab) for t, lab in synthetic_reviews(60, seed=3) if lab == "pos"])
    splits = data.build_splits(from_dict({"data": str(write_csv(tmp_path / "t.csv", synthetic_reviews(100))),
                                          "test_data": str(positives)}))
    assert set(splits.test["label"]) == {splits.label_names.index("pos")}


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("latin.csv", "text,label\ngood film,pos\ncaf\u00e9 bad,neg\n".encode("latin-1"),
         "is not UTF-8 text: byte 0xe9 at line 3 (byte offset 28)"),
        ("binary.csv", b"text,label\n" + bytes(range(256)), "is not UTF-8 text: a NUL byte at line 2 (byte offset 11)"),
        ("binary.tsv", b"\x89PNG\r\n\x1a\n", "is not UTF-8 text: byte 0x89 at line 1 (byte offset 0)"),
        ("bad.jsonl", b'{"text": "a", "label": 1}\n\n{"text": "b", label: 0}\n',
         "line 3 is not valid JSON (column 15: Expecting property name enclosed in double quotes)"),
        ("list.jsonl", b'{"text": "a", "label": 1}\n[1, 2]\n', "line 2 is not a JSON object"),
        ("doc.json", b'[{"text": "a", "label": 1},\n {"text": "b" "label": 0}]', "not valid JSON at line 2, column 15"),
        ("ragged.csv", b"text,label\na,pos\nb,neg,extra,x\n", "Expected 2 fields in line 3, saw 4"),
        ("empty.csv", b"", "is empty"),
        ("header.csv", b"text,label\n", "has a header but no rows"),
        ("header.tsv", b"text\tlabel\r\n\n", "has a header but no rows"),
        ("empty.jsonl", b"\n \n", "holds no records"),
        ("empty.json", b"[]", "holds no records"),
        ("bad.parquet", b"not parquet", "Parquet magic bytes not found"),
    ],
)
def test_unreadable_files_end_in_one_line_with_the_place(tmp_path, capfd, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        data.build_splits(from_dict({"data": str(path)}))
    assert str(path) in str(err.value) and message in str(err.value)
    assert "An error occurred while generating" not in str(err.value)
    assert "Failed to" not in capfd.readouterr().err  # datasets' own log line


def test_invalid_utf8_split_across_read_chunks_is_found(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b"ab\n" + "\u00e9".encode() * 3 + b"\xc3" + b"\n")  # a 2-byte character cut short at the end
    for chunk_bytes in (1, 2, 4, 1 << 20):
        with pytest.raises(DataError, match="byte 0xc3 at line 2 \\(byte offset 9\\)"):
            texts.check_text_file(path, chunk_bytes)
    path.write_bytes("\u00e9\n".encode() * 5)
    for chunk_bytes in (1, 2, 3):
        texts.check_text_file(path, chunk_bytes)


def test_json_document_and_json_lines_with_json_suffix_both_load(tmp_path):
    rows = [{"text": t, "label": lab} for t, lab in synthetic_reviews(30)]
    document, lines = tmp_path / "doc.json", tmp_path / "lines.json"
    document.write_text(json.dumps(rows, indent=2))
    lines.write_text("\n".join(json.dumps(r) for r in rows))
    for path in (document, lines):
        assert sum(data.build_splits(from_dict({"data": str(path)})).info["sizes"].values()) == 30


def test_non_string_text_is_rejected(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "nice", "label": 1}\n{"text": 42, "label": 0}\n')
    with pytest.raises(DataError, match="row 2 has a non-string text"):
        data.build_splits(from_dict({"data": str(path)}))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match="unsupported data file type"):
        data.build_splits(from_dict({"data": str(path)}))


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load hub dataset 'sst2'"):
        data.build_splits(from_dict({"data": "hub:sst2"}))


def test_conflicting_duplicates_are_dropped(tmp_path):
    rows = [("same text", "pos"), ("same text", "neg"), ("twice", "pos"), ("twice", "pos")]
    rows += synthetic_reviews(30)
    ds, names = data.prepare_source(str(write_csv(tmp_path / "d.csv", rows)), "text", "label", None)
    assert "same text" not in ds["text"] and list(ds["text"]).count("twice") == 1


def test_tokenize_adds_lengths_and_truncates(tiny_model_dir):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ds = Dataset.from_dict({"text": ["good film", " ".join(["the"] * 100)], "label": [1, 0]})
    out = data.tokenize(ds, tok, max_length=16)
    assert list(out["length"]) == [4, 16] and "labels" in out.column_names


@pytest.fixture(scope="module")
def rotten_tomatoes_full():
    """The packaged Rotten Tomatoes split with whole evaluation splits, built once for the three sizes below."""
    return data.build_splits(from_dict({"data": "rotten_tomatoes", "train_size": 50, "eval_size": None}))


@pytest.mark.parametrize("missing", [0, 1, 2])
def test_eval_size_just_below_the_split_size(rotten_tomatoes_full, missing):
    full = rotten_tomatoes_full
    n = len(full.test) - missing
    splits = data.build_splits(from_dict({"data": "rotten_tomatoes", "train_size": 50, "eval_size": n}))
    assert len(splits.test) == n and set(splits.test["text"]) <= set(full.test["text"])


def test_the_drawn_training_split_must_hold_rows_of_every_label(tmp_path):
    """The source passes its label checks, the training split drawn from it (--train-size) must too."""
    path = write_csv(tmp_path / "d.csv", synthetic_reviews(100))
    for allowed in (False, True):  # one label: never allowed
        with pytest.raises(DataError) as err:
            data.build_splits(from_dict({"data": str(path), "train_size": 1, "allow_unusual_labels": allowed}))
        assert re.fullmatch(re.escape(f"{path}: the training split (1 row, --train-size 1) has rows of the label ")
                            + "'(neg|pos)'" + re.escape(" only; a classifier needs rows of at least two labels: raise "
                                                        "--train-size"), str(err.value)), str(err.value)
    three = write_csv(tmp_path / "three.csv", synthetic_reviews(200) + [(f"so so {i}", "meh") for i in range(30)])
    with pytest.raises(DataError) as err:
        data.build_splits(from_dict({"data": str(three), "train_size": 2}))
    assert str(err.value) == (f"{three}: the training split (2 rows, --train-size 2) has no row of the label(s) "
                              "'meh' (labels: meh, neg, pos); raise --train-size, or pass --allow-unusual-labels")
    splits = data.build_splits(from_dict({"data": str(three), "train_size": 2, "allow_unusual_labels": True}))
    assert sorted(splits.train["label"]) == [1, 2]


def test_a_multi_label_training_split_must_hold_rows_of_every_label(tmp_path):
    rows = [(text, ["x", "y", ""][i % 3]) for i, (text, _) in enumerate(synthetic_reviews(60))]  # one label a row
    path = write_csv(tmp_path / "multi.csv", rows, header=("text", "tags"))
    settings = {"data": str(path), "problem": "multi_label", "label_column": "tags", "label_delimiter": ","}
    assert len(data.build_splits(from_dict({**settings, "train_size": 10})).train) == 10
    with pytest.raises(DataError, match=r"the training split \(1 row, --train-size 1\) has (no row of the label\(s\) |no "
                                        r"row with a label)"):
        data.build_splits(from_dict({**settings, "train_size": 1}))


def test_a_parquet_file_without_rows_or_with_list_labels_is_one_line(tmp_path):
    import pandas as pd

    empty = tmp_path / "empty.parquet"
    pd.DataFrame({"text": pd.Series([], dtype=str), "label": pd.Series([], dtype=str)}).to_parquet(empty)
    with pytest.raises(DataError) as err:
        data.build_splits(from_dict({"data": str(empty)}))
    assert str(err.value) == f"{empty} has no rows"
    texts = [text for text, _ in synthetic_reviews(40)]
    for name, labels, kind in (("lists", [["pos"], ["neg"]] * 20, "lists"), ("records", [{"a": 1}] * 40, "records")):
        path = tmp_path / f"{name}.parquet"
        pd.DataFrame({"text": texts, "label": labels}).to_parquet(path)
        with pytest.raises(DataError) as err:
            data.build_splits(from_dict({"data": str(path)}))
        assert str(err.value) == (f"{path}: the label column 'label' holds {kind} (row 1: {labels[0]!r}); a "
                                  "single-label source has one label a row, a name or a class index (multi-label data: "
                                  "--problem multi_label with --label-column and --label-delimiter, or --label-columns)")


def test_small_evaluation_splits_are_warned_about_one_line_each():
    from datasets import Dataset

    def split(labels):
        return Dataset.from_dict({"text": [f"t{i}" for i in range(len(labels))], "label": labels})

    big = split([0, 1] * 30)
    assert data.split_warnings(data.SplitData(big, big, big, ["neg", "pos"])) == []
    few = data.SplitData(big, split([0, 1, 1, 1]), split([0, 1] * 30 + [1] * 4), ["neg", "pos"])
    assert data.split_warnings(few) == [
        "the validation split has only 4 rows (under 50): the best checkpoint, the temperature and any thresholds "
        "are chosen on it; give more data or a larger --eval-size / --validation-fraction",
        "the validation split has under 5 rows of some labels (neg 1, pos 3): their scores there are rough"]
    # multi-label: the texts having each label
    hot = split([[1.0, 0.0, 0.0]] * 30 + [[1.0, 1.0, 0.0]] * 25)
    warned = data.split_warnings(data.SplitData(hot, hot, hot, ["a", "b", "c"]))
    assert warned == [f"the {name} split has under 5 rows of some labels (c 0): their scores there are rough"
                      for name in ("validation", "test")]


def test_a_few_shot_run_carves_its_validation_out_of_the_given_labels(tmp_path):
    path = write_csv(tmp_path / "r.csv", synthetic_reviews(400))
    given = data.build_splits(from_dict({"data": str(path), "train_size": 32, "eval_size": 50}))
    separate = data.build_splits(from_dict({"data": str(path), "train_size": 32, "eval_size": 50,
                                            "validation_labels": "separate"}))
    # --train-size 32 means 32 labels in all: a stratified quarter (4 a label) held out of them for validation
    assert given.info["labelled"] == {"train": 24, "validation": 8, "total": 32, "validation_from": "given"}
    assert sorted(given.validation["label"]) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert sorted(given.train["label"]) == [0] * 12 + [1] * 12
    # the same 32 examples as a run with a separate validation split trains on; the same test split
    assert set(given.train["text"]) | set(given.validation["text"]) == set(separate.train["text"])
    assert not set(given.train["text"]) & set(given.validation["text"])
    assert given.info["fingerprints"]["test"] == separate.info["fingerprints"]["test"]
    assert separate.info["labelled"] == {"train": 32, "validation": 40, "total": 72, "validation_from": "separate"}
    assert data.labelled_line(given) == ("labels: 32 in all, 24 to train on and 8 held out of them for validation "
                                         "(--validation-labels given); test is the held-out split")
    # the few validation rows are by design: no warning about their number
    assert not [w for w in data.split_warnings(given) if "validation split" in w]
    again = data.build_splits(from_dict({"data": str(path), "train_size": 32, "eval_size": 50}))
    assert again.info["fingerprints"] == given.info["fingerprints"]  # seeded
    # above the few-shot size (and for --validation-labels separate) validation is a split of its own, as before
    large = data.build_splits(from_dict({"data": str(path), "train_size": 257, "eval_size": 30}))
    assert large.info["labelled"]["validation_from"] == "separate" and len(large.train) == 257
    forced = data.build_splits(from_dict({"data": str(path), "train_size": 257, "validation_labels": "given"}))
    assert forced.info["labelled"] == {"train": 193, "validation": 64, "total": 257, "validation_from": "given"}


def test_too_few_given_labels_to_hold_validation_out(tmp_path):
    path = write_csv(tmp_path / "r.csv", synthetic_reviews(100))
    with pytest.raises(DataError) as err:
        data.build_splits(from_dict({"data": str(path), "train_size": 4, "validation_labels": "given"}))
    assert str(err.value) == (f"{path}: --validation-labels given needs at least 3 of the --train-size 4 labelled "
                              "rows of each label (2 for validation, 1 to train on); raise --train-size, or use "
                              "--validation-labels separate")
    # auto: a separate validation split, and a warning that says so
    splits = data.build_splits(from_dict({"data": str(path), "train_size": 4}))
    assert splits.info["labelled"]["validation_from"] == "separate" and len(splits.train) == 4
    assert data.split_warnings(splits)[0] == (
        "--train-size 4 holds under 3 rows of a label, too few to carve validation rows out of: the validation "
        "split is a separate one (--validation-labels separate), its labels beside the given ones")


def test_multi_label_runs_keep_a_separate_validation_split_unless_asked(tmp_path):
    rows = [(text, ["x", "y", "x,y"][i % 3]) for i, (text, _) in enumerate(synthetic_reviews(90))]
    path = write_csv(tmp_path / "multi.csv", rows, header=("text", "tags"))
    settings = {"data": str(path), "problem": "multi_label", "label_column": "tags", "label_delimiter": ","}
    assert data.build_splits(from_dict({**settings, "train_size": 20})).info["labelled"]["validation_from"] == "separate"
    given = data.build_splits(from_dict({**settings, "train_size": 20, "validation_labels": "given"}))
    assert given.info["labelled"] == {"train": 15, "validation": 5, "total": 20, "validation_from": "given"}


def test_packaged_unlabelled_texts_are_the_sources_rows_outside_every_split():
    settings = {"data": "rotten_tomatoes", "train_size": 32, "eval_size": 100}
    splits = data.build_splits(from_dict({**settings, "unlabeled": "packaged"}))
    assert data.build_splits(from_dict(settings)).unused is None  # read only when asked for
    unused = set(splits.unused["text"])
    whole = data.build_splits(from_dict({"data": "rotten_tomatoes", "train_size": None, "eval_size": None,
                                         "validation_labels": "separate"}))
    assert not unused & (set(splits.train["text"]) | set(splits.validation["text"]) | set(whole.test["text"]))
    # every row of the source is in the whole held-out test split, in the run's 32 labels or unused
    assert len(unused) == len(splits.unused) == sum(whole.info["sizes"].values()) - len(whole.test) - 32
