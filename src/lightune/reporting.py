"""What a run directory shows a person: report.md and the plots of a run, of an evaluation and of a comparison
(matplotlib). Where runs live and how they are written atomically is runs.py's."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import methods  # noqa: E402
from .runs import COMPLETE_MARKER, atomic_file, write_json, write_text  # noqa: E402


def save_figure(fig, path: Path) -> None:
    """Save a figure as PNG atomically and close it."""
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


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
    for h in history:  # the self-training rounds (--unlabeled), named at their validation accuracy
        if h.get("self_training_round"):
            ax_acc.annotate(f"round {h['self_training_round']}", (h["epoch"], h["validation"]["accuracy"]),
                            textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
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


def plot_reliability(calibration: dict, path: Path) -> None:
    """Reliability diagram of the test split: per confidence bin, the share of right predictions against the mean
    confidence, before and after the run's temperature (a calibrated model lies on the diagonal); bars show how
    many predictions each bin holds."""
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(5, 5.2), sharex=True, height_ratios=(3, 1))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="calibrated")
    n = calibration["bins"]
    fitted = calibration.get("fitted_on") is not None
    for when, style in (("before", "o-"), ("after", "s-")) if fitted else (("before", "o-"),):
        bins = calibration[f"reliability_{when}"]
        points = [(c, a) for c, a in zip(bins["confidence"], bins["accuracy"]) if c is not None]
        label = (f"T = 1 (ECE {calibration['ece_before']:.3f})" if when == "before" else
                 f"T = {calibration['temperature']:.2f} (ECE {calibration['ece_after']:.3f})")
        ax.plot([c for c, _ in points], [a for _, a in points], style, label=label)
        ax_count.bar([(i + 0.5) / n for i in range(n)], bins["count"], width=1 / n, alpha=0.5, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed frequency" if not fitted else "accuracy")
    ax.set_title("Test split: reliability" + (f" ({n} bins)" if fitted else f" of every label ({n} bins)"))
    ax.legend(loc="upper left", fontsize=8)
    ax_count.set_xlabel("predicted probability (top class)" if fitted else "predicted probability (each label)")
    ax_count.set_ylabel("predictions")
    save_figure(fig, path)


def base_start(head_init: str | None) -> str:
    """What the base model of a run is: its head's start (the training log and report.md name it alike)."""
    return "linear probe head" if head_init == "probe" else "untrained head/adapters"


def below_base(test: dict, base: dict, head_init: str | None) -> str:
    """The warning of a run whose fine-tuned model ends below its base on test."""
    return (f"the fine-tuned model is below its base on test (accuracy {test['accuracy']:.4f} vs {base['accuracy']:.4f}, "
            f"{base_start(head_init)}); more data, more steps or another learning rate may help")


def calibration_lines(metrics: dict) -> list[str]:
    """Markdown: the test split's ECE before and after the run's temperature (runs from before: none)."""
    cal = metrics.get("calibration")
    if not cal:
        return []
    if cal.get("fitted_on") is None:
        return [f"- Calibration on test: expected calibration error (ECE, {cal['bins']} bins, mean over labels) "
                f"{cal['ece_before']:.4f}; no temperature ({cal.get('not_fitted', 'not fitted')})."]
    return [f"- Calibration on test: expected calibration error (ECE, {cal['bins']} bins of the top-class "
            f"probability) {cal['ece_before']:.4f} before, {cal['ece_after']:.4f} after temperature "
            f"{cal['temperature']:.3f} (fitted on validation, where the negative log-likelihood went from "
            f"{cal['validation_nll_before']:.4f} to {cal['validation_nll_after']:.4f}; test "
            f"{cal['test_nll_before']:.4f} to {cal['test_nll_after']:.4f}). Predict, serve and evaluate apply it; "
            "accuracy is unchanged."]


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


def labelled_lines(data: dict) -> list[str]:
    """Markdown: the labels the run learnt and chose from (runs from before this was recorded: none)."""
    n = data.get("labelled")
    if not n:
        return []
    where = ("held out of the given labels" if n["validation_from"] == "given" else "a separate validation split")
    return [f"- Labels: {n['total']:,} in all: {n['train']:,} to train on, {n['validation']:,} for validation "
            f"({where}); the test split is held out."]


def self_training_lines(record: dict | None, label_names: list[str]) -> list[str]:
    """Markdown: what the self-training rounds (--unlabeled) read, selected and measured, and which was kept."""
    if not record:
        return []
    metric = record["metric"]
    lines = [f"- Self-training on `{record['source']}`: {record['used']:,} unlabelled texts used of "
             f"{record['read']:,} read ({sum(record['dropped'].values()):,} dropped: "
             + ", ".join(f"{n:,} {why}" for why, n in record["dropped"].items()) + f"; {record['blank']:,} blank); "
             f"validation {metric} {record['validation_before']:.4f} before it."]
    for r in record["rounds"]:
        chosen = ", ".join(f"{name} {r['pseudo_labels'].get(name, 0):,}" for name in label_names)
        result = (f"validation {metric} {r['validation'][metric]:.4f}" + (" (kept)" if r.get("kept") else "")
                  if "validation" in r else ("diverged" if r.get("diverged") else "stopped"))
        lines.append(f"  - round {r['round']}: {r['scored']:,} texts pseudo-labelled, {chosen} selected; {result}")
    kept = record["kept_round"]
    lines.append("  - kept: " + (f"round {kept}" if kept else "the model before self-training"))
    return lines


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
    for name, m in ((f"base ({base_start(cfg.get('head_init'))})", base), ("fine-tuned", tuned)):
        lines.append(f"| {name} | {m['accuracy']:.4f} | {m['f1']:.4f} | {m['precision']:.4f} | "
                     f"{m['recall']:.4f} | {m['loss']:.4f} |")
    lines += [
        "",
        f"- Trainable parameters: {params['trainable']:,} of {params['total']:,} ({100 * params['share']:.3f}%)",
        f"- Weight memory: {_mb(mem['weights_bytes'])}; peak memory ({mem['peak_kind']}): {_mb(mem['peak_bytes'])}",
        f"- Training: {metrics['training']['steps']} steps, {metrics['training']['seconds']:.1f} s, "
        f"{metrics['training']['samples_per_s']:.1f} samples/s; evaluation {tuned['samples_per_s']:.1f} samples/s",
        *labelled_lines(data),
        *self_training_lines(metrics.get("self_training"), data["label_names"]),
        *confusion_lines(tuned, data["label_names"], metrics.get("thresholds")),
        *calibration_lines(metrics),
        *[f"- Warning: {w}" for w in metrics.get("warnings", [])],
        "",
        *(["Fine-tuned on the test split, per class:", "", *per_class_lines(tuned)] if "per_class" in tuned else []),
        "![base vs fine-tuned](plots/before_after.png)",
        "![history](plots/history.png)",
        *(["![reliability](plots/reliability.png)"] if metrics.get("calibration") else []),
        "",
    ]
    return "\n".join(lines)


def write_run_outputs(run_dir: Path, metrics: dict) -> None:
    """Plots, report.md and finally metrics.json (the completion marker)."""
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    plot_before_after(metrics["base"], metrics["test"], plots / "before_after.png")
    plot_history(metrics, plots / "history.png")
    if metrics.get("calibration"):
        plot_reliability(metrics["calibration"], plots / "reliability.png")
    (run_dir / "report.md").write_text(report_markdown(metrics))
    write_json(run_dir / COMPLETE_MARKER, metrics)


# -- `lightune evaluate`: one finished run scored on a data source ------------------------------------------------

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
               ("pr_auc", "PR-AUC"), ("loss", "loss"), ("ece", "ECE (calibration error)"))


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
        f"max_length {result['max_length']}, {result['truncation']} truncation, temperature "
        f"{result.get('temperature', 1.0):.3f}) on `{data['source']}`, "
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
