"""Datasets: a source (sources.py) with its labels (labels.py) -> clean, seeded train/validation/test splits, and
the tokenized copies training reads."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from datasets import ClassLabel, Dataset, Value

from .config import PACKAGED_UNLABELED
from .errors import DataError
from .forward import encode_texts
from .labels import (MULTI_HOT, check_classes, check_label_sets, check_training_split, deduplicate, encode_labels,
                     is_multi_label, load_multi_label, resolve_label_names)
from .sources import PACKAGED_SOURCES, load_source
from .texts import check_texts, clean_text


@dataclass
class SplitData:
    """The three splits (columns: text, label as int) with the label names and a description of the split."""

    train: Dataset
    validation: Dataset
    test: Dataset
    label_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    # the training source's rows that no split uses, its held-out test part apart (--unlabeled packaged only)
    unused: Dataset | None = None
    warnings: list[str] = field(default_factory=list)  # what building the splits warns about (split_warnings)


def prepare_source(spec: str, text_column: str, label_column: str, label_names: list[str] | None,
                   known_names: list[str] | None = None, allow_unusual_labels: bool = False,
                   check_labels: bool = True, label_columns: list[str] | None = None,
                   label_delimiter: str | None = None) -> tuple[Dataset, list[str]]:
    """Load, validate, clean, encode and de-duplicate one source.

    known_names: the training source's label names, for a test source (whose labels may be a subset);
    without them this is a training source and its labels must pass check_classes (unless not check_labels).
    label_columns or label_delimiter: multi-label data (load_multi_label), its labels multi-hot rows.
    """
    if label_columns or label_delimiter:
        ds, names = load_multi_label(spec, text_column, label_column, label_columns, label_delimiter, label_names,
                                     known_names)
        check_texts(ds["text"], spec)
        ds = ds.map(lambda b: {"text": [clean_text(t) for t in b["text"]]}, batched=True)
        if known_names is None and check_labels:
            check_label_sets(ds, names, spec, allow_unusual_labels)
        return deduplicate(ds), names
    ds, source_names = load_source(spec, text_column, label_column)
    check_texts(ds["text"], spec)
    names = resolve_label_names(list(ds["label"]), label_names, known_names or source_names, spec,
                                allow_unusual_labels)
    ds = ds.map(lambda b: {"text": [clean_text(t) for t in b["text"]]}, batched=True)
    ds = encode_labels(ds, names, spec)
    if known_names is None and check_labels:
        check_classes(ds, names, spec, allow_unusual_labels)
    return deduplicate(ds), names


def _stratified_take(ds: Dataset, n: int | None, seed: int) -> Dataset:
    """A seeded, label-stratified subsample of n rows (all rows when n is None or >= len)."""
    if n is None or n >= len(ds):
        return ds
    if is_multi_label(ds):  # no class column to stratify on (see carve_splits)
        return ds.shuffle(seed=seed).select(range(n))
    n_classes = len(set(ds["label"]))
    if n < n_classes or len(ds) - n < n_classes:  # too few rows on one side to stratify: a seeded shuffle
        return ds.shuffle(seed=seed).select(range(n))
    return ds.train_test_split(train_size=n, stratify_by_column="label", seed=seed)["train"]


def carve_splits(ds: Dataset, validation_fraction: float, test_fraction: float, seed: int) -> dict[str, Dataset]:
    """Fixed, seeded, stratified train/validation/test split of one de-duplicated dataset."""
    if len(ds) < 10:
        raise DataError(f"need at least 10 distinct labelled texts to split; got {len(ds)}")
    # datasets stratifies by one class column: multi-hot labels (multi-label data) get a seeded random split
    if is_multi_label(ds):
        stratify = None
    else:
        stratify = "label" if min(ds.to_pandas()["label"].value_counts()) >= 3 else None
    rest_test = ds.train_test_split(test_size=test_fraction, stratify_by_column=stratify, seed=seed)
    val_share = validation_fraction / (1 - test_fraction)
    train_val = rest_test["train"].train_test_split(test_size=val_share, stratify_by_column=stratify, seed=seed)
    return {"train": train_val["train"], "validation": train_val["test"], "test": rest_test["test"]}


def fingerprint(ds: Dataset) -> str:
    """A short hash of a split's texts and labels, so results name the exact examples they were measured on."""
    digest = hashlib.sha256()
    for text, label in sorted(zip(ds["text"], ds["label"])):
        digest.update(f"{label}\t{text}\n".encode())
    return digest.hexdigest()[:12]


def _drop_texts(ds: Dataset, texts: set[str]) -> Dataset:
    return ds.filter(lambda b: [t not in texts for t in b["text"]], batched=True)


# validation carved out of the given labels (--validation-labels given): this share of them, at least
# GIVEN_VALIDATION_MIN_PER_LABEL of each label, and at least one of each left to train on
GIVEN_VALIDATION_SHARE = 0.25
GIVEN_VALIDATION_MIN_PER_LABEL = 2


def validation_from_given(cfg) -> bool:
    """Whether the run's validation labels are carved out of its train_size labelled examples (see TrainConfig)."""
    if cfg.validation_labels != "auto":
        return cfg.validation_labels == "given"
    from .objectives import FEW_SHOT_MAX_EXAMPLES

    return cfg.problem == "single_label" and cfg.train_size is not None and cfg.train_size <= FEW_SHOT_MAX_EXAMPLES


def hold_out_validation(ds: Dataset, seed: int) -> tuple[Dataset, Dataset] | None:
    """(train, validation) of the given labelled rows: per label, a seeded GIVEN_VALIDATION_SHARE of its rows
    (rounded, at least GIVEN_VALIDATION_MIN_PER_LABEL) for validation and the rest (at least one) for training;
    multi-hot rows: a seeded share of them. None when a label has too few rows for that."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if is_multi_label(ds):
        order = rng.permutation(len(ds))
        n_val = max(GIVEN_VALIDATION_MIN_PER_LABEL, round(GIVEN_VALIDATION_SHARE * len(ds)))
        if len(ds) - n_val < 1:
            return None
        return ds.select(sorted(order[n_val:].tolist())), ds.select(sorted(order[:n_val].tolist()))
    labels = np.asarray(ds["label"])
    held = []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        n_val = max(GIVEN_VALIDATION_MIN_PER_LABEL, round(GIVEN_VALIDATION_SHARE * len(rows)))
        if len(rows) - n_val < 1:
            return None
        held.extend(rows[:n_val].tolist())
    chosen = set(held)
    return ds.select([i for i in range(len(ds)) if i not in chosen]), ds.select(sorted(held))


def _given_validation(drawn: Dataset, cfg, where: str) -> tuple[Dataset, Dataset] | None:
    """The drawn labelled rows split into (train, validation), or None (auto, too few rows: a separate split);
    DataError when --validation-labels given cannot hold validation rows out."""
    parts = hold_out_validation(drawn, cfg.split_seed)
    if parts is None and cfg.validation_labels == "given":
        least = GIVEN_VALIDATION_MIN_PER_LABEL + 1
        raise DataError(f"{where}: --validation-labels given needs at least {least} of the --train-size "
                        f"{cfg.train_size} labelled rows of each label ({GIVEN_VALIDATION_MIN_PER_LABEL} for "
                        f"validation, 1 to train on); raise --train-size, or use --validation-labels separate")
    return parts


def _unused_rows(carved: dict[str, Dataset], used: dict[str, Dataset]) -> Dataset:
    """The rows of the carved train and validation splits that the run's splits do not hold (the carved test
    split is held out whole)."""
    from datasets import concatenate_datasets

    return _drop_texts(concatenate_datasets([carved["train"], carved["validation"]]),
                       set(used["train"]["text"]) | set(used["validation"]["text"]) | set(used["test"]["text"]))


def build_splits(cfg) -> SplitData:
    """The train/validation/test data a TrainConfig asks for (see README, 'Data' and 'Few-shot')."""
    multi = {"label_columns": cfg.label_columns, "label_delimiter": cfg.label_delimiter}
    train_source, names = prepare_source(cfg.data, cfg.text_column, cfg.label_column, cfg.label_names,
                                         allow_unusual_labels=cfg.allow_unusual_labels, **multi)
    carved = carve_splits(train_source, cfg.validation_fraction, cfg.test_fraction, cfg.split_seed)
    splits = dict(carved)
    test_spec = cfg.test_data or cfg.data
    if cfg.test_data and cfg.test_data != cfg.data:
        test_source, test_names = prepare_source(cfg.test_data, cfg.text_column, cfg.label_column,
                                                 cfg.label_names, known_names=names, **multi)
        if test_names != names:
            raise DataError(f"{cfg.test_data} has labels {test_names}, but {cfg.data} has {names}")
        if cfg.test_data in PACKAGED_SOURCES or cfg.test_data.startswith("hub:"):
            test_source = carve_splits(test_source, cfg.validation_fraction, cfg.test_fraction, cfg.split_seed)["test"]
        seen = set(splits["train"]["text"]) | set(splits["validation"]["text"])
        splits["test"] = _drop_texts(test_source, seen)
    splits["train"] = _stratified_take(splits["train"], cfg.train_size, cfg.split_seed)
    check_training_split(splits["train"], names, cfg.data, cfg.train_size, cfg.allow_unusual_labels)
    given = _given_validation(splits["train"], cfg, cfg.data) if validation_from_given(cfg) else None
    warnings = []
    if given is not None:
        splits["train"], splits["validation"] = given
        check_training_split(splits["train"], names, cfg.data, cfg.train_size, cfg.allow_unusual_labels)
    else:
        if validation_from_given(cfg):  # auto, and too few rows of a label to hold some out
            warnings.append(f"--train-size {cfg.train_size} holds under {GIVEN_VALIDATION_MIN_PER_LABEL + 1} rows "
                            "of a label, too few to carve validation rows out of: the validation split is a "
                            "separate one (--validation-labels separate), its labels beside the given ones")
        splits["validation"] = _stratified_take(splits["validation"], cfg.eval_size, cfg.split_seed)
    splits["test"] = _stratified_take(splits["test"], cfg.eval_size, cfg.split_seed)
    info = {
        "train_source": cfg.data,
        "test_source": test_spec,
        "split": f"{cfg.data}:seed{cfg.split_seed}:val{cfg.validation_fraction:g}:test{cfg.test_fraction:g}",
        "sizes": {name: len(part) for name, part in splits.items()},
        "fingerprints": {name: fingerprint(part) for name, part in splits.items()},
        "label_names": names,
        # the labels the run learnt and chose from (test apart): validation from the given ones, or separate
        "labelled": {"train": len(splits["train"]), "validation": len(splits["validation"]),
                     "total": len(splits["train"]) + len(splits["validation"]),
                     "validation_from": "given" if given is not None else "separate"},
    }
    unused = _unused_rows(carved, splits) if cfg.unlabeled == PACKAGED_UNLABELED else None
    return SplitData(splits["train"], splits["validation"], splits["test"], names, info, unused, warnings)


def labelled_line(splits: SplitData) -> str:
    """One line for the log: the labels the run uses to train and to validate, and where the latter come from."""
    n = splits.info["labelled"]
    if n["validation_from"] == "given":
        return (f"labels: {n['total']} in all, {n['train']} to train on and {n['validation']} held out of them for "
                "validation (--validation-labels given); test is the held-out split")
    return (f"labels: {n['train']} to train on and {n['validation']} of a separate validation split "
            f"({n['total']} in all; --validation-labels separate); test is the held-out split")


# below these, the validation and test splits are warned about: a checkpoint, a temperature or thresholds chosen on
# a few dozen texts (and an accuracy measured on them: one text of 40 is 2.5 points) are rough
FEW_ROWS = 50
FEW_ROWS_PER_LABEL = 5


def split_warnings(splits: SplitData) -> list[str]:
    """One line per evaluation split that is small: under FEW_ROWS rows, or under FEW_ROWS_PER_LABEL rows of a
    label (texts that have it, for multi-label data)."""
    uses = {"validation": "the best checkpoint, the temperature and any thresholds are chosen on it",
            "test": "its accuracy is a rough estimate"}
    out = list(splits.warnings)
    given = splits.info.get("labelled", {}).get("validation_from") == "given"
    for name, use in uses.items():
        if name == "validation" and given:  # a few of the given labels by design (labelled_line says so)
            continue
        part = getattr(splits, name)
        if len(part) < FEW_ROWS:
            out.append(f"the {name} split has only {len(part)} rows (under {FEW_ROWS}): {use}; give more data or a "
                       f"larger --eval-size / --{name}-fraction")
        counts = label_counts(part, len(splits.label_names))
        few = [f"{label} {n}" for label, n in zip(splits.label_names, counts) if n < FEW_ROWS_PER_LABEL]
        if few:
            out.append(f"the {name} split has under {FEW_ROWS_PER_LABEL} rows of some labels ({', '.join(few)}): "
                       f"their scores there are rough")
    return out


def label_counts(ds: Dataset, n_labels: int) -> list[int]:
    """Rows per label: of each class index, or of texts having each label (multi-hot rows)."""
    counts = [0] * n_labels
    for label in ds["label"]:
        for i in (range(n_labels) if isinstance(label, list) else [label]):
            counts[i] += bool(label[i]) if isinstance(label, list) else 1
    return counts


def match_labels(ds: Dataset, names: list[str], run_names: list[str], where: str) -> Dataset:
    """ds with its labels (class indices into names) mapped by name onto run_names' indices; DataError naming
    both sets when the source has a label the run does not know."""
    unknown = [name for name in names if name not in run_names]
    if unknown:
        raise DataError(f"{where} has the labels {', '.join(names)} but the run was trained on "
                        f"{', '.join(run_names)}; labels are matched by name (--labels names a source's classes "
                        "in index order)")
    if is_multi_label(ds):  # each row's multi-hot values in the run's label order (a label the source lacks: 0)
        ds = ds.map(lambda b: {"label": [[row[names.index(n)] if n in names else 0.0 for n in run_names]
                                         for row in b["label"]]}, batched=True)
        return ds.cast_column("label", MULTI_HOT)
    index = [run_names.index(name) for name in names]
    # as plain integers first: the source's ClassLabel may know fewer classes than the run (a subset of its labels)
    ds = ds.cast_column("label", Value("int64"))
    ds = ds.map(lambda b: {"label": [index[label] for label in b["label"]]}, batched=True)
    return ds.cast_column("label", ClassLabel(names=list(run_names)))


def evaluation_rows(spec: str, run_names: list[str], split: str, text_column: str = "text",
                    label_column: str = "label", label_names: list[str] | None = None, eval_size: int | None = None,
                    validation_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 42,
                    label_columns: list[str] | None = None, label_delimiter: str | None = None
                    ) -> tuple[Dataset, dict[str, Any]]:
    """The rows `lightune evaluate` scores, labelled with the run's class indices, and a description of them.

    split "test": the source's test split, carved as training carves it (the same split seed and fractions give
    the same rows); "all": every distinct row. eval_size takes a seeded stratified subsample, as in training.
    """
    ds, names = prepare_source(spec, text_column, label_column, label_names, check_labels=False,
                               label_columns=label_columns, label_delimiter=label_delimiter)
    ds = match_labels(ds, names, run_names, spec)
    described = "all"
    if split == "test":
        ds = carve_splits(ds, validation_fraction, test_fraction, split_seed)["test"]
        described = f"{spec}:seed{split_seed}:val{validation_fraction:g}:test{test_fraction:g}:test"
    ds = _stratified_take(ds, eval_size, split_seed)
    info = {"source": spec, "split": described, "size": len(ds), "fingerprint": fingerprint(ds),
            "source_label_names": names, "label_names": list(run_names)}
    return ds, info


def tokenize(ds: Dataset, tokenizer, max_length: int, truncation: str = "head") -> Dataset:
    """Tokenized copy (no padding: batches are padded on the fly) with a `length` column for grouping."""
    def encode(batch):
        enc = encode_texts(tokenizer, batch["text"], max_length, truncation)
        enc["length"] = [len(ids) for ids in enc["input_ids"]]
        return enc

    out = ds.map(encode, batched=True, remove_columns=["text"], desc="tokenizing")
    return out.rename_column("label", "labels")
