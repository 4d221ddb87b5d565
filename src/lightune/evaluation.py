"""Evaluation: run a model over a data loader and score it with scikit-learn."""

from __future__ import annotations

import time

import numpy as np
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from tqdm.auto import tqdm


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> dict:
    """Accuracy, macro F1/precision/recall and the confusion matrix (rows: true, columns: predicted)."""
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, average="macro", labels=list(range(n_classes)), zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1": float(f1),
        "precision": float(precision),
        "recall": float(recall),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=list(range(n_classes))).tolist(),
    }


@torch.no_grad()
def predict_logits(model, loader, accelerator=None, desc: str = "evaluating", progress: bool = True):
    """Logits and labels for every batch of a loader, in loader order; eval mode, no gradients."""
    model.eval()
    all_logits, all_labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
        labels = batch.pop("labels")
        batch.pop("length", None)
        if accelerator is None:
            device = next(model.parameters()).device
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**batch).logits
        else:
            with accelerator.autocast():
                logits = model(**batch).logits
            logits, labels = accelerator.gather_for_metrics((logits, labels))
        all_logits.append(logits.float().cpu())
        all_labels.append(labels.cpu())
    return torch.cat(all_logits), torch.cat(all_labels)


def score(logits: torch.Tensor, labels: torch.Tensor, n_classes: int) -> dict:
    """Loss (unweighted cross-entropy) and the classification metrics of logits against labels."""
    metrics = classification_metrics(labels.numpy(), logits.argmax(-1).numpy(), n_classes)
    metrics["loss"] = torch.nn.functional.cross_entropy(logits, labels).item()
    return metrics


def evaluate(model, loader, n_classes: int, accelerator=None, desc: str = "evaluating", progress: bool = True) -> dict:
    """Loss, accuracy, F1, precision, recall, confusion matrix and throughput on one split."""
    start = time.perf_counter()
    logits, labels = predict_logits(model, loader, accelerator, desc, progress)
    seconds = time.perf_counter() - start
    metrics = score(logits, labels, n_classes)
    metrics.update(examples=len(labels), seconds=seconds, samples_per_s=len(labels) / seconds)
    return metrics
