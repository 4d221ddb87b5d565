"""Evaluation: run a model over a data loader and score it with scikit-learn."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score, confusion_matrix,
                             f1_score, multilabel_confusion_matrix, precision_recall_curve,
                             precision_recall_fscore_support, roc_auc_score)
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .calibration import expected_calibration_error
from .forward import forward_logits


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, n_classes: int,
                           probabilities: np.ndarray | None = None, label_names: list[str] | None = None) -> dict:
    """Accuracy, balanced accuracy, macro F1/precision/recall, per-class precision/recall/F1/support, the
    confusion matrix (rows: true, columns: predicted) and, for two classes with probabilities, ROC-AUC and
    PR-AUC (average precision) of the second class; an AUC is None when the labels hold one class only
    (or the probabilities are not finite). The per-class and macro figures are those of the classes the labels
    hold (data with a subset of the classes: a class without rows has no recall); the confusion matrix has them
    all."""
    classes = list(range(n_classes))
    names = label_names or [str(i) for i in classes]
    present = sorted(set(labels.tolist()) & set(classes)) or classes
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, average="macro", labels=present, zero_division=0
    )
    per_class = precision_recall_fscore_support(labels, predictions, average=None, labels=present, zero_division=0)
    metrics = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
        "f1": float(f1),
        "precision": float(precision),
        "recall": float(recall),
        "per_class": per_class_scores([names[c] for c in present], per_class),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=classes).tolist(),
    }
    if n_classes == 2 and probabilities is not None:
        both = len(set(labels.tolist())) == 2 and bool(np.isfinite(probabilities).all())  # NaN: broken weights
        metrics["roc_auc"] = float(roc_auc_score(labels, probabilities[:, 1])) if both else None
        metrics["pr_auc"] = float(average_precision_score(labels, probabilities[:, 1])) if both else None
    return metrics


def per_class_scores(names: list[str], scores) -> dict:
    """{name: {precision, recall, f1, support}} from precision_recall_fscore_support(average=None)."""
    return {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
            for name, p, r, f, n in zip(names, *scores)}


DEFAULT_THRESHOLD = 0.5  # multi-label: a label is predicted when its probability reaches its threshold


def multi_label_metrics(labels: np.ndarray, predictions: np.ndarray, label_names: list[str]) -> dict:
    """Multi-label metrics of multi-hot labels and predictions (rows x labels): subset accuracy (every label of a
    row right; also `accuracy`), micro and macro F1 (`f1` is the macro one, as for single-label runs), macro
    precision/recall, per-label precision/recall/F1/support and each label's 2x2 confusion matrix."""
    labels, predictions = labels.astype(int), predictions.astype(int)
    precision, recall, f1, _ = precision_recall_fscore_support(labels, predictions, average="macro", zero_division=0)
    per_label = precision_recall_fscore_support(labels, predictions, average=None, zero_division=0)
    subset = float(accuracy_score(labels, predictions))
    return {
        "accuracy": subset,
        "subset_accuracy": subset,
        "f1": float(f1),
        "f1_macro": float(f1),
        "f1_micro": float(f1_score(labels, predictions, average="micro", zero_division=0)),
        "precision": float(precision),
        "recall": float(recall),
        "per_class": per_class_scores(label_names, per_label),
        "label_confusion_matrices": {name: m.tolist() for name, m in
                                     zip(label_names, multilabel_confusion_matrix(labels, predictions))},
    }


def tune_thresholds(probabilities: np.ndarray, labels: np.ndarray) -> list[float]:
    """Per label, the probability threshold that maximises F1 on these rows (validation): one of the rows'
    probabilities (precision_recall_curve's candidates); DEFAULT_THRESHOLD for a label no row has."""
    thresholds = []
    for j in range(labels.shape[1]):
        if not labels[:, j].any():
            thresholds.append(DEFAULT_THRESHOLD)
            continue
        precision, recall, candidates = precision_recall_curve(labels[:, j], probabilities[:, j])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        thresholds.append(float(candidates[int(np.argmax(f1))]))
    return thresholds


def multi_label_predictions(probabilities: np.ndarray, thresholds: list[float] | None) -> np.ndarray:
    """Multi-hot predictions: each label whose probability reaches its threshold (DEFAULT_THRESHOLD without)."""
    limits = np.asarray(thresholds if thresholds is not None else [DEFAULT_THRESHOLD] * probabilities.shape[1])
    return (probabilities >= limits).astype(int)


def predict_logits(model, loader, accelerator=None, desc: str = "evaluating", progress: bool = True):
    """Logits and labels of every example of a loader; eval mode, no gradients.

    With an accelerator of several processes each runs its share of the loader's batches (accelerate's
    split_between_processes: uneven shares, no padding rows) and the shares are gathered, so every example is
    counted exactly once; every process gets all the rows.
    """
    model.eval()
    device = next(model.parameters()).device if accelerator is None else accelerator.device
    autocast = accelerator.autocast if accelerator is not None else contextlib.nullcontext
    all_logits, all_labels = [], []
    for batch in tqdm(own_share(loader, accelerator), desc=desc, leave=False, disable=not progress):
        all_logits.append(forward_logits(model, batch, device, autocast))
        all_labels.append(batch["labels"].cpu())
    if accelerator is not None and accelerator.num_processes > 1:
        shares = gather_object([(all_logits, all_labels)])
        all_logits = [t for share_logits, _ in shares for t in share_logits]
        all_labels = [t for _, share_labels in shares for t in share_labels]
    return torch.cat(all_logits), torch.cat(all_labels)


def own_share(loader, accelerator):
    """loader itself in one process; else a loader over this process's share of its batches."""
    if accelerator is None or accelerator.num_processes == 1:
        return loader
    with accelerator.split_between_processes(list(loader.batch_sampler)) as batches:
        return DataLoader(loader.dataset, batch_sampler=batches, collate_fn=loader.collate_fn,
                          num_workers=loader.num_workers)


def score(logits: torch.Tensor, labels: torch.Tensor, n_classes: int, label_names: list[str] | None = None,
          thresholds: list[float] | None = None) -> dict:
    """Loss (unweighted cross-entropy), expected calibration error (calibration.expected_calibration_error) and
    the classification metrics of logits against labels; for multi-hot labels (multi-label) the mean binary
    cross-entropy and multi_label_metrics at the thresholds (0.5 without). A finished run's logits come here
    divided by its temperature (calibration.apply_temperature)."""
    if labels.dim() == 2:
        probabilities = torch.sigmoid(logits.float()).numpy()
        names = label_names or [str(i) for i in range(n_classes)]
        metrics = multi_label_metrics(labels.numpy(), multi_label_predictions(probabilities, thresholds), names)
        metrics["loss"] = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float()).item()
        metrics["ece"] = _finite_or_none(expected_calibration_error(probabilities, labels.numpy()))
        return metrics
    probabilities = torch.softmax(logits.float(), dim=-1).numpy()
    metrics = classification_metrics(labels.numpy(), logits.argmax(-1).numpy(), n_classes, probabilities,
                                     label_names)
    metrics["loss"] = torch.nn.functional.cross_entropy(logits, labels).item()
    metrics["ece"] = _finite_or_none(expected_calibration_error(probabilities, labels.numpy()))
    return metrics


def _finite_or_none(value: float) -> float | None:
    """None for NaN (no rows, or broken weights' probabilities): metrics.json holds no NaN."""
    return value if np.isfinite(value) else None


def evaluate(model, loader, n_classes: int, accelerator=None, desc: str = "evaluating", progress: bool = True,
             label_names: list[str] | None = None, thresholds: list[float] | None = None) -> dict:
    """The metrics of score (see classification_metrics) and throughput on one split."""
    return evaluate_with_logits(model, loader, n_classes, accelerator, desc, progress, label_names, thresholds)[0]


def evaluate_with_logits(model, loader, n_classes: int, accelerator=None, desc: str = "evaluating",
                         progress: bool = True, label_names: list[str] | None = None,
                         thresholds: list[float] | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(evaluate's metrics, the logits, the labels): training keeps them to fit and measure calibration."""
    start = time.perf_counter()
    logits, labels = predict_logits(model, loader, accelerator, desc, progress)
    seconds = time.perf_counter() - start
    metrics = score(logits, labels, n_classes, label_names, thresholds)
    metrics.update(examples=len(labels), seconds=seconds, samples_per_s=len(labels) / seconds)
    return metrics, logits, labels


def choose_thresholds(cfg, n_labels: int, model, val_loader, accelerator,
                      progress: bool) -> list[float] | None:
    """Multi-label: each label's threshold, tuned on the validation split with tune_thresholds (the threshold
    that maximises the label's F1 there), else 0.5; None for single-label runs."""
    if cfg.problem != "multi_label":
        return None
    if not cfg.tune_thresholds:
        return [DEFAULT_THRESHOLD] * n_labels
    logits, labels = predict_logits(model, val_loader, accelerator, "tuning thresholds", progress)
    return tune_thresholds(torch.sigmoid(logits).numpy(), labels.numpy())
