"""What training minimises: cross-entropy on the classifier's logits, or (few-shot) a contrastive loss on the
pooled sentence embeddings followed by a refit of the linear-probe head, as SetFit does (Tunstall et al. 2022).

With a few dozen examples, cross-entropy through a probe-started head memorises the training texts within a
few steps; the contrastive objective instead learns from every pair of texts in a batch (same class: cosine
similarity 1; different classes: 0), which is what makes SetFit accurate with 8-64 examples per class.
lightune trains the adapters (not the whole body) on in-batch pairs, so a step reads each text once. A batch
over the training token budget is embedded in chunks with the gradient cached on the embeddings (GradCache, Gao
et al. 2021: every pair still counts, and the memory is one chunk's graph, not the whole batch's).
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch

from .errors import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

# auto picks the contrastive objective up to this many training examples, else cross-entropy (measured at 32 and
# 128 examples on IMDb, cross-entropy at 2,500; the boundary between them is not: README, "Few-shot")
FEW_SHOT_MAX_EXAMPLES = 256
# methods the pair loss does not train with: head trains nothing under the pooling; prompt tuning (virtual tokens
# before the text) has not been tried with it
WITHOUT_PAIR_LOSS = ("head", "prompt")
# the contrastive schedule's least number of optimizer steps (epochs are raised to reach it), and its least
# batch size (a batch of 32 texts holds 496 pairs)
FEW_SHOT_MIN_STEPS = 40
FEW_SHOT_MIN_BATCH = 32
# the contrastive objective's default learning rate: the method's own (set for one epoch of cross-entropy)
# divided by this
FEW_SHOT_LR_DIVISOR = 3


def resolve_objective(cfg, n_train: int, pooling: str) -> str:
    """The objective a run trains with: cfg.objective, or for auto the contrastive one when the run is
    few-shot (at most FEW_SHOT_MAX_EXAMPLES single-label training examples, a probe-started head on mean
    pooling, a method that trains the encoder), else cross-entropy. ConfigError when contrastive is asked for
    where it cannot run."""
    reasons = contrastive_obstacles(cfg, pooling)
    if cfg.objective == "contrastive" and reasons:
        raise ConfigError(f"objective contrastive needs {reasons[0]}")
    if cfg.objective == "auto":
        return "contrastive" if not reasons and n_train <= FEW_SHOT_MAX_EXAMPLES else "cross_entropy"
    return cfg.objective


def contrastive_obstacles(cfg, pooling: str) -> list[str]:
    """Why the contrastive objective cannot train this configuration (empty when it can)."""
    reasons = []
    if cfg.problem != "single_label":
        reasons.append("single-label data (one class per text)")
    if cfg.head_init != "probe":
        reasons.append("--head-init probe (the head is refitted on the tuned embeddings)")
    if pooling != "mean":
        reasons.append("mean pooling (--pooling mean)")
    if cfg.peft in WITHOUT_PAIR_LOSS:
        reasons.append("a method that trains the encoder (not head or prompt)")
    return reasons


def least_steps(objective: str) -> int:
    """The fewest optimizer steps a run with this objective takes when max_steps is not given (the epochs are
    raised to reach them)."""
    return FEW_SHOT_MIN_STEPS if objective == "contrastive" else 1


def resolved_settings(cfg, objective: str) -> dict:
    """The settings a run with this objective trains with, where the configuration leaves them to the objective:

    - metric_for_best: loss for cross-entropy; accuracy for contrastive (its head is refitted at the end, so
      its validation loss is not comparable with the probe start's);
    - contrastive only: a third of the method's learning rate; LoRA/DoRA adapters on every linear layer of the
      encoder (not only query/value: the pair loss reshapes the whole embedding, as SetFit's full fine-tuning
      does); batches of at least FEW_SHOT_MIN_BATCH texts, drawn at random (not grouped by length) so that
      each epoch pairs other texts.
    """
    settings = {"objective": objective,
                "metric_for_best": cfg.metric_for_best or ("accuracy" if objective == "contrastive" else "loss")}
    if objective == "contrastive":
        from . import methods

        settings.update(learning_rate=cfg.learning_rate or cfg.lr / FEW_SHOT_LR_DIVISOR, group_by_length=False,
                        batch_size=max(cfg.batch_size, FEW_SHOT_MIN_BATCH))
        if cfg.target_modules is None and methods.get(cfg.peft).kind == "lora":
            settings["target_modules"] = ["all-linear"]
    return settings


def auto_notice(given, resolved, objective: str, n_train: int, n_steps: int, processes: int = 1) -> str | None:
    """One line for the log when `--objective auto` changed what the run trains with (the contrastive objective
    for a few-shot run: its steps, batch size, learning rate, targets, best metric), with how to keep the given
    settings; None when auto changed nothing (cross-entropy) or the objective was given."""
    if given.objective != "auto" or objective != "contrastive":
        return None
    per_epoch = math.ceil(n_train / (given.batch_size * processes))
    asked = given.max_steps or max(1, math.ceil(given.epochs * per_epoch))
    changes = [f"{n_steps} steps" + (f" (the given epochs/max_steps give {asked})" if asked != n_steps else "")]
    for key, label in (("batch_size", "batch size"), ("learning_rate", "learning rate"),
                       ("target_modules", "targets"), ("metric_for_best", "best by")):
        new = resolved.lr if key == "learning_rate" else getattr(resolved, key)
        old = given.lr if key == "learning_rate" else getattr(given, key)
        if new != old:
            shown = ",".join(new) if isinstance(new, list) else (f"{new:g}" if isinstance(new, float) else new)
            changes.append(f"{label} {shown}")
    return (f"objective auto chose contrastive for this few-shot run ({n_train} training examples, at most "
            f"{FEW_SHOT_MAX_EXAMPLES}): {', '.join(changes)}; to keep the given settings add --objective "
            f"cross_entropy")


def class_weight_tensor(setting, train_labels: list[int], n_classes: int, device: torch.device) -> torch.Tensor | None:
    """The loss weights of the classes: None for none; balanced: n / (n_classes x count) over the training
    split (scikit-learn's compute_class_weight; a class without rows gets 1); or the given numbers."""
    if setting == "none":
        return None
    if setting == "balanced":
        import numpy as np
        from sklearn.utils.class_weight import compute_class_weight

        present = np.unique(train_labels)
        weights = np.ones(n_classes)
        weights[present] = compute_class_weight("balanced", classes=present, y=np.asarray(train_labels))
        return torch.tensor(weights, dtype=torch.float32, device=device)
    return torch.tensor(setting, dtype=torch.float32, device=device)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                           denominator) -> torch.Tensor:
    """The rows' cross-entropies, each times its class's weight (1 without weights), summed and divided by
    denominator. With the batch's total weight as denominator this is torch's weighted mean cross-entropy of
    the batch, and the chunks of a batch add up to it."""
    return torch.nn.functional.cross_entropy(logits.float(), labels, weight=weights, reduction="sum") / denominator


def multi_label_loss(logits: torch.Tensor, labels: torch.Tensor, denominator) -> torch.Tensor:
    """The binary cross-entropy of every (row, label) pair (transformers' BCEWithLogitsLoss for a
    multi_label_classification model), summed and divided by denominator: rows x labels of the whole batch gives
    the batch's mean, and its chunks add up to it."""
    return torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels.float(),
                                                                reduction="sum") / denominator


def contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SetFit's CosineSimilarityLoss over every pair of a batch: the mean squared difference between the pair's
    cosine similarity and 1 (same label) or 0 (different labels)."""
    unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    rows, cols = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
    similarity = (unit[rows] * unit[cols]).sum(dim=-1)
    target = (labels[rows] == labels[cols]).float()
    return torch.nn.functional.mse_loss(similarity, target)


class PooledEmbeddings:
    """Captures the pooled sentence embeddings of each forward pass (the output of the model's mean pooler,
    before the classifier's dropout) while in use as a context manager."""

    def __init__(self, model):
        from .heads import MeanPooler

        poolers = [m for m in model.modules() if isinstance(m, MeanPooler)]
        if len(poolers) != 1:
            raise ConfigError("objective contrastive needs mean pooling (--pooling mean)")
        self.pooler, self.value, self.handle = poolers[0], None, None

    def __enter__(self) -> PooledEmbeddings:
        self.handle = self.pooler.register_forward_hook(self._keep)
        return self

    def _keep(self, module, args, output) -> None:
        self.value = output

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def backward_contrastive(model, batch: dict, accelerator: Accelerator, embeddings: PooledEmbeddings,
                         chunks: list[dict] | None = None) -> torch.Tensor:
    """Forward and backward one batch under the contrastive objective (all of its pairs at once); returns the
    detached loss. chunks: the batch cut into row chunks within the training token budget (steps.split_batch);
    with more than one, the gradient-cached step (backward_contrastive_cached), else one pass with a graph."""
    if chunks is not None and len(chunks) > 1:
        return backward_contrastive_cached(model, chunks, batch["labels"], accelerator, embeddings)
    loss = contrastive_loss(_pooled(model, batch, accelerator, embeddings), batch["labels"])
    accelerator.backward(loss)
    return loss.detach()


class ChunkRandomState:
    """The random state at the start of a chunk's first forward pass (the CPU's and that of each device its
    tensors are on), replayed for its second pass so that dropout draws the same masks in both: the gradient
    cached on the first pass's embeddings is only the gradient of the second pass's if they are the same
    embeddings (GradCache's RandContext, torch.utils.checkpoint's approach)."""

    def __init__(self, *tensors: torch.Tensor):
        from torch.utils.checkpoint import get_device_states

        self.cpu = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)
        self.device_type = next((t.device.type for t in tensors if t.device.type not in ("cpu", "meta")), "cuda")

    @contextlib.contextmanager
    def replay(self):
        """The chunk's state while in use; afterwards the state as it was (the step draws each mask once)."""
        from torch.utils.checkpoint import set_device_states

        with torch.random.fork_rng(devices=self.devices, device_type=self.device_type):
            torch.set_rng_state(self.cpu)
            set_device_states(self.devices, self.device_states, device_type=self.device_type)
            yield


def _pooled(model, chunk: dict, accelerator: Accelerator, embeddings: PooledEmbeddings) -> torch.Tensor:
    """The pooled embeddings of one chunk's forward pass (with a graph or not, as the caller's grad mode says)."""
    with accelerator.autocast():
        model(**{k: v for k, v in chunk.items() if k != "labels"})
    return embeddings.value


def backward_contrastive_cached(model, chunks: list[dict], labels: torch.Tensor, accelerator: Accelerator,
                                embeddings: PooledEmbeddings) -> torch.Tensor:
    """The contrastive step of a batch cut into chunks, with the same loss and gradients as one pass over it:

    1. embed every chunk without a graph, keeping each chunk's random state (ChunkRandomState);
    2. the pair loss of the whole batch on those embeddings, and its gradient with respect to them;
    3. each chunk again with a graph, its random state replayed (the same dropout masks, so the same
       embeddings), back-propagating (embeddings x cached gradient).sum(): by the chain rule its parameter
       gradients are the chunk's share of the batch loss's, and they add up over the chunks.

    Only one chunk's graph is alive at a time. The surrogate goes through accelerator.backward (mixed-precision
    loss scaling); gradients are synchronised across processes on the last chunk only. Returns the detached loss.
    """
    states, pooled = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(ChunkRandomState(*chunk.values()))
            pooled.append(_pooled(model, chunk, accelerator, embeddings).float())
    # float32 leaf: the cached gradient of half-precision embeddings would underflow before loss scaling
    cached = torch.cat(pooled).requires_grad_()
    loss = contrastive_loss(cached, labels)
    (gradient,) = torch.autograd.grad(loss, cached)
    for i, (chunk, state, grad) in enumerate(zip(chunks, states, gradient.split([len(p) for p in pooled]))):
        sync = contextlib.nullcontext() if i == len(chunks) - 1 else accelerator.no_sync(model)
        with sync, state.replay():
            accelerator.backward((_pooled(model, chunk, accelerator, embeddings).float() * grad).sum())
    embeddings.value = None  # the last chunk's graph is freed by its backward; its output need not stay
    return loss.detach()
