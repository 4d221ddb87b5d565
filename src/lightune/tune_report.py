"""Results of `lightune tune`: the trials table (trials.csv, trials.md), Optuna's own plots (history, parameter
importances, intermediate values, Pareto front) in report.html, the best configuration as best.toml (a
`lightune train --config` file) with its test score, read once from its run after the search."""

from __future__ import annotations

import base64
import html
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import LightuneError
from .runs import read_run, write_text
from .tune_plan import OBJECTIVES, TunePlan


@dataclass
class TuneResult:
    """What a search produced: the trials table, the best trial (None when no trial finished) and the files."""

    plan: TunePlan
    trials: Any  # pandas.DataFrame, one row per trial
    best: dict | None  # number, params, values, run_dir, settings, test (None when its run is not here)
    pareto: list[int]  # numbers of the trials on the Pareto front (several objectives)
    files: dict[str, Path]
    seconds: float
    storage: str

    @property
    def counts(self) -> dict[str, int]:
        return state_counts(self.trials)


def state_counts(cells) -> dict[str, int]:
    """Trials finished, pruned and failed."""
    return {state: int((cells["state"] == state).sum()) for state in ("complete", "pruned", "fail")}


def trial_rows(plan: TunePlan, trials) -> list[dict]:
    """One row per trial: its number, state, objective values, searched settings, run and error."""
    rows = []
    for t in trials:
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name.lower()}
        for i, name in enumerate(plan.objectives):
            row[name] = t.values[i] if t.values else math.nan
        row.update({key: t.params.get(key) for key in plan.search})
        steps = sorted(t.intermediate_values)
        row["last_step"] = steps[-1] if steps else None
        row["worker"] = t.user_attrs.get("worker")
        row["trial_seconds"] = t.duration.total_seconds() if t.duration else math.nan
        row["run_dir"] = t.user_attrs.get("run_dir", "") if t.state.name == "COMPLETE" else ""
        error = t.user_attrs.get("error", "")
        if t.state.name == "FAIL" and not error:
            error = "its process ended before the trial finished"
        row["error"] = error
        rows.append(row)
    return rows


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(plan: TunePlan, cells) -> tuple[list[str], list[list[str]]]:
    header = ["trial", "state", *plan.objectives, *plan.search, "last step", "trial s", "error"]
    keys = ["trial", "state", *plan.objectives, *plan.search, "last_step", "trial_seconds", "error"]
    return header, [[_fmt(row[k]) for k in keys] for _, row in cells.iterrows()]


def choose_best(plan: TunePlan, study) -> tuple[Any, list[int]]:
    """(the best finished trial or None, the Pareto front's trial numbers). With several objectives the best is
    the front's trial with the best validation metric."""
    front = study.best_trials
    if not front:
        return None, []
    i = plan.objectives.index(plan.metric)
    sign = 1 if OBJECTIVES[plan.metric] == "maximize" else -1
    best = max(front, key=lambda t: (sign * t.values[i], -t.number))
    return best, sorted(t.number for t in front) if len(plan.objectives) > 1 else []


def toml_value(value: Any) -> str:
    """A setting as TOML (strings as basic strings, lists inline)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {value!r} as TOML")


def describe_values(objectives: list[str], values: list[float]) -> str:
    """Objective values for a person: validation metrics, training seconds, peak memory in MB."""
    out = []
    for name, value in zip(objectives, values):
        if name == "seconds":
            out.append(f"training {value:.1f} s")
        elif name == "memory":
            out.append(f"peak memory {value / 2**20:.0f} MB")
        else:
            out.append(f"validation {name} {value:.4f}")
    return ", ".join(out)


def best_toml(plan: TunePlan, trial, settings: dict, test: dict | None, what: str = "The best configuration",
              file: str = "best.toml") -> str:
    lines = [f"# {what} of the search {plan.name!r}: trial {trial.number} "
             f"({describe_values(plan.objectives, trial.values)})"]
    if test is not None:
        lines.append(f"# Its test accuracy {test['accuracy']:.4f}, F1 {test['f1']:.4f} (measured once, after the "
                     f"search, in {trial.user_attrs.get('run_dir')})")
    lines += [f"# Train it again with: lightune train --config {file}", "", "[train]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in settings.items() if value is not None]
    return "\n".join(lines) + "\n"


def plot_study(plan: TunePlan, study, plots_dir: Path) -> tuple[dict[str, Path], list[str]]:
    """Optuna's matplotlib plots of the study as PNG: {title: path}, and a note for each plot it cannot draw yet."""
    from .reporting import save_figure  # matplotlib on the Agg backend first

    from optuna.visualization import matplotlib as ovm

    plots_dir.mkdir(parents=True, exist_ok=True)
    i = plan.objectives.index(plan.metric)
    several = len(plan.objectives) > 1
    target = {"target": (lambda t: t.values[i])} if several else {}
    target["target_name"] = f"validation {plan.metric}"
    wanted = [("Optimization history", "history", lambda: ovm.plot_optimization_history(study, **target)),
              ("Parameter importances", "importances", lambda: ovm.plot_param_importances(study, **target))]
    if several:
        labels = {"seconds": "training seconds", "memory": "peak memory (bytes)"}
        names = [labels.get(n, f"validation {n}") for n in plan.objectives]
        wanted.append(("Pareto front", "pareto_front", lambda: ovm.plot_pareto_front(study, target_names=names)))
    elif any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        wanted.append(("Validation at each evaluation", "intermediate",
                       lambda: ovm.plot_intermediate_values(study)))
    plots, notes = {}, []
    for title, name, draw in wanted:
        try:
            with warnings.catch_warnings():  # experimental-API and few-trials warnings: the notes say what matters
                warnings.simplefilter("ignore")
                axes = draw()
        except Exception as exc:  # noqa: BLE001 - e.g. importances need two finished trials: a note, not a failure
            notes.append(f"{title}: not drawn ({str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r})")
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        if name == "intermediate":
            axes.set_ylabel(f"validation {plan.metric}")
        figure.set_size_inches(7, 4.5)
        save_figure(figure, plots_dir / f"{name}.png")
        plots[title] = plots_dir / f"{name}.png"
    return plots, notes


def _best_lines(plan: TunePlan, best: dict | None, counts: dict) -> list[str]:
    done = f"{counts['complete']} finished, {counts['pruned']} pruned, {counts['fail']} failed trials"
    if best is None:
        return [f"No trial finished ({done})."]
    params = ", ".join(f"{k} = {_fmt(v)}" for k, v in best["params"].items())
    test = best["test"]
    lines = [f"Best trial: {best['number']} ({describe_values(plan.objectives, best['values'])}; {params}); {done}."]
    lines.append(f"Its test accuracy {test['accuracy']:.4f}, F1 {test['f1']:.4f}, measured once after the search in "
                 f"{best['run_dir']}." if test else f"Its run {best['run_dir']} is not on this machine: its test "
                 f"score is in that run's metrics.json.")
    return lines


def trials_markdown(plan: TunePlan, cells, best: dict | None, counts: dict) -> str:
    header, rows = _table(plan, cells)
    lines = [f"# lightune search: {plan.name}", "", *_best_lines(plan, best, counts), "",
             "Search: " + "; ".join(dim.describe() for dim in plan.search.values())
             + f". Objectives: {', '.join(f'{n} ({OBJECTIVES[n]})' for n in plan.objectives)}.", "",
             "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def report_html(plan: TunePlan, cells, best: dict | None, counts: dict, plots: dict[str, Path], notes: list[str],
                seconds: float, storage: str) -> str:
    """One self-contained HTML file: the best trial, the trials table and Optuna's plots as data URIs."""
    esc = html.escape
    header, rows = _table(plan, cells)
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    images = "".join(
        f'<figure><img alt="{esc(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode("ascii")}"><figcaption>{esc(title)}</figcaption></figure>'
        for title, path in plots.items())
    summary = "".join(f"<p>{esc(line)}</p>" for line in _best_lines(plan, best, counts))
    search = "; ".join(dim.describe() for dim in plan.search.values())
    notes_html = "".join(f"<li>{esc(n)}</li>" for n in notes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lightune search: {esc(plan.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; }} th {{ background: #f0f0f0; }}
figure {{ display: inline-block; margin: 1em 1em 0 0; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>lightune search: {esc(plan.name)}</h1>
{summary}
<p>Search: {esc(search)}. Objectives: {esc(', '.join(f'{n} ({OBJECTIVES[n]})' for n in plan.objectives))}; sampler
TPE (seed {plan.seed}), pruner {esc(plan.pruner)}. Study: <code>{esc(storage)}</code>.</p>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p>This invocation took {seconds:.0f} s; generated {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}. Each trial's run:
<code>runs/trial-N</code>; the best configuration: <code>best.toml</code>.</p>
<h2>Plots</h2>
{images}
{f"<ul>{notes_html}</ul>" if notes else ""}
</body></html>
"""


def _best(plan: TunePlan, study) -> tuple[dict | None, list[int]]:
    trial, pareto = choose_best(plan, study)
    if trial is None:
        return None, pareto
    run_dir = trial.user_attrs.get("run_dir", "")
    try:
        test = read_run(run_dir).metrics["test"] if run_dir else None
    except LightuneError:  # a trial of another machine (--storage): its run is there
        test = None
    return {"number": trial.number, "params": dict(trial.params), "values": list(trial.values), "run_dir": run_dir,
            "settings": plan.settings(trial.params), "test": test, "trial": trial}, pareto


def write_outputs(plan: TunePlan, study, seconds: float, storage: str) -> TuneResult:
    """trials.csv, trials.md, plots/*.png, report.html, best.toml (and pareto/trial-N.toml for each trial on the
    Pareto front of several objectives) under the search's directory."""
    import pandas as pd

    root = plan.root
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    cells = pd.DataFrame(trial_rows(plan, trials), columns=["trial", "state", *plan.objectives, *plan.search,
                                                            "last_step", "worker", "trial_seconds", "run_dir",
                                                            "error"])
    best, pareto = _best(plan, study)
    counts = state_counts(cells)
    files = {"trials.csv": root / "trials.csv", "trials.md": root / "trials.md", "report.html": root / "report.html"}
    write_text(files["trials.csv"], cells.to_csv(index=False))
    write_text(files["trials.md"], trials_markdown(plan, cells, best, counts))
    plots, notes = plot_study(plan, study, root / "plots")
    files.update({f"plot:{title}": path for title, path in plots.items()})
    write_text(files["report.html"], report_html(plan, cells, best, counts, plots, notes, seconds, storage))
    if best is not None:
        files["best.toml"] = root / "best.toml"
        write_text(files["best.toml"], best_toml(plan, best["trial"], best["settings"], best["test"]))
        for trial in study.best_trials if pareto else []:
            (root / "pareto").mkdir(exist_ok=True)
            path = root / "pareto" / f"trial-{trial.number}.toml"
            settings = plan.settings(trial.params)
            write_text(path, best_toml(plan, trial, settings, None, "A Pareto-optimal configuration",
                                       f"pareto/{path.name}"))
            files[f"pareto/trial-{trial.number}.toml"] = path
    return TuneResult(plan, cells, best, pareto, files, seconds, storage)


def summary_text(result: TuneResult) -> str:
    """The terminal's summary: the best trial and its test score, the counts, where the report is."""
    return "\n".join(_best_lines(result.plan, result.best, result.counts)
                     + ([f"Pareto front: trials {', '.join(map(str, result.pareto))}"] if result.pareto else []))
