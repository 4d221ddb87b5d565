"""Calibration: how far a model's probabilities are from the frequencies they claim (expected calibration error,
reliability bins), and temperature scaling (Guo et al. 2017), fitted on the validation split after training.

A temperature T divides the logits before the softmax: T > 1 softens over-confident probabilities, T < 1 sharpens
them. It is one positive scalar, so the arg-max (the predicted label, hence accuracy) never changes. A run saves
its T in metrics.json ("calibration"); runs.read_run reads it back (1.0 for runs from before it existed) and
prediction, serving and evaluation apply it through apply_temperature.

Multi-label runs get their ECE measured (per label, averaged) but no temperature: their labels are decided by a
threshold per label tuned on validation, which a shared temperature would move; they keep T = 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .checkpoints import MIN_SELECTION_ROWS

ECE_BINS = 15  # equal-width bins of the confidence, as in Guo et al. 2017
# the fitted temperature is kept inside these bounds: a validation split the model gets entirely right drives
# the likelihood's optimum to T -> 0 (probabilities of exactly 1), one it gets entirely wrong to T -> infinity
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0
# a temperature is fitted only on a validation split of at least this many texts: on a handful (a few-shot run's
# 8 validation labels) one text moves it anywhere between the bounds, and all-right validation drives it to the
# lower one (probabilities of 1). The same bound as for choosing between evaluations: one split too small to decide
MIN_FIT_ROWS = MIN_SELECTION_ROWS
NOT_FITTED_MULTI_LABEL = ("multi-label run: each label is decided by its own threshold (tuned on validation), "
                          "which a temperature would move; probabilities are left as the model gives them")


def apply_temperature(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The logits divided by the run's temperature (float32): what every softmax of a finished run reads."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def reliability_bins(confidences: np.ndarray, outcomes: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Equal-width bins of [0, 1] over the confidences: per bin the number of predictions, their mean confidence
    and the mean outcome (1 right / 0 wrong; a bin without predictions has None for both means)."""
    confidences, outcomes = np.asarray(confidences, dtype=np.float64), np.asarray(outcomes, dtype=np.float64)
    # bin i holds (i/n, (i+1)/n]; a confidence of exactly 0 goes to the first bin
    index = np.clip(np.ceil(confidences * n_bins).astype(int) - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    conf_sums = np.bincount(index, weights=confidences, minlength=n_bins)
    outcome_sums = np.bincount(index, weights=outcomes, minlength=n_bins)
    return {"count": counts.tolist(),
            "confidence": [float(s / c) if c else None for s, c in zip(conf_sums, counts)],
            "accuracy": [float(s / c) if c else None for s, c in zip(outcome_sums, counts)]}


def ece_of_bins(bins: dict) -> float:
    """Sum over bins of (share of predictions) x |mean outcome - mean confidence|."""
    total = sum(bins["count"])
    return float(sum(n / total * abs(a - c) for n, a, c in zip(bins["count"], bins["accuracy"], bins["confidence"])
                     if n)) if total else float("nan")


def top_class(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Single-label: (confidence of each row's predicted class, 1 where it is the true class)."""
    return probabilities.max(axis=1), (probabilities.argmax(axis=1) == labels).astype(float)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE with n_bins equal-width bins: of the top-class probability for single-label rows (labels: class
    indices), or for multi-label rows (labels: multi-hot) the mean over labels of each label's binary ECE (its
    probability against whether the text has it)."""
    probabilities, labels = np.asarray(probabilities, dtype=np.float64), np.asarray(labels)
    if not len(labels) or not np.isfinite(probabilities).all():
        return float("nan")
    if labels.ndim == 2:
        return float(np.mean([ece_of_bins(reliability_bins(probabilities[:, j], labels[:, j], n_bins))
                              for j in range(labels.shape[1])]))
    return ece_of_bins(reliability_bins(*top_class(probabilities, labels), n_bins))


def probabilities_of(logits: torch.Tensor, multi_label: bool, temperature: float = 1.0) -> np.ndarray:
    scaled = apply_temperature(logits, temperature)
    return (torch.sigmoid(scaled) if multi_label else torch.softmax(scaled, dim=-1)).numpy()


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The one temperature that minimises the mean negative log-likelihood of labels (class indices) under
    softmax(logits / T): L-BFGS on log T (so T stays positive), kept within MIN/MAX_TEMPERATURE."""
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")
    low, high = math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.clamp(low, high).exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    value = float(log_t.detach().clamp(low, high).exp())
    return value if math.isfinite(value) else 1.0


def _nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> float:
    return float(torch.nn.functional.cross_entropy(apply_temperature(logits, temperature), labels.long()))


def calibrate(validation: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """metrics.json's "calibration" of a finished run from its (logits, labels) on validation and on test: the
    temperature fitted on validation (single-label) and the test split's ECE and reliability bins before and
    after it, with the negative log-likelihoods on both splits."""
    (val_logits, val_labels), (test_logits, test_labels) = validation, test
    multi = test_labels.dim() == 2
    not_fitted = NOT_FITTED_MULTI_LABEL if multi else few_rows_reason(len(val_labels))
    temperature = 1.0 if not_fitted else fit_temperature(val_logits, val_labels)
    out: dict = {"temperature": temperature, "fitted_on": None if not_fitted else "validation", "bins": ECE_BINS}
    for when, t in (("before", 1.0), ("after", temperature)):
        probabilities = probabilities_of(test_logits, multi, t)
        out[f"ece_{when}"] = expected_calibration_error(probabilities, test_labels.numpy())
        out[f"reliability_{when}"] = _reliability(probabilities, test_labels.numpy())
    if not_fitted:
        out["not_fitted"] = not_fitted
    if not multi:
        out.update(validation_nll_before=_nll(val_logits, val_labels, 1.0),
                   validation_nll_after=_nll(val_logits, val_labels, temperature),
                   test_nll_before=_nll(test_logits, test_labels, 1.0),
                   test_nll_after=_nll(test_logits, test_labels, temperature))
    return out


def few_rows_reason(rows: int) -> str | None:
    """Why no temperature is fitted on a validation split of this many texts (None: it is fitted)."""
    if rows >= MIN_FIT_ROWS:
        return None
    return (f"the validation split has {rows} texts (under {MIN_FIT_ROWS}): a temperature fitted on so few is not "
            f"trusted; probabilities are left as the model gives them")


def _reliability(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """The reliability diagram's bins: of the top-class probability (single-label), or of every label's
    probability against whether the text has it (multi-label, all labels pooled)."""
    if labels.ndim == 2:
        return reliability_bins(probabilities.ravel(), labels.ravel())
    return reliability_bins(*top_class(probabilities, labels))


def summary_line(result: dict) -> str:
    """The training log's line about a run's calibration."""
    if result["fitted_on"] is None:
        why = "multi-label" if result.get("not_fitted") == NOT_FITTED_MULTI_LABEL else "validation too small"
        return f"calibration on test: ECE {result['ece_before']:.4f} ({why}: no temperature)"
    return (f"calibration on test: ECE {result['ece_before']:.4f} -> {result['ece_after']:.4f} with temperature "
            f"{result['temperature']:.3f} (fitted on validation; predict, serve and evaluate apply it)")
