"""The classification head's input and start: which pooled representation it reads, and a probe-fitted start.

Sentence encoders such as all-MiniLM-L6-v2 were trained to be read through the mean of their token states
(their sentence-transformers `1_Pooling/config.json` says so), not through BERT's [CLS] pooler, which that
training never tuned. `--pooling auto` reads what the model ships; `--head-init probe` starts the classifier
from a logistic regression fitted on the frozen pooled features (linear probing, then fine-tuning: "LP-FT",
Kumar et al. 2022), so fine-tuning starts from the linear probe instead of a random head.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ModelError

PROBE_C = 1.0  # inverse L2 strength of the probe's logistic regression (scikit-learn's default)


def shipped_pooling(model_path: str) -> str | None:
    """'mean' or 'cls' from a sentence-transformers pooling config next to the model, None when it ships none."""
    config = Path(model_path) / "1_Pooling" / "config.json"
    if not config.is_file():
        return None
    try:
        modes = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    if modes.get("pooling_mode_mean_tokens"):
        return "mean"
    if modes.get("pooling_mode_cls_token"):
        return "cls"
    return None


def supports_mean_pooling(model) -> bool:
    """Mean pooling replaces the encoder's [CLS] pooler: BERT-style models whose head reads `pooler`."""
    return hasattr(model.base_model, "pooler") and hasattr(model, "classifier")


def resolve_pooling(requested: str, model_path: str, model) -> str:
    """The pooling a run uses: the requested one, or for 'auto' the model's own (else its architecture's)."""
    if requested == "auto":
        shipped = shipped_pooling(model_path)
        return "mean" if shipped == "mean" and supports_mean_pooling(model) else "cls"
    if requested == "mean" and not supports_mean_pooling(model):
        raise ModelError(f"--pooling mean needs a BERT-style model with a pooler; {model.config.model_type} "
                         "reads its own head token: use --pooling cls")
    return requested


class MeanPooler(nn.Module):
    """Mean of the token states over real tokens (padding excluded), in place of BERT's [CLS] pooler.

    BERT calls its pooler with the hidden states only, so a forward pre-hook on the encoder hands it the
    attention mask of the current batch (`use_mean_pooling`).
    """

    def __init__(self):
        super().__init__()
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask
        if mask is None or mask.shape != hidden_states.shape[:2]:
            return hidden_states.mean(dim=1)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def use_mean_pooling(model) -> None:
    """Make the classifier read the masked mean of the last token states (BERT-style models). On a peft model it
    changes the model inside (get_base_model()): its `base_model` is peft's tuner, not the encoder."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    encoder = model.base_model
    pooler = MeanPooler()
    encoder.pooler = pooler

    def remember_mask(module, args, kwargs):
        pooler.attention_mask = kwargs.get("attention_mask")

    encoder.register_forward_pre_hook(remember_mask, with_kwargs=True)


def apply_pooling(model, pooling: str) -> None:
    """Set up a loaded model for a resolved pooling: 'mean', or 'cls' (the architecture's own head: nothing to do);
    anything else is a ModelError, never a silent [CLS]."""
    if pooling == "mean":
        use_mean_pooling(model)
    elif pooling != "cls":
        raise ModelError(f"pooling must be 'cls' or 'mean'; got {pooling!r}")


def final_linear(model) -> nn.Linear:
    """The classifier's last linear layer: the one a linear probe replaces."""
    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)] if head is not None else []
    if not linears:
        raise ModelError(f"cannot find the classification layer of {type(model).__name__} for --head-init probe")
    return linears[-1]


@torch.no_grad()
def head_features(model, loader, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(inputs of the final classification layer, labels) for every example of a loader, in eval mode."""
    from tqdm.auto import tqdm

    layer, captured = final_linear(model), []
    handle = layer.register_forward_hook(lambda module, args, output: captured.append(args[0].float().cpu()))
    labels = []
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(loader, desc="probe features", leave=False, disable=not progress):
            labels.append(batch.pop("labels"))
            batch.pop("length", None)
            model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured).numpy(), torch.cat(labels).numpy()


def fit_probe(features: np.ndarray, labels: np.ndarray, n_classes: int, class_weight: dict[int, float] | None = None):
    """A scikit-learn logistic regression on frozen features (L2, C=PROBE_C, classes weighted by class_weight as
    in the training loss); every class must be present.
    Multi-hot labels (multi-label): one binary logistic regression per label, each needing rows with and without it."""
    from sklearn.linear_model import LogisticRegression

    if labels.ndim == 2:
        from sklearn.multioutput import MultiOutputClassifier

        constant = [str(j) for j in range(labels.shape[1]) if len(np.unique(labels[:, j])) < 2]
        if constant:
            raise ModelError(f"--head-init probe needs training rows with and without each label; label index "
                             f"{', '.join(constant)} is on every row or on none: use --head-init random")
        return MultiOutputClassifier(LogisticRegression(C=PROBE_C, max_iter=2000)).fit(features, labels.astype(int))
    missing = sorted(set(range(n_classes)) - set(np.unique(labels).tolist()))
    if missing:
        raise ModelError(f"--head-init probe needs training examples of every class; none of class index "
                         f"{', '.join(map(str, missing))}: use --head-init random")
    return LogisticRegression(C=PROBE_C, max_iter=2000, class_weight=class_weight).fit(features, labels)


def set_head_from_probe(model, probe) -> None:
    """Load a fitted logistic regression into the final layer: the model's probabilities become the probe's.

    A binary probe has one weight vector w: logits (-z/2, z/2) with z = w.x + b give softmax = sigmoid(z).
    """
    layer = final_linear(model)
    if hasattr(probe, "estimators_"):  # multi-label: one binary regression per label; sigmoid(w.x + b) is its own
        coef = torch.as_tensor(np.concatenate([e.coef_ for e in probe.estimators_]), dtype=layer.weight.dtype)
        intercept = torch.as_tensor(np.concatenate([e.intercept_ for e in probe.estimators_]), dtype=layer.weight.dtype)
    else:
        coef = torch.as_tensor(probe.coef_, dtype=layer.weight.dtype)
        intercept = torch.as_tensor(probe.intercept_, dtype=layer.weight.dtype)
    if coef.shape[0] == 1:
        coef, intercept = torch.cat([-coef, coef]) / 2, torch.cat([-intercept, intercept]) / 2
    layer.weight.data.copy_(coef)
    if layer.bias is not None:
        layer.bias.data.copy_(intercept)


def start_head_from_probe(model, loader, n_classes: int, device: torch.device, progress: bool,
                          class_weights: torch.Tensor | None = None) -> None:
    """Fit a logistic regression on the frozen pooled training features (weighting the classes as the training
    loss does) and start the classifier from it."""
    if getattr(model, "hf_quantizer", None) is None:
        model.to(device)  # quantized models were loaded onto their device
    features, labels = head_features(model, loader, progress)
    weights = None if class_weights is None else dict(enumerate(class_weights.tolist()))
    set_head_from_probe(model, fit_probe(features, labels, n_classes, weights))
