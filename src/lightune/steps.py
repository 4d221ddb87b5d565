"""One optimizer step of training: a batch forward and backward (in row chunks within a token budget, or all its
pairs at once under the contrastive objective), gradient clipping, the optimizer and scheduler steps; and the one
host sync of the loop, reading the steps' losses at the evaluation points."""

from __future__ import annotations

import contextlib
import math

import torch
from accelerate import Accelerator

from . import objectives
from .errors import TrainingError


def split_batch(batch: dict, max_tokens: int | None) -> list[dict]:
    """Row chunks of a padded batch, each at most max_tokens padded tokens and trimmed to its own longest text."""
    n, width = batch["input_ids"].shape
    rows = n if max_tokens is None else max(1, max_tokens // width)
    chunks = []
    for start in range(0, n, rows):
        chunk = {k: v[start:start + rows] for k, v in batch.items()}
        if "attention_mask" in chunk and rows < n:
            used = int(chunk["attention_mask"].sum(dim=1).max())
            chunk = {k: (v[:, :used] if v.dim() == 2 and v.shape[1] == width else v) for k, v in chunk.items()}
        chunks.append(chunk)
    return chunks


def backward_in_chunks(model, batch: dict, accelerator: Accelerator, max_tokens: int | None,
                       class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Forward and backward one batch in chunks with gradient accumulation; returns the batch's mean loss as a
    detached tensor on the device (reading it is a host sync: left to the evaluation points).

    Each chunk's loss is divided by the whole batch's total weight (its rows without class weights; rows x labels
    for multi-hot labels), so the summed gradient equals the whole batch's; gradients are synchronised across
    processes on the last chunk only.
    """
    chunks = split_batch(batch, max_tokens)
    labels = batch["labels"]
    multi_label = labels.dim() == 2  # multi-hot rows: binary cross-entropy per label
    denominator = labels.numel() if class_weights is None else class_weights[labels].sum()
    total = torch.zeros((), device=labels.device)
    for i, chunk in enumerate(chunks):
        sync = contextlib.nullcontext() if i == len(chunks) - 1 else accelerator.no_sync(model)
        inputs = {k: v for k, v in chunk.items() if k != "labels"}
        with sync:
            with accelerator.autocast():
                logits = model(**inputs).logits
            loss = (objectives.multi_label_loss(logits, chunk["labels"], denominator) if multi_label
                    else objectives.weighted_cross_entropy(logits, chunk["labels"], class_weights, denominator))
            accelerator.backward(loss)
        total += loss.detach()
    return total


def train_steps(model, loader, optimizer, scheduler, accelerator, cfg, chunk_tokens: int | None = None,
                class_weights: torch.Tensor | None = None, embeddings: objectives.PooledEmbeddings | None = None):
    """One optimizer step per batch of the loader, yielding (the step's loss as a detached device tensor,
    examples seen). With embeddings (a capture of the pooled embeddings), the step minimises the contrastive
    loss, else cross-entropy. No host sync: losses are read (and checked to be finite) at the evaluation points."""
    for batch in loader:
        model.train()  # again after each evaluation
        batch.pop("length", None)
        if embeddings is not None:
            loss = objectives.backward_contrastive(model, batch, accelerator, embeddings)
        else:
            loss = backward_in_chunks(model, batch, accelerator, chunk_tokens, class_weights)
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        yield loss, batch["labels"].shape[0] * accelerator.num_processes


def finite_losses(pending: list[tuple[torch.Tensor, int, int]]) -> list[float]:
    """The losses of the steps since the last evaluation, read in one host sync; TrainingError naming the first
    step whose loss is NaN or infinite, so diverged weights are never saved as a run."""
    values = torch.stack([loss for loss, _, _ in pending]).tolist() if pending else []
    for value, (_, epoch, step) in zip(values, pending):
        if not math.isfinite(value):
            raise TrainingError(f"training diverged: the loss is {value} at step {step} of epoch {epoch}; "
                                "lower --lr or keep gradient clipping on (--max-grad-norm)")
    return values
