"""The plan of `lightune tune`: a search file read and validated into a base configuration and a search space;
nothing heavy is imported here (no torch, no optuna), so a bad file fails before anything loads or trains.

A search file (TOML) has three tables:

    [tune]                       # optional
    name = "lora-search"         # default: the file's stem; results go to <output_dir>/<name>/
    output_dir = "runs"
    config = "default.toml"      # optional: a `lightune train --config` file under [base] (relative to this file)
    trials = 20                  # trials finished or pruned, in total over every run of the search
    objectives = ["accuracy"]    # validation accuracy, f1 or loss; with seconds (training time) or memory (peak
                                 # bytes) beside one of them: the Pareto front of accuracy against compute
    pruner = "median"            # median, hyperband or none: stops trials whose validation metric lags
    seed = 0                     # the sampler's seed (TPE)
    startup_trials = 10          # random trials before TPE models the results
    workers = 1                  # trial processes on this machine
    isolate = true               # each trial in a fresh Python process (peak memory its own)

    [base]                       # any TrainConfig fields, shared by every trial
    data = "imdb"
    max_steps = 200

    [search]                     # field -> a range or choices
    learning_rate = {low = 1e-4, high = 1e-2, log = true}
    rank = {choices = [4, 8, 16]}          # or just rank = [4, 8, 16]
    dropout = {low = 0.0, high = 0.3}
    epochs = {low = 1, high = 3, step = 1}
    target_modules = {choices = ["query,value", "all-linear"]}

Each trial is an ordinary run directory `<output_dir>/<name>/runs/trial-<n>`; tune.py runs the study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .compare_plan import FIXED_KEYS, check_setting_keys
from .config import DEFAULTS, TrainConfig, check_directory_name, expand_method, from_dict, read_toml
from .errors import ConfigError

TABLES = {"tune", "base", "search"}
TUNE_KEYS = {"name", "output_dir", "config", "trials", "objectives", "pruner", "seed", "startup_trials", "workers",
             "isolate"}
# objective -> direction; the validation metrics are read from the run's best evaluation, never from test
OBJECTIVES = {"accuracy": "maximize", "f1": "maximize", "loss": "minimize", "seconds": "minimize",
              "memory": "minimize"}
VALIDATION_OBJECTIVES = ("accuracy", "f1", "loss")
PRUNERS = ("median", "hyperband", "none")
# Trials are compared on one validation split: the search cannot vary what decides the data and the split.
DATA_KEYS = (FIXED_KEYS - {"epochs", "max_steps", "batch_size"}) | {"problem", "label_columns", "label_delimiter"}
RANGE_KEYS = {"low", "high", "log", "step"}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Dimension:
    """One searched setting: a range of ints or floats (log scale, step) or a list of choices."""

    key: str
    kind: str  # int, float or choice
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        """The value an optuna trial suggests for this setting."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key} in {{{', '.join(map(str, self.choices))}}}"
        extra = ", log" if self.log else (f", step {self.step:g}" if self.step else "")
        return f"{self.key} in [{self.low:g}, {self.high:g}{extra}]"

    def as_dict(self) -> dict:
        if self.kind == "choice":
            return {"choices": list(self.choices)}
        return {"kind": self.kind, "low": self.low, "high": self.high, "log": self.log, "step": self.step}


def setting_value(key: str, value: Any) -> Any:
    """A searched value as a TrainConfig setting: target_modules "query,value" is a list of names."""
    if key == "target_modules" and isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _check_value(key: str, value: Any, base: TrainConfig, what: str) -> None:
    """ConfigError unless the configuration accepts value for key (on top of the base)."""
    try:
        from_dict({key: setting_value(key, value), "run_name": "trial-0"}, base=base)
    except ConfigError as exc:
        raise ConfigError(f"[search] {key}: {what} {value!r} is refused: {exc}") from None


def _choices(key: str, values: Any, base: TrainConfig) -> Dimension:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"[search] {key}: choices must be a non-empty list; got {values!r}")
    for value in values:
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"[search] {key}: a choice must be a string, number or boolean (a list of module "
                              f"names as one comma-separated string); got {value!r}")
    if len({repr(v) for v in values}) != len(values):
        raise ConfigError(f"[search] {key}: choices list a value twice: {values!r}")
    for value in values:
        _check_value(key, value, base, "choice")
    return Dimension(key, "choice", choices=tuple(values))


def _range(key: str, spec: dict, base: TrainConfig) -> Dimension:
    low, high, log, step = spec.get("low"), spec.get("high"), spec.get("log", False), spec.get("step")
    if not _number(low) or not _number(high):
        raise ConfigError(f"[search] {key}: a range needs numbers low and high; got {spec!r}")
    if low > high:
        raise ConfigError(f"[search] {key}: the range is reversed: low {low!r} > high {high!r}")
    if low == high:
        raise ConfigError(f"[search] {key}: the range is empty: low = high = {low!r} (put a fixed value in [base])")
    if not isinstance(log, bool):
        raise ConfigError(f"[search] {key}: log must be true or false; got {log!r}")
    if step is not None and (not _number(step) or step <= 0):
        raise ConfigError(f"[search] {key}: step must be a positive number; got {step!r}")
    if log and step is not None:
        raise ConfigError(f"[search] {key}: give log or step, not both")
    if log and low <= 0:
        raise ConfigError(f"[search] {key}: a log range needs low > 0; got {low!r}")
    # an integer setting (rank, max_steps) gets integers; a float one (epochs, dropout) floats, whatever the bounds
    ints = not isinstance(DEFAULTS.get(key), float) and all(isinstance(v, int) for v in (low, high, step or 1))
    if step is not None and not math.isclose((high - low) / step, round((high - low) / step), abs_tol=1e-9):
        raise ConfigError(f"[search] {key}: high - low ({high - low:g}) must be a multiple of step {step!r}")
    for bound in (low, high):
        _check_value(key, bound, base, "bound")
    return Dimension(key, "int" if ints else "float", low, high, log, step)


def _dimension(key: str, spec: Any, base: TrainConfig) -> Dimension:
    if isinstance(spec, list):
        return _choices(key, spec, base)
    if not isinstance(spec, dict):
        raise ConfigError(f"[search] {key} must be a range {{low = ..., high = ...}} or {{choices = [...]}}; "
                          f"got {spec!r}")
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices"})
        if extra:
            raise ConfigError(f"[search] {key}: choices take no {', '.join(extra)}")
        return _choices(key, spec["choices"], base)
    unknown = sorted(set(spec) - RANGE_KEYS)
    if unknown:
        raise ConfigError(f"[search] {key}: unknown key(s) {', '.join(unknown)} (a range takes low, high, log, "
                          f"step; a list of values takes choices)")
    return _range(key, spec, base)


@dataclass
class TunePlan:
    name: str
    root: Path  # <output_dir>/<name>
    base: TrainConfig
    base_values: dict[str, Any]  # the settings the file gives (config file and [base]): best.toml starts from them
    search: dict[str, Dimension]
    objectives: list[str]
    trials: int = 20
    pruner: str = "median"
    seed: int = 0
    startup_trials: int = 10
    workers: int = 1
    isolate: bool = True
    spec: dict = field(default_factory=dict)

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[name] for name in self.objectives]

    @property
    def metric(self) -> str:
        """The validation metric the pruner watches and the best trial is chosen by."""
        return next(name for name in self.objectives if name in VALIDATION_OBJECTIVES)

    def settings(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's settings: the base's with its searched values (what best.toml holds)."""
        return {**self.base_values, **expand_method({key: setting_value(key, v) for key, v in params.items()})}

    def trial_config(self, params: dict[str, Any], number: int) -> TrainConfig:
        """The validated configuration of trial `number`, written to runs/trial-<number>."""
        values = {key: setting_value(key, value) for key, value in params.items()}
        return from_dict({**values, "output_dir": str(self.runs_dir), "run_name": f"trial-{number}"},
                         base=self.base)


def _objectives(value: Any, isolate: bool) -> list[str]:
    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"objectives must name one or more of {', '.join(OBJECTIVES)} (e.g. accuracy,seconds); "
                          f"got {value!r}")
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise ConfigError(f"unknown objective(s) {', '.join(unknown)}; choose from {', '.join(OBJECTIVES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"objectives name one twice: {','.join(names)}")
    if not set(names) & set(VALIDATION_OBJECTIVES):
        raise ConfigError(f"objectives {','.join(names)} have no validation metric: add accuracy, f1 or loss "
                          f"(e.g. accuracy,{names[0]})")
    if "memory" in names and not isolate:
        raise ConfigError("the memory objective needs isolated trials ([tune] isolate = true): in one process the "
                          "peak memory of a trial includes the trials before it")
    return names


def _int_option(meta: dict, key: str, default: int, low: int) -> int:
    value = meta.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key} must be an integer >= {low}; got {value!r}")
    return value


def _base_values(meta: dict, base_values: dict, source: Path | None) -> dict[str, Any]:
    """[tune] config (a train config file, relative to the search file) with [base] over it."""
    values: dict[str, Any] = {}
    if meta.get("config") is not None:
        config = meta["config"]
        if not isinstance(config, str) or not config.strip():
            raise ConfigError(f"[tune] config must be the path of a train config file; got {config!r}")
        path = Path(config) if source is None or Path(config).is_absolute() else source.parent / config
        raw = read_toml(path)
        raw = raw.get("train", raw)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: [train] must be a table")
        values.update(expand_method(raw))
    values.update(expand_method(base_values))
    if isinstance(values.get("target_modules"), str):
        values["target_modules"] = setting_value("target_modules", values["target_modules"])
    return values


def plan_from_dict(raw: dict[str, Any], default_name: str = "tune", overrides: dict[str, Any] | None = None,
                   source: Path | None = None) -> TunePlan:
    """Validate a search file (overrides: [tune] settings from the command line); ConfigError (one line) on the first
    problem, before anything is trained."""
    if not isinstance(raw, dict):
        raise ConfigError("a search file must be a table with [base] and [search]")
    unknown = sorted(set(raw) - TABLES)
    if unknown:
        raise ConfigError(f"unknown table(s) in search file: {', '.join(unknown)} (expected [tune], [base], [search])")
    meta, base_raw, search = raw.get("tune", {}), raw.get("base", {}), raw.get("search", {})
    for table, value in (("tune", meta), ("base", base_raw), ("search", search)):
        if not isinstance(value, dict):
            raise ConfigError(f"[{table}] must be a table; got {value!r}")
    meta = {**meta, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    bad = sorted(set(meta) - TUNE_KEYS)
    if bad:
        raise ConfigError(f"unknown [tune] key(s): {', '.join(bad)} (expected {', '.join(sorted(TUNE_KEYS))})")
    name = meta.get("name", default_name)
    check_directory_name("[tune] name", name)
    out = meta.get("output_dir", "runs")
    if not isinstance(out, str) or not out.strip():
        raise ConfigError(f"[tune] output_dir must be a non-empty string; got {out!r}")
    isolate = meta.get("isolate", True)
    if not isinstance(isolate, bool):
        raise ConfigError(f"[tune] isolate must be true or false; got {isolate!r}")
    pruner = meta.get("pruner", "median")
    if pruner not in PRUNERS:
        raise ConfigError(f"[tune] pruner must be one of {', '.join(PRUNERS)}; got {pruner!r}")
    objectives = _objectives(meta.get("objectives", ["accuracy"]), isolate)
    trials, workers = _int_option(meta, "trials", 20, 1), _int_option(meta, "workers", 1, 1)
    seed, startup = _int_option(meta, "seed", 0, 0), _int_option(meta, "startup_trials", 10, 0)

    for table, values in (("base", base_raw), ("search", search)):
        check_setting_keys(table, values, "the search names and places each trial (use [tune] name/output_dir)")
    fixed = sorted(set(search) & DATA_KEYS)
    if fixed:
        raise ConfigError(f"[search] cannot vary {', '.join(fixed)}: every trial is scored on the same data and "
                          f"validation split (set it in [base])")
    if not search:
        raise ConfigError("[search] is empty: give at least one setting to search, e.g. "
                          "learning_rate = {low = 1e-4, high = 1e-2, log = true}")
    base_values = _base_values(meta, base_raw, source)
    base = from_dict(base_values)
    dims = {key: _dimension(key, spec, base) for key, spec in search.items()}
    spec = {"tune": {"name": name, "output_dir": out, "objectives": objectives, "trials": trials, "pruner": pruner,
                     "seed": seed, "startup_trials": startup, "isolate": isolate},
            "base": base_values, "search": {key: dim.as_dict() for key, dim in dims.items()}}
    return TunePlan(name, Path(out) / name, base, base_values, dims, objectives, trials, pruner, seed, startup,
                    workers, isolate, spec)


def load_plan(path: str | Path, overrides: dict[str, Any] | None = None) -> TunePlan:
    """Read and validate a search file; nothing is trained."""
    path = Path(path)
    return plan_from_dict(read_toml(path), default_name=path.stem, overrides=overrides, source=path)
