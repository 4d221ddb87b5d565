"""`lightune evaluate`: score a finished run on a data source and write evaluations/<name>/ beside the run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS = ("test", "all")
# data options that default to the run's own only when the source is the run's own data
SOURCE_OPTIONS = ("text_column", "label_column", "label_names", "label_columns", "label_delimiter")
# data options that default to the run's for any source: how its test split was carved and sized
SPLIT_OPTIONS = ("eval_size", "validation_fraction", "test_fraction", "split_seed")


@dataclass
class EvaluationOptions:
    """What to evaluate and where to write it; None means the run's own setting (see resolve)."""

    run_dir: str
    data: str | None = None
    split: str = "test"
    text_column: str | None = None
    label_column: str | None = None
    label_names: list[str] | None = None
    label_columns: list[str] | None = None  # a multi-label run's source: 0/1 columns, or
    label_delimiter: str | None = None  # one delimited column
    eval_size: int | None = None
    validation_fraction: float | None = None
    test_fraction: float | None = None
    split_seed: int | None = None
    all_rows: bool = False  # eval_size was given as 'all'
    output_dir: str | None = None  # None: evaluations/ beside the run directory
    name: str | None = None  # None: <run>-on-<source>-<split>
    device: str = "auto"
    truncation: str | None = None  # None: the run's


def _source_stem(spec: str) -> str:
    return spec[4:].replace("/", "-") if spec.startswith("hub:") else Path(spec).stem


def resolve(options: EvaluationOptions, run_config: dict[str, Any]) -> EvaluationOptions:
    """options with every None data setting taken from the run's configuration, validated (ConfigError)."""
    from .config import TrainConfig, check_directory_name, from_dict
    from .errors import ConfigError

    if options.split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}; got {options.split!r}")
    data = options.data or run_config.get("data", TrainConfig.data)
    own = data == run_config.get("data")
    values = {"data": data}
    for key in SOURCE_OPTIONS + SPLIT_OPTIONS:
        given = getattr(options, key)
        if given is not None:
            values[key] = given
        elif key in SPLIT_OPTIONS or own:
            values[key] = run_config.get(key, getattr(TrainConfig, key))
    # a source's labels are read the run's way: multi-hot rows for a multi-label run (data.load_multi_label)
    values["problem"] = run_config.get("problem", "single_label")
    if values["problem"] == "single_label" and (options.label_columns or options.label_delimiter):
        raise ConfigError("--label-columns and --label-delimiter are for multi-label runs; this run is single-label")
    if options.all_rows or (options.split == "all" and options.eval_size is None):
        values["eval_size"] = None
    values["output_dir"] = options.output_dir or str(Path(options.run_dir).parent / "evaluations")
    # the training configuration's checks for these settings: numbers in range, usable texts and label names,
    # an output directory that is not inside a run
    checked = from_dict(values)
    values.pop("problem")
    resolved = dataclasses.replace(options, **{k: getattr(checked, k) for k in (*values, *SOURCE_OPTIONS)})
    resolved.name = options.name or f"{Path(options.run_dir).name}-on-{_source_stem(data)}-{options.split}"
    check_directory_name("name", resolved.name)
    return resolved


@dataclass
class EvaluationResult:
    out_dir: Path
    result: dict


def run_evaluation(options: EvaluationOptions, progress: bool = True, run=None) -> EvaluationResult:
    """Check the run and the options, load the data, then the model; score it and write the evaluation. `run`: the
    run of options.run_dir when the caller has read it already (runs.read_run), so it is read once."""
    import time

    from . import data as data_mod
    from .calibration import apply_temperature
    from .evaluation import score
    from .inference import Classifier, check_finite_weights
    from .reporting import write_evaluation_outputs
    from .runs import free_output_dir, read_run, staged_run_dir

    run = run or read_run(options.run_dir)  # an unfinished or damaged run fails here, before the data
    check_finite_weights(run)  # so does a broken one
    explicit_name = options.name is not None
    options = resolve(options, run.config)
    final = free_output_dir(Path(options.output_dir), options.name, explicit=explicit_name)
    rows, info = data_mod.evaluation_rows(
        options.data, run.label_names, options.split, options.text_column, options.label_column,
        options.label_names, options.eval_size, options.validation_fraction, options.test_fraction,
        options.split_seed, options.label_columns, options.label_delimiter)
    classifier = Classifier(run, device=options.device, truncation=options.truncation)
    start = time.perf_counter()
    logits = classifier.logits(list(rows["text"]))
    seconds = time.perf_counter() - start
    import torch

    # probabilities as the run predicts them: its logits divided by its temperature (the loss and ECE depend on it)
    scored = score(apply_temperature(logits, run.temperature), torch.tensor(rows["label"]), len(classifier.label_names),
                   classifier.label_names, classifier.thresholds)
    scored.update(examples=len(rows), seconds=seconds, samples_per_s=len(rows) / seconds)
    result = {
        "name": final.name,
        "run_dir": str(run.run_dir),
        "run_name": run.run_dir.name,
        "model": run.model,
        "method": run.method,
        "pooling": run.pooling,
        "max_length": classifier.max_length,
        "truncation": classifier.truncation,
        "temperature": run.temperature,
        "problem": classifier.problem,
        **({"thresholds": dict(zip(classifier.label_names, classifier.thresholds))} if classifier.thresholds else {}),
        "device": classifier.device.type,
        "data": info,
        "metrics": scored,
        "run_test": run.test_as_predicted,
    }
    with staged_run_dir(final) as work:
        write_evaluation_outputs(work, result)
    return EvaluationResult(final, result)
