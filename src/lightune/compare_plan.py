"""The plan of `lightune compare`: a comparison file read and validated into cells, each a TrainConfig; nothing
heavy is imported here, so a bad file fails before torch loads.

A comparison file (TOML, or YAML when PyYAML is installed) has three tables:

    [compare]                # optional
    name = "lora-vs-qlora"   # default: the file's stem
    output_dir = "runs"      # results go to <output_dir>/<name>/
    isolate = true           # each cell in a fresh Python process (peak memory per cell); false: in-process

    [base]                   # any TrainConfig fields, shared by every cell
    data = "imdb"
    train_size = 600

    [grid]                   # field -> list of values; every combination is one cell
    rank = [4, 16, 32]
    target_modules = ["query", "query,value", "all-linear"]   # a comma string is a list of module names
    method = ["lora", "qlora"]   # or peft = [...] and quantize = [...]: method names both (qlora: lora on nf4)
    seed = [1, 2, 3]

A grid value may also be a table of settings applied together, named by its `label`:
`method = ["lora", {label = "rslora", method = "lora", rslora = true}, "ia3"]`.

Each cell is named after its grid values (`rank=4_method=qlora_seed=1`); compare.py trains them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import SETTING_NAMES, TrainConfig, from_dict, read_toml
from .errors import ConfigError

COMPARE_KEYS = {"name", "output_dir", "isolate"}
TABLES = {"compare", "base", "grid"}
# Grid keys that would give cells different data, a different split or a different number of steps.
FIXED_KEYS = {
    "data", "test_data", "text_column", "label_column", "label_names", "train_size", "eval_size",
    "validation_fraction", "test_fraction", "split_seed", "epochs", "max_steps", "batch_size",
}
# Set per cell by the comparison itself.
RESERVED_KEYS = {"run_name", "output_dir"}


def _targets(value: Any, where: str) -> list[str] | None:
    """target_modules: a list of names, or one comma-separated string ("query,value"; "all-linear")."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts:
            raise ConfigError(f"{where}: target_modules {value!r} names no module")
        return parts
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value]
    raise ConfigError(f"{where}: target_modules must be a comma-separated string or a list of names; got {value!r}")


def _normalise(key: str, value: Any, where: str) -> Any:
    if isinstance(value, dict):  # several settings at once, named by their label
        label = value.get("label")
        if not isinstance(label, str) or not label.strip():
            raise ConfigError(f"{where}: a table of settings needs a label (a name for the table); got {value!r}")
        settings = {k: v for k, v in value.items() if k != "label"}
        bad = sorted((set(settings) - SETTING_NAMES) | (set(settings) & (FIXED_KEYS | RESERVED_KEYS)))
        if bad:
            raise ConfigError(f"{where}: table {label!r} cannot set {', '.join(bad)}")
        return {"label": label, **{k: _normalise(k, v, where) for k, v in settings.items()}}
    if key in ("target_modules", "label_names"):
        return _targets(value, where) if key == "target_modules" else (
            [v.strip() for v in value.split(",")] if isinstance(value, str) else value)
    return value


def check_setting_keys(table: str, values: dict[str, Any], why_reserved: str) -> None:
    """ConfigError for a key of a [table] of settings that is not a train setting, or that names or places the
    runs (compare and tune do that themselves: why_reserved says how)."""
    unknown = sorted(set(values) - SETTING_NAMES)
    if unknown:
        raise ConfigError(f"unknown [{table}] key(s): {', '.join(unknown)}")
    reserved = sorted(set(values) & RESERVED_KEYS)
    if reserved:
        raise ConfigError(f"[{table}] cannot set {', '.join(reserved)}: {why_reserved}")


def label_value(value: Any) -> str:
    """A grid value as it appears in a cell name: lists joined with '+', a table by its label, no path separators
    or spaces."""
    if isinstance(value, dict):
        text = value["label"]
    elif isinstance(value, (list, tuple)):
        text = "+".join(str(v) for v in value)
    elif isinstance(value, float):
        text = f"{value:g}"
    else:
        text = str(value)
    return re.sub(r"[\s/\\:]+", "-", text).strip("-.") or "x"


@dataclass
class Cell:
    """One configuration of the grid with one seed: one run directory."""

    name: str  # run directory name, from all grid values
    config: str  # the configuration's label, from the grid values except the seed
    values: dict[str, Any]  # the grid values, as given (target_modules as a list)
    cfg: TrainConfig


@dataclass
class ComparePlan:
    name: str
    root: Path  # <output_dir>/<name>
    base: TrainConfig
    grid: dict[str, list]
    cells: list[Cell]
    isolate: bool = True
    spec: dict = field(default_factory=dict)

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def config_keys(self) -> list[str]:
        return [k for k in self.grid if k != "seed"]


def _cell_name(values: dict[str, Any]) -> str:
    name = "_".join(f"{k}={label_value(v)}" for k, v in values.items()) or "base"
    if len(name) > 180:  # file systems limit names to 255 bytes
        name = name[:160] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


def _config_label(values: dict[str, Any]) -> str:
    parts = [f"{k}={label_value(v)}" for k, v in values.items() if k != "seed"]
    return " ".join(parts) or "base"


def plan_from_dict(raw: dict[str, Any], default_name: str = "compare", output_dir: str | None = None) -> ComparePlan:
    """Validate a comparison spec and every cell's configuration; ConfigError (one line) on the first problem."""
    if not isinstance(raw, dict):
        raise ConfigError("a comparison file must be a table with [base] and [grid]")
    unknown = sorted(set(raw) - TABLES)
    if unknown:
        raise ConfigError(f"unknown table(s) in comparison file: {', '.join(unknown)} (expected [compare], [base], "
                          f"[grid])")
    meta, base_values, grid = raw.get("compare", {}), raw.get("base", {}), raw.get("grid", {})
    for table, value in (("compare", meta), ("base", base_values), ("grid", grid)):
        if not isinstance(value, dict):
            raise ConfigError(f"[{table}] must be a table; got {value!r}")
    bad = sorted(set(meta) - COMPARE_KEYS)
    if bad:
        raise ConfigError(f"unknown [compare] key(s): {', '.join(bad)} (expected {', '.join(sorted(COMPARE_KEYS))})")
    name = meta.get("name", default_name)
    if not isinstance(name, str) or not name.strip() or "/" in name or name.startswith("."):
        raise ConfigError(f"[compare] name must be a plain directory name; got {name!r}")
    out = output_dir if output_dir is not None else meta.get("output_dir", "runs")
    if not isinstance(out, str) or not out.strip():
        raise ConfigError(f"[compare] output_dir must be a non-empty string; got {out!r}")
    isolate = meta.get("isolate", True)
    if not isinstance(isolate, bool):
        raise ConfigError(f"[compare] isolate must be true or false; got {isolate!r}")

    for table, values in (("base", base_values), ("grid", grid)):
        check_setting_keys(table, values, "the comparison names and places each cell (use [compare] name/output_dir)")
    fixed = sorted(set(grid) & FIXED_KEYS)
    if fixed:
        raise ConfigError(f"[grid] cannot vary {', '.join(fixed)}: every cell uses the same data, split and steps "
                          f"(set it in [base])")
    base_values = {k: _normalise(k, v, "[base]") for k, v in base_values.items()}
    base = from_dict(base_values)

    norm_grid: dict[str, list] = {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"[grid] {key} must be a non-empty list of values; got {values!r}")
        norm = [_normalise(key, v, f"[grid] {key}") for v in values]
        if len({json.dumps(v, sort_keys=True, default=str) for v in norm}) != len(norm):
            raise ConfigError(f"[grid] {key} lists a value twice: {values!r}")
        norm_grid[key] = norm

    root = Path(out) / name
    cells, names = [], {}
    for combo in itertools.product(*norm_grid.values()) if norm_grid else [()]:
        values = dict(zip(norm_grid, combo))
        settings = {}
        for key, value in values.items():
            settings.update({k: v for k, v in value.items() if k != "label"} if isinstance(value, dict)
                            else {key: value})
        values = {k: label_value(v) if isinstance(v, dict) else v for k, v in values.items()}
        cell_name = _cell_name(values)
        if cell_name in names:
            raise ConfigError(f"grid cells {names[cell_name]} and {values} get the same name {cell_name!r}")
        names[cell_name] = values
        try:
            cfg = from_dict({**settings, "output_dir": str(root / "runs"), "run_name": cell_name}, base=base)
        except ConfigError as exc:
            raise ConfigError(f"grid cell {cell_name}: {exc}") from None
        cells.append(Cell(cell_name, _config_label(values), values, cfg))
    spec = {"compare": {"name": name, "output_dir": out, "isolate": isolate}, "base": base_values, "grid": norm_grid}
    return ComparePlan(name, root, base, norm_grid, cells, isolate, spec)


def read_spec(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        return read_toml(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        import yaml
    except ImportError:
        raise ConfigError("YAML comparison files need PyYAML (pip install pyyaml); or use TOML") from None
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse config file {path}: {' '.join(str(exc).split())}") from None


def load_plan(path: str | Path, output_dir: str | None = None) -> ComparePlan:
    """Read and validate a comparison file; nothing is trained."""
    return plan_from_dict(read_spec(path), default_name=Path(path).stem, output_dir=output_dir)
