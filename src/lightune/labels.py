"""Labels: their names and class indices, the checks of a source's classes (stray values, too few rows), and
multi-label rows (0/1 columns or one delimited column -> multi-hot vectors)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
from datasets import ClassLabel, Dataset

from .errors import DataError
from .sources import PACKAGED_SOURCES, read_file

_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")
# A label with fewer rows than RARE_LABEL_ROWS that is also under RARE_LABEL_SHARE of the rows, or with fewer
# than MIN_LABEL_ROWS (too few for train, validation and test), looks like a stray value: refused unless allowed.
RARE_LABEL_ROWS = 10
RARE_LABEL_SHARE = 0.01
MIN_LABEL_ROWS = 3


def resolve_label_names(labels: list[Any], given: list[str] | None, known: list[str] | None, where: str = "data",
                        allow_unusual: bool = False) -> list[str]:
    """Label names in class-index order: given by the user, known to the source, or derived from the labels.

    Derived names: 0..max for integer labels, else the sorted values; numbers mixed with names are refused
    unless allow_unusual (a stray `1` among `neg`/`pos` would become a class of its own).
    """
    if given:
        return list(given)
    if known:
        return list(known)
    if None in labels:
        raise DataError(f"{where}: row {labels.index(None) + 1} has no label")
    values = set(labels)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        if min(values) < 0:
            raise DataError(f"integer labels must be >= 0; found {min(values)}")
        return [str(i) for i in range(max(values) + 1)]
    is_number = [isinstance(v, (int, float)) or bool(_NUMBER.fullmatch(str(v))) for v in labels]
    if any(is_number) and not all(is_number) and not allow_unusual:
        rows = sorted((is_number.index(True), is_number.index(False)))
        raise DataError(f"{where}: labels mix numbers and names ({', '.join(f'row {i + 1}: {labels[i]!r}' for i in rows)}); "
                        "use one kind, or pass --allow-unusual-labels")
    return sorted(str(v) for v in values)


def encode_labels(ds: Dataset, label_names: list[str], where: str) -> Dataset:
    """Map labels (names or class indices) to class indices; DataError on an unknown label."""
    index = {name: i for i, name in enumerate(label_names)}
    encoded = []
    for row, value in enumerate(ds["label"]):
        if isinstance(value, bool) or value is None:
            raise DataError(f"{where}: row {row + 1} has no usable label ({value!r})")
        if isinstance(value, int) and str(value) not in index:
            if not 0 <= value < len(label_names):
                raise DataError(f"{where}: row {row + 1} has unknown label {value!r} (labels: {', '.join(label_names)})")
            encoded.append(value)
        elif str(value) in index:
            encoded.append(index[str(value)])
        else:
            raise DataError(f"{where}: row {row + 1} has unknown label {value!r} (labels: {', '.join(label_names)})")
    ds = ds.remove_columns("label").add_column("label", encoded)
    return ds.cast_column("label", ClassLabel(names=list(label_names)))


def check_classes(ds: Dataset, label_names: list[str], where: str, allow_unusual: bool = False) -> None:
    """DataError when the training labels make no sense: fewer than two labels with rows (always), or unless
    allow_unusual, a label name without rows or a label so rare that it looks like a stray value (rows named)."""
    labels = list(ds["label"])
    counts = Counter(labels)
    present = [name for i, name in enumerate(label_names) if counts[i]]
    if len(present) < 2:
        raise DataError(f"{where}: every row has the label {present[0]!r}; a classifier needs rows of at least "
                        "two labels")
    if allow_unusual:
        return
    for i, name in enumerate(label_names):
        if 0 < counts[i] < MIN_LABEL_ROWS or 0 < counts[i] < min(RARE_LABEL_ROWS, RARE_LABEL_SHARE * len(labels)):
            rows = [str(row + 1) for row, label in enumerate(labels) if label == i]
            raise DataError(f"{where}: the label {name!r} has only {counts[i]} of {len(labels)} rows "
                            f"(row{'s' if len(rows) > 1 else ''} {', '.join(rows)}); a stray value? Fix the data, "
                            "or pass --allow-unusual-labels")
    unused = [name for i, name in enumerate(label_names) if not counts[i]]
    if unused:
        raise DataError(f"{where}: no row has the label(s) {', '.join(map(repr, unused))} (labels: "
                        f"{', '.join(label_names)}); check --labels, or pass --allow-unusual-labels")


def check_training_split(ds: Dataset, label_names: list[str], where: str, train_size: int | None = None,
                         allow_unusual: bool = False) -> None:
    """DataError unless the training split drawn from a source (--train-size) holds what the source's checks ask:
    rows of at least two labels (always), and unless allow_unusual, rows of every label (multi-label: each label
    on some row)."""
    n = len(ds)
    drawn = f"{where}: the training split ({n} row{'' if n == 1 else 's'}" + (
        f", --train-size {train_size})" if train_size is not None else ")")
    if is_multi_label(ds):
        counts = [sum(column) for column in zip(*ds["label"])] or [0] * len(label_names)
        if not any(counts):
            raise DataError(f"{drawn} has no row with a label; raise --train-size")
    else:
        present = Counter(ds["label"])
        counts = [present[i] for i in range(len(label_names))]
        if sum(1 for count in counts if count) < 2:
            only = [name for name, count in zip(label_names, counts) if count]
            raise DataError(f"{drawn} has rows of the label {only[0]!r} only; a classifier needs rows of at least two "
                            f"labels: raise --train-size" if only else f"{drawn} has no rows: raise --train-size")
    unused = [name for name, count in zip(label_names, counts) if not count]
    if unused and not allow_unusual:
        raise DataError(f"{drawn} has no row of the label(s) {', '.join(map(repr, unused))} (labels: "
                        f"{', '.join(label_names)}); raise --train-size, or pass --allow-unusual-labels")


def deduplicate(ds: Dataset) -> Dataset:
    """Keep the first row of each distinct text; drop texts that appear with different labels."""
    first_row: dict[str, int] = {}
    conflicting: set[str] = set()
    for i, (text, label) in enumerate(zip(ds["text"], ds["label"])):
        if text in first_row:
            if ds[first_row[text]]["label"] != label:
                conflicting.add(text)
        else:
            first_row[text] = i
    keep = sorted(i for text, i in first_row.items() if text not in conflicting)
    return ds.select(keep)


MULTI_HOT = datasets.Sequence(datasets.Value("float32"))  # a multi-label row: 1.0 for each of its labels, else 0.0
COMMON_DELIMITERS = (",", ";", "|", "/")


def is_multi_label(ds: Dataset) -> bool:
    """True when ds's labels are multi-hot rows (multi-label data) rather than class indices."""
    return not isinstance(ds.features["label"], ClassLabel)


def _binary(value: Any, where: str, row: int, column: str) -> float:
    """A 0/1 cell of a multi-label column as 0.0 or 1.0; DataError naming the row for anything else."""
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return float(value)
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return float(value)
    raise DataError(f"{where}: row {row} has {value!r} in the label column {column!r}; multi-label columns hold "
                    "0 or 1")


def split_label_sets(values: list[Any], delimiter: str, where: str, column: str) -> list[list[str]]:
    """Each row's label names from a delimited column (an empty cell: a text without labels); DataError for a
    value that is not text, an empty name ('a,,b'), or a delimiter that occurs in no row while the names hold
    another common one."""
    sets = []
    for row, value in enumerate(values, 1):
        if value is None or (isinstance(value, str) and not value.strip()):
            sets.append([])
            continue
        if isinstance(value, int) and not isinstance(value, bool):  # a column of single numeric names
            value = str(value)
        if not isinstance(value, str):
            raise DataError(f"{where}: row {row} has {value!r} in the label column {column!r}; expected label "
                            f"names separated by {delimiter!r}")
        names = [name.strip() for name in value.split(delimiter)]
        if "" in names:
            raise DataError(f"{where}: row {row} has an empty label name in {value!r} (names separated by "
                            f"{delimiter!r}); check --label-delimiter")
        sets.append(names)
    if all(len(names) <= 1 for names in sets):
        other = next((d for d in COMMON_DELIMITERS if d != delimiter and any(d in n for s in sets for n in s)), None)
        if other is not None:
            row = next(i for i, s in enumerate(sets, 1) if any(other in n for n in s))
            raise DataError(f"{where}: no row of {column!r} holds the delimiter {delimiter!r}, but row {row} has "
                            f"{values[row - 1]!r}; is --label-delimiter {other!r} meant?")
    return sets


def load_multi_label(spec: str, text_column: str, label_column: str, label_columns: list[str] | None,
                     delimiter: str | None, label_names: list[str] | None, known_names: list[str] | None = None
                     ) -> tuple[Dataset, list[str]]:
    """A multi-label file as (text and multi-hot label columns, label names in column order).

    label_columns: one 0/1 column per label (named by the columns, or by label_names in the same order); else
    label_column holds each row's label names separated by delimiter (names: label_names, known_names, or the
    sorted names found).
    """
    path = Path(spec)
    if spec in PACKAGED_SOURCES or spec.startswith("hub:"):
        raise DataError(f"{spec} is single-label data; multi-label data comes from a .csv, .tsv, .jsonl, .json or "
                        ".parquet file")
    if not path.is_file():
        raise DataError(f"data not found: {spec!r} is not a file")
    ds = read_file(path)
    columns = list(label_columns or [label_column])
    missing = [c for c in [text_column, *columns] if c not in ds.column_names]
    if missing:
        raise DataError(f"{path} has no column {', '.join(map(repr, missing))} (columns: "
                        f"{', '.join(ds.column_names)}); set --text-column and --label-columns or --label-column")
    if label_columns:
        names = list(label_names or label_columns)
        cells = [ds[c] for c in label_columns]
        hot = [[_binary(cells[j][i], spec, i + 1, c) for j, c in enumerate(label_columns)] for i in range(len(ds))]
    else:
        sets = split_label_sets(ds[label_column], delimiter, spec, label_column)
        names = list(label_names or known_names or sorted({name for names in sets for name in names}))
        index = {name: i for i, name in enumerate(names)}
        hot = []
        for row, found in enumerate(sets, 1):
            unknown = [name for name in found if name not in index]
            if unknown:
                raise DataError(f"{spec}: row {row} has unknown label {unknown[0]!r} (labels: {', '.join(names)})")
            hot.append([1.0 if name in found else 0.0 for name in names])
    ds = ds.select_columns([text_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    return ds.add_column("label", hot).cast_column("label", MULTI_HOT), names


def check_label_sets(ds: Dataset, label_names: list[str], where: str, allow_unusual: bool = False) -> None:
    """DataError when multi-label training data makes no sense: fewer than two labels, or (unless allow_unusual) a
    label that no row has."""
    if len(label_names) < 2:
        raise DataError(f"{where}: multi-label data needs at least two labels; found "
                        f"{', '.join(label_names) or 'none'}")
    counts = [sum(column) for column in zip(*ds["label"])]
    unused = [name for name, count in zip(label_names, counts) if not count]
    if len(unused) == len(label_names):
        raise DataError(f"{where}: no row has any label; multi-label data needs rows with labels")
    if unused and not allow_unusual:
        raise DataError(f"{where}: no row has the label(s) {', '.join(map(repr, unused))} (labels: "
                        f"{', '.join(label_names)}); check the data, or pass --allow-unusual-labels")
