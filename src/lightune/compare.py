"""`lightune compare`: train a grid of configurations on the same data and tabulate, plot and report them.

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
    method = ["lora", "qlora"]
    seed = [1, 2, 3]

Every cell is an ordinary run directory written by `training.run_training` under `<output_dir>/<name>/runs/`,
named after its grid values (`rank=4_method=qlora_seed=1`). Finished cells are reused on a re-run, so an
interrupted comparison resumes; a cell that fails is recorded with its error and the others go on.
"""

from __future__ import annotations

import base64
import hashlib
import html
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .config import FIELD_NAMES, TrainConfig, from_dict, read_toml
from .errors import ConfigError, LightuneError
from .reporting import is_complete_run, plt
from .training import run_training

COMPARE_KEYS = {"name", "output_dir", "isolate"}
TABLES = {"compare", "base", "grid"}
# Grid keys that would give cells different data, a different split or a different number of steps.
FIXED_KEYS = {
    "data", "test_data", "text_column", "label_column", "label_names", "train_size", "eval_size",
    "validation_fraction", "test_fraction", "split_seed", "epochs", "max_steps", "batch_size",
}
# Set per cell by the comparison itself.
RESERVED_KEYS = {"run_name", "output_dir"}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, LightuneError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
    if key in ("target_modules", "label_names"):
        return _targets(value, where) if key == "target_modules" else (
            [v.strip() for v in value.split(",")] if isinstance(value, str) else value)
    return value


def _label_value(value: Any) -> str:
    """A grid value as it appears in a cell name: lists joined with '+', no path separators or spaces."""
    if isinstance(value, (list, tuple)):
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
    name = "_".join(f"{k}={_label_value(v)}" for k, v in values.items()) or "base"
    if len(name) > 180:  # file systems limit names to 255 bytes
        name = name[:160] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


def _config_label(values: dict[str, Any]) -> str:
    parts = [f"{k}={_label_value(v)}" for k, v in values.items() if k != "seed"]
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
        unknown = sorted(set(values) - FIELD_NAMES)
        if unknown:
            raise ConfigError(f"unknown [{table}] key(s): {', '.join(unknown)}")
        reserved = sorted(set(values) & RESERVED_KEYS)
        if reserved:
            raise ConfigError(f"[{table}] cannot set {', '.join(reserved)}: the comparison names and places each "
                              f"cell (use [compare] name/output_dir)")
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
        cell_name = _cell_name(values)
        if cell_name in names:
            raise ConfigError(f"grid cells {names[cell_name]} and {values} get the same name {cell_name!r}")
        names[cell_name] = values
        try:
            cfg = from_dict({**values, "output_dir": str(root / "runs"), "run_name": cell_name}, base=base)
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


# ----------------------------------------------------------------------------------------------------- running


def _comparable(cfg_dict: dict) -> dict:
    out = json.loads(json.dumps(cfg_dict, default=str))
    for key in ("output_dir", "run_name"):
        out.pop(key, None)
    return out


def check_existing(plan: ComparePlan) -> None:
    """A finished cell is reused only if it was trained with the same configuration; else ConfigError up front."""
    for cell in plan.cells:
        run_dir = plan.runs_dir / cell.name
        if not is_complete_run(run_dir):
            continue
        saved = _comparable(json.loads((run_dir / "config.json").read_text()))
        wanted = _comparable(cell.cfg.to_dict())
        if saved != wanted:
            diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise ConfigError(f"{run_dir} was trained with a different configuration ({', '.join(diff)}); remove it "
                              f"or choose another [compare] name")


def _cell_worker(cfg: TrainConfig, progress: bool, conn) -> None:  # runs in a child process
    try:
        from .cli import _quiet_libraries

        _quiet_libraries()
        result = run_training(cfg, progress=progress)
        conn.send(("ok", str(result.run_dir)))
    except KeyboardInterrupt:
        conn.send(("interrupted", ""))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which records the cell as failed
        conn.send(("error", _one_line(exc), "".join(traceback.format_exception(exc))))
    finally:
        conn.close()


def _run_isolated(cfg: TrainConfig, progress: bool) -> dict:
    """Train one cell in a fresh Python process (so its peak memory is its own); metrics from metrics.json."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_cell_worker, args=(cfg, progress, child))
    proc.start()
    child.close()
    try:
        message = parent.recv()
    except EOFError:
        message = None
    except KeyboardInterrupt:
        proc.join(10)  # the child got the Ctrl-C too: let it move its staging directory aside
        if proc.is_alive():
            proc.terminate()
        raise
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
            proc.join()
    if message is None:
        raise RuntimeError(f"the training process died (exit code {proc.exitcode})")
    if message[0] == "interrupted":
        raise KeyboardInterrupt
    if message[0] == "error":
        raise CellError(message[1], message[2])
    return json.loads((Path(message[1]) / "metrics.json").read_text())


class CellError(Exception):
    """A cell's failure in a child process: the one-line message and the child's traceback."""

    def __init__(self, message: str, trace: str = ""):
        super().__init__(message)
        self.trace = trace


def _run_in_process(cfg: TrainConfig, progress: bool) -> dict:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    except Exception:  # noqa: BLE001 - best effort
        pass
    return run_training(cfg, progress=progress).metrics


def _mb(n: float | None) -> float:
    return float("nan") if n is None else n / 2**20


def cell_row(plan: ComparePlan, cell: Cell, status: str, metrics: dict | None = None, error: str = "",
             seconds: float | None = None) -> dict:
    """One row of cells.csv: the grid values, the status and the metrics that matter for the comparison."""
    row: dict[str, Any] = {"cell": cell.name, "config": cell.config}
    for key in plan.grid:
        value = cell.values[key]
        row[key] = ",".join(value) if isinstance(value, list) else value
    if "seed" not in plan.grid:
        row["seed"] = cell.cfg.seed
    if "method" not in plan.grid:
        row["method"] = cell.cfg.method
    row.update(status=status, error=error)
    m = metrics or {}
    test, base = m.get("test", {}), m.get("base", {})
    params, mem, train = m.get("parameters", {}), m.get("memory", {}), m.get("training", {})
    nan = float("nan")
    row.update(
        accuracy=test.get("accuracy", nan), f1=test.get("f1", nan),
        base_accuracy=base.get("accuracy", nan), base_f1=base.get("f1", nan),
        trainable_params=params.get("trainable", nan), total_params=params.get("total", nan),
        trainable_share=params.get("share", nan),
        weights_mb=_mb(mem.get("weights_bytes")), peak_mb=_mb(mem.get("peak_bytes")), peak_kind=mem.get("peak_kind", ""),
        train_steps=train.get("steps", nan), train_seconds=train.get("seconds", nan),
        train_samples_per_s=train.get("samples_per_s", nan), eval_samples_per_s=test.get("samples_per_s", nan),
        cell_seconds=nan if seconds is None else seconds,
        test_fingerprint=(m.get("data") or {}).get("fingerprints", {}).get("test", ""),
        run_dir=str(plan.runs_dir / cell.name) if metrics else "",
    )
    return row


@dataclass
class CompareResult:
    plan: ComparePlan
    cells: Any  # pandas.DataFrame, one row per cell
    table: Any  # pandas.DataFrame, one row per configuration
    files: dict[str, Path]
    seconds: float

    @property
    def failed(self) -> int:
        return int((self.cells["status"] == "failed").sum())


def run_compare(plan: ComparePlan, progress: bool = True, log: Callable[[str], None] | None = None,
                isolate: bool | None = None) -> CompareResult:
    """Train every cell not finished yet (sequentially), then write results.csv/.md, cells.csv, plots and report.html.

    A failing cell is recorded and the rest go on; Ctrl-C (KeyboardInterrupt) stops the comparison, and a re-run
    resumes it. `isolate` (default: the plan's) trains each cell in a fresh process.
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    isolate = plan.isolate if isolate is None else isolate
    check_existing(plan)
    plan.runs_dir.mkdir(parents=True, exist_ok=True)
    _write_text(plan.root / "comparison.json", json.dumps(plan.spec, indent=2, default=str) + "\n")
    start, rows, n = time.perf_counter(), [], len(plan.cells)
    for i, cell in enumerate(plan.cells, 1):
        run_dir = plan.runs_dir / cell.name
        if is_complete_run(run_dir):
            log(f"[{i}/{n}] {cell.name}: finished earlier, reused")
            rows.append(cell_row(plan, cell, "reused", json.loads((run_dir / "metrics.json").read_text())))
            continue
        log(f"[{i}/{n}] {cell.name}: training")
        cell_start = time.perf_counter()
        try:
            metrics = _run_isolated(cell.cfg, progress) if isolate else _run_in_process(cell.cfg, progress)
        except Exception as exc:  # noqa: BLE001 - a failed cell is recorded; KeyboardInterrupt still stops us
            message = _one_line(exc)
            log(f"[{i}/{n}] {cell.name}: FAILED: {message}")
            rows.append(cell_row(plan, cell, "failed", error=message, seconds=time.perf_counter() - cell_start))
            continue
        seconds = time.perf_counter() - cell_start
        stale = plan.runs_dir / f"{cell.name}.incomplete"  # left by an earlier failed attempt of this cell
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        log(f"[{i}/{n}] {cell.name}: accuracy {metrics['test']['accuracy']:.4f}, F1 {metrics['test']['f1']:.4f} "
            f"({seconds:.0f} s)")
        rows.append(cell_row(plan, cell, "trained", metrics, seconds=seconds))
    seconds = time.perf_counter() - start
    cells, table = tabulate_cells(plan, rows)
    files = write_outputs(plan, cells, table, seconds)
    return CompareResult(plan, cells, table, files, seconds)


# ------------------------------------------------------------------------------------------------ aggregation


def tabulate_cells(plan: ComparePlan, rows: list[dict]):
    """(cells, table): the per-cell DataFrame and one row per configuration with mean/std over seeds."""
    import pandas as pd

    cells = pd.DataFrame(rows)
    ok = cells[cells["status"] != "failed"]
    out = []
    for config, group in cells.groupby("config", sort=False):
        good = ok[ok["config"] == config]
        first = group.iloc[0]
        row: dict[str, Any] = {"config": config}
        for key in plan.config_keys:
            row[key] = first[key]
        if "method" not in plan.config_keys:
            row["method"] = first["method"]
        row["seeds"] = len(good)
        row["failed"] = int((group["status"] == "failed").sum())
        for metric in ("accuracy", "f1"):
            row[f"{metric}_mean"] = good[metric].mean() if len(good) else float("nan")
            row[f"{metric}_std"] = good[metric].std(ddof=1) if len(good) > 1 else float("nan")
        for metric in ("base_accuracy", "trainable_params", "total_params", "trainable_share", "weights_mb",
                       "peak_mb", "train_steps", "train_seconds", "train_samples_per_s", "eval_samples_per_s"):
            row[metric] = good[metric].mean() if len(good) else float("nan")
        errors = group.loc[group["status"] == "failed", "error"]
        row["error"] = errors.iloc[0] if len(errors) else ""
        out.append(row)
    table = pd.DataFrame(out)
    for col in ("trainable_params", "total_params", "train_steps"):
        table[col] = table[col].round().astype("Int64")
    return cells, table


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    try:
        import pandas as pd

        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    return format(value, spec)


def _mean_std(mean: float, std: float) -> str:
    if mean != mean:  # NaN
        return ""
    return f"{mean:.4f} ± {std:.4f}" if std == std else f"{mean:.4f}"


def display_rows(plan: ComparePlan, table) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows shared by results.md, report.html and the CLI summary."""
    keys = plan.config_keys or ["config"]
    header = keys + ["seeds", "accuracy", "F1", "base acc.", "trainable params", "share", "weights MB", "peak MB",
                     "train s", "train samples/s", "eval samples/s"]
    rows = []
    for _, r in table.iterrows():
        seeds = f"{r['seeds']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        rows.append([str(r[k]) for k in keys] + [
            seeds, _mean_std(r["accuracy_mean"], r["accuracy_std"]), _mean_std(r["f1_mean"], r["f1_std"]),
            _fmt(r["base_accuracy"], ".4f"), _fmt(r["trainable_params"], ","),
            _fmt(r["trainable_share"] * 100, ".3f") + ("%" if r["trainable_share"] == r["trainable_share"] else ""),
            _fmt(r["weights_mb"], ".1f"), _fmt(r["peak_mb"], ".0f"), _fmt(r["train_seconds"], ".1f"),
            _fmt(r["train_samples_per_s"], ".1f"), _fmt(r["eval_samples_per_s"], ".1f"),
        ])
    return header, rows


def _setup_lines(plan: ComparePlan, cells) -> list[str]:
    b = plan.base
    ok = cells[cells["status"] != "failed"]
    kinds = sorted(set(ok["peak_kind"]) - {""})
    fps = sorted(set(ok["test_fingerprint"]) - {""})
    steps = sorted(set(ok["train_steps"].dropna().astype(int)))
    lines = [
        f"Model `{b.model}`; data `{b.data}`" + (f", tested on `{b.test_data}`" if b.test_data else "")
        + f" (train_size {b.train_size}, eval_size {b.eval_size}, split_seed {b.split_seed}, max_length "
          f"{b.max_length}); {b.epochs:g} epoch(s)" + (f", max_steps {b.max_steps}" if b.max_steps else "")
        + f", batch size {b.batch_size}.",
        "Grid: " + "; ".join(f"{k} = {', '.join(_label_value(v) for v in vs)}" for k, vs in plan.grid.items())
        + f" ({len(plan.cells)} cells).",
        f"Training steps per cell: {', '.join(map(str, steps)) or 'n/a'}; test split fingerprint(s): "
        f"{', '.join(fps) or 'n/a'}; peak memory is {', '.join(kinds) or 'n/a'}.",
        "Accuracy and F1 (macro) on the test split: mean ± standard deviation over seeds.",
    ]
    return lines


def results_markdown(plan: ComparePlan, cells, table, seconds: float) -> str:
    header, rows = display_rows(plan, table)
    right = {i for i, h in enumerate(header) if i >= len(plan.config_keys or ["config"])}
    lines = [f"# lightune comparison: {plan.name}", ""] + _setup_lines(plan, cells) + [""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("| " + " | ".join("---:" if i in right else "---" for i in range(len(header))) + " |")
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    failed = cells[cells["status"] == "failed"]
    if len(failed):
        lines += ["", "Failed cells:", ""]
        lines += [f"- `{r['cell']}`: {r['error']}" for _, r in failed.iterrows()]
    lines += ["", f"This invocation took {seconds:.0f} s "
                  f"({int((cells['status'] == 'trained').sum())} cells trained, "
                  f"{int((cells['status'] == 'reused').sum())} reused, {len(failed)} failed).", "",
              "![accuracy vs trainable parameters](plots/accuracy_vs_params.png)",
              "![accuracy per configuration](plots/accuracy_per_config.png)",
              "![memory per method](plots/memory_per_method.png)", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- plots


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _save(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    os.chmod(tmp, _umask_mode())  # mkstemp makes 0600 files; results are for sharing
    fig.tight_layout()
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def _empty(ax, text="no finished cells") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _colors(values) -> dict:
    cmap = plt.get_cmap("tab10")
    return {v: cmap(i % 10) for i, v in enumerate(dict.fromkeys(values))}


def plot_accuracy_vs_params(table, path: Path) -> None:
    """Parameter efficiency: test accuracy against trainable parameters (log x), one point per configuration."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    good = table[table["seeds"] > 0]
    if not len(good):
        _empty(ax)
    else:
        colors = _colors(good["method"])
        for method, group in good.groupby("method", sort=False):
            ax.errorbar(group["trainable_params"].astype(float), group["accuracy_mean"],
                        yerr=group["accuracy_std"].fillna(0), fmt="o", capsize=3, color=colors[method], label=method)
        for _, r in good.iterrows():
            ax.annotate(r["config"], (float(r["trainable_params"]), r["accuracy_mean"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel("test accuracy")
        ax.legend(title="method", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    ax.set_title("Parameter efficiency: accuracy vs trainable parameters")
    _save(fig, path)


def plot_accuracy_per_config(table, path: Path) -> None:
    """Accuracy and F1 per configuration, mean with standard-deviation error bars."""
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.45 * len(table) + 1.5)))
    good = table[table["seeds"] > 0]
    if not len(good):
        _empty(ax)
    else:
        ys = range(len(good))
        h = 0.38
        for offset, metric, label in ((-h / 2, "accuracy", "accuracy"), (h / 2, "f1", "F1 (macro)")):
            bars = ax.barh([y + offset for y in ys], good[f"{metric}_mean"], h, xerr=good[f"{metric}_std"].fillna(0),
                           capsize=3, label=label)
            ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=3)
        ax.set_yticks(list(ys), list(good["config"]), fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.12)
        ax.set_xlabel("test split (mean ± std over seeds)")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Accuracy per configuration")
    _save(fig, path)


def plot_memory_per_method(cells, path: Path) -> None:
    """Weight memory and peak memory per method (mean over that method's finished cells)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    good = cells[cells["status"] != "failed"]
    if not len(good):
        _empty(ax)
    else:
        by = good.groupby("method", sort=False)[["weights_mb", "peak_mb"]].mean()
        xs = range(len(by))
        w = 0.38
        kind = ", ".join(sorted(set(good["peak_kind"]) - {""})) or "peak"
        for offset, col, label in ((-w / 2, "weights_mb", "weights"), (w / 2, "peak_mb", f"peak ({kind})")):
            bars = ax.bar([x + offset for x in xs], by[col], w, label=label)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(list(xs), list(by.index))
        ax.set_ylabel("MB")
        ax.legend(fontsize=8)
    ax.set_title("Memory per method")
    _save(fig, path)


# ------------------------------------------------------------------------------------------------------ output


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, path)


def report_html(plan: ComparePlan, cells, table, seconds: float, plots: dict[str, Path]) -> str:
    """One self-contained HTML file: setup, the results table, failed cells and the plots as data URIs."""
    header, rows = display_rows(plan, table)
    esc = html.escape
    n_keys = len(plan.config_keys or ["config"])
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="{"num" if i >= n_keys else "key"}">{esc(c)}</td>' for i, c in enumerate(row))
        + "</tr>" for row in rows)
    failed = cells[cells["status"] == "failed"]
    failed_html = ("<h2>Failed cells</h2><ul>" + "".join(
        f"<li><code>{esc(r['cell'])}</code>: {esc(str(r['error']))}</li>" for _, r in failed.iterrows()) + "</ul>"
                   if len(failed) else "")
    images = "".join(
        f'<figure><img alt="{esc(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode("ascii")}"><figcaption>{esc(title)}</figcaption></figure>'
        for title, path in plots.items())
    code = re.compile(r"`([^`]*)`")
    setup = "".join("<p>" + code.sub(r"<code>\1</code>", esc(line)) + "</p>" for line in _setup_lines(plan, cells))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lightune comparison: {esc(plan.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; }}
th {{ background: #f0f0f0; }} td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
figure {{ display: inline-block; margin: 1em 1em 0 0; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>lightune comparison: {esc(plan.name)}</h1>
{setup}
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{failed_html}
<p>This invocation took {seconds:.0f} s; generated {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}.
Per-cell details: <code>cells.csv</code> and the run directories under <code>runs/</code>.</p>
<h2>Plots</h2>
{images}
</body></html>
"""


def write_outputs(plan: ComparePlan, cells, table, seconds: float) -> dict[str, Path]:
    """results.csv, cells.csv, results.md, plots/*.png and report.html under the comparison's directory."""
    root = plan.root
    plots_dir = root / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "results.csv": root / "results.csv", "cells.csv": root / "cells.csv", "results.md": root / "results.md",
        "accuracy_vs_params": plots_dir / "accuracy_vs_params.png",
        "accuracy_per_config": plots_dir / "accuracy_per_config.png",
        "memory_per_method": plots_dir / "memory_per_method.png", "report.html": root / "report.html",
    }
    _write_text(files["results.csv"], table.to_csv(index=False))
    _write_text(files["cells.csv"], cells.to_csv(index=False))
    _write_text(files["results.md"], results_markdown(plan, cells, table, seconds))
    plot_accuracy_vs_params(table, files["accuracy_vs_params"])
    plot_accuracy_per_config(table, files["accuracy_per_config"])
    plot_memory_per_method(cells, files["memory_per_method"])
    plots = {"Accuracy vs trainable parameters": files["accuracy_vs_params"],
             "Accuracy per configuration": files["accuracy_per_config"],
             "Memory per method": files["memory_per_method"]}
    _write_text(files["report.html"], report_html(plan, cells, table, seconds, plots))
    return files


def summary_text(result: CompareResult) -> str:
    """A short fixed-width table for the terminal."""
    header, rows = display_rows(result.plan, result.table)
    keep = [i for i, h in enumerate(header) if h not in ("base acc.", "total params", "train samples/s",
                                                           "eval samples/s")]
    header = [header[i] for i in keep]
    rows = [[r[i] for i in keep] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cols: "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


__all__ = ["Cell", "ComparePlan", "CompareResult", "load_plan", "plan_from_dict", "run_compare"]
