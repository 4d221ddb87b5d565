"""Results of `lightune compare`: one row per cell, the table per configuration (mean and std over seeds),
results.csv / cells.csv / results.md / report.html and the terminal summary. The plots are in reporting."""

from __future__ import annotations

import base64
import html
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .compare_plan import Cell, ComparePlan, label_value
from .reporting import megabytes, plot_accuracy_per_config, plot_accuracy_vs_params, plot_memory_per_method
from .runs import write_text


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
        weights_mb=megabytes(mem.get("weights_bytes")), peak_mb=megabytes(mem.get("peak_bytes")),
        peak_kind=mem.get("peak_kind", ""),
        objective=train.get("objective", ""),  # what `--objective auto` resolved to in this cell
        train_steps=train.get("steps", nan), train_seconds=train.get("seconds", nan),
        train_samples_per_s=train.get("samples_per_s", nan), eval_samples_per_s=test.get("samples_per_s", nan),
        cell_seconds=nan if seconds is None else seconds,
        test_fingerprint=(m.get("data") or {}).get("fingerprints", {}).get("test", ""),
        run_dir=str(plan.runs_dir / cell.name) if metrics else "",
    )
    return row


@dataclass
class CompareResult:
    """What a comparison produced: the plan, the per-cell and per-configuration tables and the files written."""

    plan: ComparePlan
    cells: Any  # pandas.DataFrame, one row per cell
    table: Any  # pandas.DataFrame, one row per configuration
    files: dict[str, Path]
    seconds: float

    @property
    def failed(self) -> int:
        return int((self.cells["status"] == "failed").sum())

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
        row["objective"] = ", ".join(sorted(set(good["objective"]) - {""})) if len(good) else ""
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
    header = keys + ["seeds", "accuracy", "F1", "objective", "base acc.", "trainable params", "share", "weights MB", "peak MB",
                     "train s", "train samples/s", "eval samples/s"]
    rows = []
    for _, r in table.iterrows():
        seeds = f"{r['seeds']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        rows.append([str(r[k]) for k in keys] + [
            seeds, _mean_std(r["accuracy_mean"], r["accuracy_std"]), _mean_std(r["f1_mean"], r["f1_std"]),
            str(r["objective"]),
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
        "Grid: " + "; ".join(f"{k} = {', '.join(label_value(v) for v in vs)}" for k, vs in plan.grid.items())
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
    write_text(files["results.csv"], table.to_csv(index=False))
    write_text(files["cells.csv"], cells.to_csv(index=False))
    write_text(files["results.md"], results_markdown(plan, cells, table, seconds))
    plot_accuracy_vs_params(table, files["accuracy_vs_params"])
    plot_accuracy_per_config(table, files["accuracy_per_config"])
    plot_memory_per_method(cells, files["memory_per_method"])
    plots = {"Accuracy vs trainable parameters": files["accuracy_vs_params"],
             "Accuracy per configuration": files["accuracy_per_config"],
             "Memory per method": files["memory_per_method"]}
    write_text(files["report.html"], report_html(plan, cells, table, seconds, plots))
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

