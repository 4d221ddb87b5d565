"""The parts of the training loop below the recipe: the loaders and the token budgets of their batches; one
optimizer step (a batch forward and backward, in row chunks within a token budget or, under the contrastive
objective, all its pairs at once, over the budget in chunks with the gradient cached on the embeddings; gradient
clipping; the optimizer and scheduler steps); and the one host sync of the loop, reading the steps' losses at the
evaluation points."""

from __future__ import annotations

import contextlib
import math

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding
from transformers.trainer_pt_utils import LengthGroupedSampler, get_parameter_names

from . import forward, methods, objectives
from .config import TrainConfig
from .errors import TrainingError


def make_train_loader(ds, tokenizer, batch_size: int, group_by_length: bool, seed: int, num_workers: int,
                      pad_multiple: int | None = None, device_type: str = "cpu") -> DataLoader:
    """Shuffled batches padded on the fly (widths rounded up to pad_multiple, see forward.pad_multiple); with
    group_by_length, texts of similar length share a batch. All the randomness of an epoch's order comes from the
    loader's generator (reseeded per epoch by the training loop). The texts come tokenized; on CUDA the batches
    are pinned and prefetched (loader_options)."""
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_multiple)
    generator = torch.Generator().manual_seed(seed)
    options = loader_options(device_type, num_workers)
    if group_by_length:
        sampler = LengthGroupedSampler(batch_size, lengths=list(ds["length"]), generator=generator)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=collate, generator=generator,
                          **options)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate, **options)


PREFETCH_BATCHES = 4  # batches each worker keeps ready on CUDA


def loader_options(device_type: str, num_workers: int) -> dict:
    """DataLoader settings of the training batches. On CUDA the batches come in pinned host memory, so that
    accelerate's copy to the GPU (non-blocking there, see training) overlaps the step; accelerate's loader already
    fetches one batch ahead, and as the step never waits for the GPU, padding the next batch overlaps the GPU's
    work even without workers; with --num-workers each keeps PREFETCH_BATCHES batches ready. No persistent
    workers: a new epoch's workers are seeded from the loader's generator, reseeded per epoch, as a resumed run's
    are."""
    options: dict = {"num_workers": num_workers, "pin_memory": device_type == "cuda"}
    if num_workers and device_type == "cuda":
        options["prefetch_factor"] = PREFETCH_BATCHES
    return options


def make_eval_loader(ds, tokenizer, max_batch: int, max_tokens: int, num_workers: int = 0,
                     pad_multiple: int | None = None) -> DataLoader:
    """Length-sorted batches of at most max_batch texts and max_tokens padded tokens (order does not matter
    for the metrics), widths rounded up to pad_multiple."""
    batches = forward.token_budget_batches(list(ds["length"]), max_tokens, max_batch)
    return DataLoader(ds, batch_sampler=batches, num_workers=num_workers,
                      collate_fn=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_multiple))


def chunk_budgets(cfg: TrainConfig, device: torch.device, model_config=None,
                  total_memory: int | None = None) -> tuple[int | None, int]:
    """(training chunk tokens or None for whole batches, evaluation batch tokens) for this device: the configured
    --chunk-tokens, else on CPU a small working set (half of it for the contrastive objective, see
    CONTRASTIVE_CPU_SHARE), on CUDA a share of the device's memory (gpu_train_tokens; total_memory: the device's,
    read from it when not given)."""
    train = cfg.chunk_tokens
    if train is None and device.type == "cpu":
        train = forward.CPU_CHUNK_TOKENS // (CONTRASTIVE_CPU_SHARE if cfg.objective == "contrastive" else 1)
    elif train is None and device.type == "cuda":
        if total_memory is None:
            total_memory = torch.cuda.get_device_properties(device).total_memory
        train = gpu_train_tokens(total_memory, model_config)
    return train, forward.eval_chunk_tokens(device.type, cfg.chunk_tokens)


# the contrastive objective's CPU training chunks are this fraction (1/2) of the budget: its adapters on every
# linear layer keep more activations per token than LoRA on query/value does, and its first step peaked at
# 2.29 GB with 2,048-token chunks, 1.59 GB with 1,024 (IMDb, 32 labels, 2026-12-01), with the same loss
CONTRASTIVE_CPU_SHARE = 2
GPU_TRAIN_MEMORY_SHARE = 0.25  # of the device's memory, for one micro-batch's activations
ACTIVATION_BYTES = 64  # kept for the backward per token, layer and hidden unit (bf16 autocast, a frozen base)
MIN_GPU_CHUNK_TOKENS = 8192


def gpu_train_tokens(total_memory: int, model_config=None) -> int:
    """Padded tokens per training micro-batch on a GPU of total_memory bytes: as many as GPU_TRAIN_MEMORY_SHARE of
    it holds at ACTIVATION_BYTES per token, layer and hidden unit of the model (BERT-base's sizes without a
    config), at least MIN_GPU_CHUNK_TOKENS. --batch-size stays the optimizer's batch: a larger batch runs in
    chunks of this many tokens, a smaller one in one forward."""
    hidden = getattr(model_config, "hidden_size", None) or 768
    layers = getattr(model_config, "num_hidden_layers", None) or 12
    return max(MIN_GPU_CHUNK_TOKENS, int(total_memory * GPU_TRAIN_MEMORY_SHARE) // (ACTIVATION_BYTES * hidden * layers))


# the parameter names that get no weight decay, as in transformers' Trainer
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def build_optimizer(model, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, no weight decay on biases and norms (Trainer's grouping); fused
    kernels on CUDA. LoRA+ (--loraplus-lr-ratio) builds peft's optimizer instead."""
    if cfg.loraplus_lr_ratio:
        return methods.lora.loraplus_optimizer(model, cfg, fused=device.type == "cuda")
    decayed = set(get_parameter_names(model, [torch.nn.LayerNorm], NO_DECAY_PATTERNS))
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if n in decayed], "weight_decay": cfg.weight_decay},
              {"params": [p for n, p in trainable if n not in decayed], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, fused=device.type == "cuda")


def split_batch(batch: dict, max_tokens: int | None, trim: bool = True) -> list[dict]:
    """Row chunks of a padded batch, each at most max_tokens padded tokens and, with trim, cut to its own longest
    text (reading the mask: a host sync on a GPU, and a width off the fixed ones; so trim is for the CPU)."""
    n, width = batch["input_ids"].shape
    rows = n if max_tokens is None else max(1, max_tokens // width)
    chunks = []
    for start in range(0, n, rows):
        chunk = {k: v[start:start + rows] for k, v in batch.items()}
        if trim and "attention_mask" in chunk and rows < n:
            used = int(chunk["attention_mask"].sum(dim=1).max())
            chunk = {k: (v[:, :used] if v.dim() == 2 and v.shape[1] == width else v) for k, v in chunk.items()}
        chunks.append(chunk)
    return chunks


def backward_in_chunks(model, batch: dict, accelerator: Accelerator, max_tokens: int | None,
                       class_weights: torch.Tensor | None = None, trim: bool = True) -> torch.Tensor:
    """Forward and backward one batch in chunks with gradient accumulation; returns the batch's mean loss as a
    detached tensor on the device (reading it is a host sync: left to the evaluation points).

    Each chunk's loss is divided by the whole batch's total weight (its rows without class weights; rows x labels
    for multi-hot labels), so the summed gradient equals the whole batch's; gradients are synchronised across
    processes on the last chunk only. trim: see split_batch.
    """
    chunks = split_batch(batch, max_tokens, trim)
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
                class_weights: torch.Tensor | None = None, embeddings: objectives.PooledEmbeddings | None = None,
                trim: bool = True):
    """One optimizer step per batch of the loader, yielding (the step's loss as a detached device tensor,
    examples seen, the learning rate it used, its gradient norm before clipping as a device tensor or None). With
    embeddings (a capture of the pooled embeddings), the step minimises the contrastive loss (a batch over
    chunk_tokens in gradient-cached chunks), else cross-entropy. No host sync: losses are read (and checked to be
    finite) at the evaluation points (on a GPU, trim=False keeps chunks at the batch's fixed width, without
    reading the mask)."""
    for batch in loader:
        model.train()  # again after each evaluation
        batch.pop("length", None)
        if embeddings is not None:
            loss = objectives.backward_contrastive(model, batch, accelerator, embeddings,
                                                   split_batch(batch, chunk_tokens, trim))
        else:
            loss = backward_in_chunks(model, batch, accelerator, chunk_tokens, class_weights, trim)
        # the norm before clipping, as a device tensor (None without clipping): tracked, read at evaluation points
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if cfg.max_grad_norm else None
        learning_rate = scheduler.get_last_lr()[0]  # the rate this step used (a float the scheduler holds)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        yield loss, batch["labels"].shape[0] * accelerator.num_processes, learning_rate, grad_norm


def finite_losses(pending: list[tuple[torch.Tensor, int, int]]) -> list[float]:
    """The losses of the steps since the last evaluation, read in one host sync; TrainingError naming the first
    step whose loss is NaN or infinite, so diverged weights are never saved as a run."""
    values = torch.stack([loss for loss, _, _ in pending]).tolist() if pending else []
    for value, (_, epoch, step) in zip(values, pending):
        if not math.isfinite(value):
            raise TrainingError(f"training diverged: the loss is {value} at step {step} of epoch {epoch}; "
                                "lower --lr or keep gradient clipping on (--max-grad-norm)")
    return values


def check_finite_loss(metrics: dict, what: str) -> None:
    """TrainingError when an evaluation's loss is NaN or infinite (the trained weights are broken)."""
    if not math.isfinite(metrics["loss"]):
        raise TrainingError(f"the loss of the {what} is {metrics['loss']}: the weights are not usable; "
                            "lower --lr or keep gradient clipping on (--max-grad-norm)")


def supported_max_length(requested: int, tokenizer, model_config) -> int:
    """requested, capped at what the tokenizer and the model's position embeddings take."""
    limits = (tokenizer.model_max_length, getattr(model_config, "max_position_embeddings", None))
    return min([requested] + [n for n in limits if isinstance(n, int) and n > 0])


def total_steps(cfg, steps_per_epoch: int, least: int = 1) -> int:
    """Optimizer steps of a run: max_steps, else the epochs asked for, raised to at least `least`."""
    return cfg.max_steps or max(least, math.ceil(cfg.epochs * steps_per_epoch))
