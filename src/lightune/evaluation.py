"""Evaluation: run a model over a data loader and score it with scikit-learn."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from sklearn.metrics import (accuracy_score, average_precision_score, balanced_accuracy_score, confusion_matrix,
                             precision_recall_fscore_support, roc_auc_score)
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, n_classes: int,
                           probabilities: np.ndarray | None = None, label_names: list[str] | None = None) -> dict:
    """Accuracy, balanced accuracy, macro F1/precision/recall, per-class precision/recall/F1/support, the
    confusion matrix (rows: true, columns: predicted) and, for two classes with probabilities, ROC-AUC and
    PR-AUC (average precision) of the second class; an AUC is None when the labels hold one class only
    (or the probabilities are not finite)."""
    classes = list(range(n_classes))
    names = label_names or [str(i) for i in classes]
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, average="macro", labels=classes, zero_division=0
    )
    per_class = precision_recall_fscore_support(labels, predictions, average=None, labels=classes, zero_division=0)
    metrics = {
        "accuracy": float(accuracy_score(labels, predictions)),
        "balanced_accuracy": float(balanced_accuracy_score(labels, predictions)),
        "f1": float(f1),
        "precision": float(precision),
        "recall": float(recall),
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
                      for name, p, r, f, n in zip(names, *per_class)},
        "confusion_matrix": confusion_matrix(labels, predictions, labels=classes).tolist(),
    }
    if n_classes == 2 and probabilities is not None:
        both = len(set(labels.tolist())) == 2 and bool(np.isfinite(probabilities).all())  # NaN: broken weights
        metrics["roc_auc"] = float(roc_auc_score(labels, probabilities[:, 1])) if both else None
        metrics["pr_auc"] = float(average_precision_score(labels, probabilities[:, 1])) if both else None
    return metrics


@torch.no_grad()
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
        labels = batch.pop("labels")
        batch.pop("length", None)
        with autocast():
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        all_logits.append(logits.float().cpu())
        all_labels.append(labels.cpu())
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


def score(logits: torch.Tensor, labels: torch.Tensor, n_classes: int, label_names: list[str] | None = None) -> dict:
    """Loss (unweighted cross-entropy) and the classification metrics of logits against labels."""
    probabilities = torch.softmax(logits.float(), dim=-1).numpy()
    metrics = classification_metrics(labels.numpy(), logits.argmax(-1).numpy(), n_classes, probabilities,
                                     label_names)
    metrics["loss"] = torch.nn.functional.cross_entropy(logits, labels).item()
    return metrics


def evaluate(model, loader, n_classes: int, accelerator=None, desc: str = "evaluating", progress: bool = True,
             label_names: list[str] | None = None) -> dict:
    """The metrics of score (see classification_metrics) and throughput on one split."""
    start = time.perf_counter()
    logits, labels = predict_logits(model, loader, accelerator, desc, progress)
    seconds = time.perf_counter() - start
    metrics = score(logits, labels, n_classes, label_names)
    metrics.update(examples=len(labels), seconds=seconds, samples_per_s=len(labels) / seconds)
    return metrics
