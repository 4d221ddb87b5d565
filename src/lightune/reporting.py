"""Run directories and what goes in them: metrics.json, plots, report.md; written so that only finished runs look
finished. The plots of `lightune compare` live here too, beside the run plots."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import methods  # noqa: E402
from .config import INCOMPLETE_SUFFIX  # noqa: E402
from .errors import ConfigError  # noqa: E402

COMPLETE_MARKER = "metrics.json"  # written last: a run directory without it is not a finished run


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (temporary file + rename), with the permissions of a plain new file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
    except BaseException:
        os.unlink(tmp)
        raise
    os.chmod(tmp, _umask_mode())  # mkstemp makes 0600 files; results are for sharing
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temporary file + rename); ValueError for NaN or infinity, which JSON cannot hold."""
    write_text(path, json.dumps(obj, indent=2, default=str, allow_nan=False) + "\n")


def save_figure(fig, path: Path) -> None:
    """Save a figure as PNG atomically and close it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    os.chmod(tmp, _umask_mode())
    fig.tight_layout()
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def default_run_name(cfg) -> str:
    data = Path(cfg.data).stem if not cfg.data.startswith("hub:") else cfg.data[4:].replace("/", "-")
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}-{data}"


def final_run_dir(cfg) -> Path:
    """Where the finished run will live; ConfigError if a run is already there (runs are never overwritten)."""
    root = Path(cfg.output_dir)
    if cfg.run_name:
        path = root / cfg.run_name
        if path.exists():
            raise ConfigError(f"run directory {path} already exists; choose another --run-name")
        return path
    path = root / default_run_name(cfg)
    suffix = 2
    while path.exists():
        path = root / f"{default_run_name(cfg)}-{suffix}"
        suffix += 1
    return path


@contextlib.contextmanager
def staged_run_dir(final: Path):
    """Yield a hidden work directory; rename it to `final` only if the block finishes.

    On an error, Ctrl-C or SIGTERM the work directory is kept as `<name>.incomplete` (or `.incomplete-2`, ... when
    that name is taken) with error.txt inside, and the exception gets an `incomplete_run_dir` attribute naming
    it. Nothing that looks like a finished run is left behind, and no existing directory is ever replaced.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    try:
        with run_lock(work):  # `train --resume` refuses a run that a live process is writing
            yield work
    except BaseException as exc:
        keep_incomplete(work, final, exc)
        raise
    if not _rename_to_new(work, final):
        appeared = ConfigError(f"run directory {final} appeared while training")
        kept = keep_incomplete(work, final, appeared)
        raise ConfigError(f"run directory {final} appeared while training; this run is kept in {kept}")


@contextlib.contextmanager
def run_lock(run_dir: Path | None):
    """Hold an exclusive lock on run_dir (none for None) while the block runs; ConfigError when another process
    holds it. The operating system releases it when the process ends, even on SIGKILL."""
    if run_dir is None:
        yield
        return
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{run_dir} is in use by a running training") from None
        yield
    finally:
        os.close(fd)


def keep_incomplete(work: Path, final: Path, exc: BaseException) -> Path:
    """Write error.txt into work and rename it to the first free `<final>.incomplete[-N]`; return that path."""
    (work / "error.txt").write_text("".join(traceback.format_exception(exc)))
    for n in itertools.count(1):
        kept = final.parent / f"{final.name}{INCOMPLETE_SUFFIX}{'' if n == 1 else f'-{n}'}"
        if _rename_to_new(work, kept):
            with contextlib.suppress(AttributeError):
                exc.incomplete_run_dir = kept
            return kept


def _rename_to_new(src: Path, dest: Path) -> bool:
    """Rename directory src to dest if no dest exists; False (and nothing moved) when dest is taken."""
    try:
        dest.mkdir()  # claims the name atomically: fails if anything of that name exists, even a broken link
    except FileExistsError:
        return False
    os.rename(src, dest)  # replaces only the empty directory just made (POSIX rename of a directory)
    return True


def is_complete_run(path: Path) -> bool:
    return (Path(path) / COMPLETE_MARKER).is_file() and (Path(path) / "config.json").is_file()


def plot_before_after(base: dict, tuned: dict, path: Path) -> None:
    """Bar chart: accuracy and F1 of the base model vs the fine-tuned one on the test split."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    names, width = ["accuracy", "f1"], 0.38
    xs = range(len(names))
    for offset, (label, metrics) in zip((-width / 2, width / 2), (("base", base), ("fine-tuned", tuned))):
        values = [metrics[n] for n in names]
        bars = ax.bar([x + offset for x in xs], values, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 1.08)
    ax.set_title("Test split: base vs fine-tuned")
    ax.legend(loc="lower right")
    save_figure(fig, path)


def plot_history(metrics: dict, path: Path) -> None:
    """Left: validation accuracy/F1 per evaluation against the base model's test accuracy.
    Right: training loss per step (with a running mean) and validation loss per evaluation.
    A dotted line (and a star) marks the best evaluation, whose weights the run saved."""
    history, training = metrics["history"], metrics["training"]
    per_epoch = training["steps_per_epoch"]
    epochs = [h["epoch"] for h in history]
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_acc.plot(epochs, [h["validation"]["accuracy"] for h in history], marker="o", label="validation accuracy")
    ax_acc.plot(epochs, [h["validation"]["f1"] for h in history], marker="s", label="validation F1")
    ax_acc.axhline(metrics["base"]["accuracy"], color="grey", linestyle="--", label="base model (test)")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_xlim(0, max(epochs) * 1.05)
    ax_acc.set_ylim(0, 1)
    ax_acc.legend(loc="lower right")
    losses = training["step_losses"]
    steps = [(i + 1) / per_epoch for i in range(len(losses))]
    window = max(1, len(losses) // 10)
    running = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
               for i in range(len(losses))]
    ax_loss.plot(steps, losses, color="tab:blue", alpha=0.3, label="train loss (step)")
    ax_loss.plot(steps, running, color="tab:blue", label=f"train loss (mean of {window})")
    ax_loss.plot(epochs, [h["validation"]["loss"] for h in history], marker="s", color="tab:orange",
                 linestyle="none" if len(history) == 1 else "-", label="validation loss")
    ax_loss.set_xlabel("epoch")
    best = metrics.get("best")  # runs from before the best evaluation was kept have none
    if best:
        for ax in (ax_acc, ax_loss):
            ax.axvline(best["epoch"], color="tab:green", linestyle=":", label=f"best (step {best['step']}, saved)")
        chosen = next(h for h in history if h["step"] == best["step"])["validation"]
        ax_acc.plot([best["epoch"]], [chosen["accuracy"]], marker="*", markersize=14, color="tab:green",
                    linestyle="none")
        ax_acc.legend(loc="lower right")
    ax_loss.legend()
    save_figure(fig, path)


def megabytes(n_bytes: float | None) -> float:
    return float("nan") if n_bytes is None else n_bytes / 2**20


def _mb(n_bytes: float) -> str:
    return f"{megabytes(n_bytes):,.1f} MB"


def per_class_lines(metrics: dict) -> list[str]:
    """Markdown: balanced accuracy, ROC-AUC and PR-AUC (two classes) and a per-class table, for the metrics of
    one split (runs from before these were recorded have none: no lines)."""
    if "per_class" not in metrics:
        return []
    aucs = "".join(f", {label} {metrics[key]:.4f}" for key, label in (("roc_auc", "ROC-AUC"), ("pr_auc", "PR-AUC"))
                   if metrics.get(key) is not None)
    if "subset_accuracy" in metrics:  # multi-label
        summary = (f"Subset accuracy {metrics['subset_accuracy']:.4f}, F1 micro {metrics['f1_micro']:.4f}, "
                   f"F1 macro {metrics['f1_macro']:.4f}.")
    else:
        summary = f"Balanced accuracy {metrics['balanced_accuracy']:.4f}{aucs}."
    lines = [summary, "",
             "| label | precision | recall | F1 | support |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, m in metrics["per_class"].items():
        lines.append(f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |")
    return lines + [""]


def confusion_lines(metrics: dict, label_names: list[str], thresholds: dict | None) -> list[str]:
    """Markdown: the confusion matrix of a single-label split, or a multi-label run's thresholds."""
    if "confusion_matrix" in metrics:
        return [f"- Confusion matrix (rows true, columns predicted; {', '.join(label_names)}): "
                f"{metrics['confusion_matrix']}"]
    if thresholds:
        return ["- Multi-label thresholds (a label is predicted when its probability reaches it): "
                + ", ".join(f"{name} {value:.4f}" for name, value in thresholds.items())]
    return []


def report_markdown(metrics: dict) -> str:
    """A short human-readable report of one run."""
    base, tuned, cfg = metrics["base"], metrics["test"], metrics["config"]
    params, mem, data = metrics["parameters"], metrics["memory"], metrics["data"]
    describe = methods.get(cfg["peft"]).describe
    settings = (describe(cfg) if describe else []) + (
        [f"targets: {', '.join(metrics['target_modules'])}"] if metrics.get("target_modules") else [])
    lines = [
        f"# lightune run: {metrics['run_name']}",
        "",
        f"Model `{cfg['model']}`, method **{cfg['method']}**" + (f" ({', '.join(settings)})" if settings else "")
        + f", device {metrics['device']}, precision {metrics['precision']}.",
        f"Data: train on `{data['train_source']}`, test on `{data['test_source']}`; split `{data['split']}`; "
        f"{data['sizes']['train']} train / {data['sizes']['validation']} validation / {data['sizes']['test']} test "
        f"(test fingerprint `{data['fingerprints']['test']}`).",
        "",
        "| test split | accuracy | F1 (macro) | precision | recall | loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in (("base (untrained head/adapters)", base), ("fine-tuned", tuned)):
        lines.append(f"| {name} | {m['accuracy']:.4f} | {m['f1']:.4f} | {m['precision']:.4f} | "
                     f"{m['recall']:.4f} | {m['loss']:.4f} |")
    lines += [
        "",
        f"- Trainable parameters: {params['trainable']:,} of {params['total']:,} ({100 * params['share']:.3f}%)",
        f"- Weight memory: {_mb(mem['weights_bytes'])}; peak memory ({mem['peak_kind']}): {_mb(mem['peak_bytes'])}",
        f"- Training: {metrics['training']['steps']} steps, {metrics['training']['seconds']:.1f} s, "
        f"{metrics['training']['samples_per_s']:.1f} samples/s; evaluation {tuned['samples_per_s']:.1f} samples/s",
        *confusion_lines(tuned, data["label_names"], metrics.get("thresholds")),
        "",
        *(["Fine-tuned on the test split, per class:", "", *per_class_lines(tuned)] if "per_class" in tuned else []),
        "![base vs fine-tuned](plots/before_after.png)",
        "![history](plots/history.png)",
        "",
    ]
    return "\n".join(lines)


def write_run_outputs(run_dir: Path, metrics: dict) -> None:
    """Plots, report.md and finally metrics.json (the completion marker)."""
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    plot_before_after(metrics["base"], metrics["test"], plots / "before_after.png")
    plot_history(metrics, plots / "history.png")
    (run_dir / "report.md").write_text(report_markdown(metrics))
    write_json(run_dir / COMPLETE_MARKER, metrics)


# -- `lightune evaluate`: one finished run scored on a data source ------------------------------------------------

def free_output_dir(root: Path, name: str, explicit: bool) -> Path:
    """root/name, or for a default name the first free root/name-2, -3, ...; ConfigError if an explicitly named
    directory exists (results are never overwritten)."""
    path = Path(root) / name
    if explicit and path.exists():
        raise ConfigError(f"{path} already exists; choose another --name")
    suffix = 2
    while path.exists():
        path = Path(root) / f"{name}-{suffix}"
        suffix += 1
    return path


def plot_confusion_matrix(matrix: list[list[int]], label_names: list[str], path: Path, title: str) -> None:
    """The confusion matrix as a heat map with its counts (rows: true label, columns: predicted)."""
    size = max(3.5, 0.8 * len(label_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(matrix, cmap="Blues")
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    ax.set_xticks(range(len(label_names)), label_names, rotation=45 if len(label_names) > 3 else 0)
    ax.set_yticks(range(len(label_names)), label_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    save_figure(fig, path)


METRIC_ROWS = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"), ("f1", "F1 (macro)"),
               ("f1_micro", "F1 (micro)"),
               ("precision", "precision (macro)"), ("recall", "recall (macro)"), ("roc_auc", "ROC-AUC"),
               ("pr_auc", "PR-AUC"), ("loss", "loss"))


def evaluation_table(result: dict) -> list[str]:
    """Markdown rows: each metric on the evaluated data beside the run's own test split."""
    scored, own = result["metrics"], result["run_test"]
    lines = [f"| metric | {result['data']['source']} ({result['data']['size']} texts) | the run's own test split |",
             "| --- | ---: | ---: |"]
    def cell(metrics: dict, key: str) -> str:
        return f"{metrics[key]:.4f}" if isinstance(metrics.get(key), (int, float)) else "-"

    for key, label in METRIC_ROWS:
        if key in scored:
            lines.append(f"| {label} | {cell(scored, key)} | {cell(own, key)} |")
    return lines


def evaluation_report_markdown(result: dict) -> str:
    """A short report of one evaluation."""
    data = result["data"]
    lines = [
        f"# lightune evaluation: {result['name']}",
        "",
        f"Run `{result['run_dir']}` ({result['method']} on `{result['model']}`, {result['pooling']} pooling, "
        f"max_length {result['max_length']}, {result['truncation']} truncation) on `{data['source']}`, "
        f"split `{data['split']}`: {data['size']} texts "
        f"(fingerprint `{data['fingerprint']}`), device {result['device']}.",
        "",
        *evaluation_table(result),
        "",
        *confusion_lines(result["metrics"], data["label_names"], result.get("thresholds")),
        "",
        *per_class_lines(result["metrics"]),
        *(["![confusion matrix](confusion_matrix.png)"] if "confusion_matrix" in result["metrics"] else []),
        "",
    ]
    return "\n".join(lines)


def write_evaluation_outputs(out_dir: Path, result: dict) -> None:
    """confusion_matrix.png (single-label runs), report.md and finally metrics.json (the completion marker)."""
    if "confusion_matrix" in result["metrics"]:
        plot_confusion_matrix(result["metrics"]["confusion_matrix"], result["data"]["label_names"],
                              out_dir / "confusion_matrix.png", f"{result['run_name']} on {result['data']['source']}")
    write_text(out_dir / "report.md", evaluation_report_markdown(result))
    write_json(out_dir / COMPLETE_MARKER, result)


# -- `lightune compare`: one point or bar per configuration (the tables come from compare_report) ---------------

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
    save_figure(fig, path)


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
    save_figure(fig, path)


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
    save_figure(fig, path)
