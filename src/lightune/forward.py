"""The one forward path: text cleaning, tokenisation with truncation, length-sorted token-budget batching, the
device and precision, and the batched no-grad forward that evaluation, prediction and serving all run.

Imports nothing heavier than torch: `lightune predict` and `lightune serve` load this, not `datasets` or matplotlib.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys

import torch

from .config import INFERENCE_PRECISIONS
from .errors import ConfigError, ModelError
from .texts import check_texts, clean_text

HEAD_SHARE = 0.25  # head_tail: the share of the token budget kept from the start (Sun et al. 2019: 128 of 510)


def kept_positions(n_tokens: int, n_prefix: int, n_suffix: int, max_length: int, truncation: str) -> list[int]:
    """Positions of a tokenized text (special tokens at both ends included) to keep within max_length tokens.

    head keeps the first tokens, tail the last ones, head_tail a quarter of the budget from the start and the
    rest from the end; the special tokens ([CLS] ... [SEP]) are always kept.
    """
    budget = max(0, max_length - n_prefix - n_suffix)
    content = n_tokens - n_prefix - n_suffix
    if content <= budget:
        return list(range(n_tokens))
    head = {"head": budget, "tail": 0, "head_tail": int(budget * HEAD_SHARE)}[truncation]
    tail = budget - head
    return list(range(n_prefix + head)) + list(range(n_tokens - n_suffix - tail, n_tokens))


def encode_texts(tokenizer, texts: list[str], max_length: int, truncation: str = "head") -> dict[str, list]:
    """Token ids (and the tokenizer's other fields) of each text, at most max_length tokens, no padding.

    The one place texts are tokenized, for training, evaluation, predict and serve. head is the tokenizer's own
    truncation; tail and head_tail tokenize the whole text, then keep the positions kept_positions gives.
    """
    if truncation == "head":
        return dict(tokenizer(texts, truncation=True, max_length=max_length))
    enc = tokenizer(texts, truncation=False, return_special_tokens_mask=True, verbose=False)
    out: dict[str, list] = {key: [] for key in enc.keys() if key != "special_tokens_mask"}
    for i, special in enumerate(enc["special_tokens_mask"]):
        n_prefix = next((j for j, s in enumerate(special) if not s), len(special))
        n_suffix = next((j for j, s in enumerate(reversed(special)) if not s), 0) if n_prefix < len(special) else 0
        keep = kept_positions(len(special), n_prefix, n_suffix, max_length, truncation)
        for key in out:
            values = enc[key][i]
            out[key].append([values[j] for j in keep])
    return out


CPU_CHUNK_TOKENS = 2048  # on small CPUs a smaller working set is faster
GPU_EVAL_CHUNK_TOKENS = 65536
GPU_PAD_MULTIPLE = 64  # the widest step between a GPU's fixed padded widths
GPU_WIDTHS = 8  # fixed widths up to max_length on a GPU (fewer where max_length is short: steps of at least 8)


def pad_multiple(device_type: str, max_length: int) -> int | None:
    """What a batch's padded width is rounded up to: on GPUs a power of two near max_length / 8 (at least 8, at
    most 64) that divides max_length (16 for 128, 32 for 256, 64 for 512), so batches come in about 8 fixed widths,
    never wider than max_length, and each kernel (or captured graph) is planned once per width rather than once
    per batch; on CPUs nothing (every padded token costs time there). Steps of 64 at every max_length padded the
    packaged Rotten Tomatoes sentences (27 tokens on average) by 134-139%; these steps pad them by 28% at
    max_length 128 and IMDb reviews by 5% at 256 (benchmarks/results/gpu-padding-2026-12-01.json)."""
    if device_type == "cpu":
        return None
    step = min(GPU_PAD_MULTIPLE, max(8, max_length // GPU_WIDTHS))
    return math.gcd(max_length, 1 << (step.bit_length() - 1))


def eval_chunk_tokens(device_type: str, configured: int | None = None) -> int:
    """Padded tokens per evaluation/prediction batch: the configured budget, else the device's default."""
    return configured or (CPU_CHUNK_TOKENS if device_type == "cpu" else GPU_EVAL_CHUNK_TOKENS)


def token_budget_batches(lengths: list[int], max_tokens: int, max_batch: int) -> list[list[int]]:
    """Indices sorted by length and cut into batches whose padded size (longest x count) fits max_tokens.

    Short texts share big batches, long ones go in small batches: on CPUs a smaller working set is faster,
    so this beats a fixed batch size for long reviews and for short sentences alike.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) >= max_batch or lengths[i] * (len(current) + 1) > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def resolve_device(requested: str) -> torch.device:
    """cuda when asked for or available ('auto'); ModelError if cuda is asked for but absent. A CUDA device comes
    with cuDNN's attention kernel turned off (see use_fast_attention_kernels)."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda was requested but no CUDA GPU is available")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if requested == "auto" else requested)
    if device.type == "cuda":
        use_fast_attention_kernels()
    return device


def use_fast_attention_kernels() -> None:
    """Leave SDPA to the flash and memory-efficient kernels: cuDNN's plans a kernel for every new input shape,
    which took a bf16 training run on an H100 from 460 to 108 samples/s (batch 16; measured 2026-11-24)."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def resolve_precision(requested: str, device: torch.device) -> str:
    """Mixed precision for accelerate: bf16 on GPUs that support it, fp16 on older GPUs, none on CPU."""
    if requested == "auto":
        if device.type != "cuda":
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and device.type != "cuda":
        raise ModelError("fp16 training needs a CUDA GPU; use --precision bf16 or fp32 on CPU")
    return {"fp32": "no"}.get(requested, requested)


def inference_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The weights' dtype for prediction and serving: auto is bf16 on CUDA GPUs that support it (half the weight
    and activation traffic of fp32) and fp32 elsewhere (a CPU without bf16 matrix units runs bf16 slower); fp32
    and bf16 as asked. Logits always come back as float32 (forward_logits)."""
    if requested not in INFERENCE_PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(INFERENCE_PRECISIONS)}; got {requested!r}")
    if requested == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[requested]


def reset_peak_memory(device: torch.device) -> None:
    """Start the GPU's peak-memory counters afresh, so that a run's peak is its own and not an earlier run's in the
    same process (compare, tests); the CPU's figure, the process's peak resident set, cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory so far: GPU memory allocated on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "GPU allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "process RSS"


@torch.no_grad()
def forward_logits(model, batch: dict, device: torch.device, autocast=contextlib.nullcontext, **extra) -> torch.Tensor:
    """The float32 logits, on the CPU, of one padded batch: the one forward pass of evaluation, prediction and
    serving (autocast: accelerate's mixed-precision context during training; extra: e.g. peft's adapter_names)."""
    inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "length")}
    with autocast():
        logits = model(**inputs, **extra).logits
    return logits.float().cpu()


def texts_logits(model, tokenizer, texts: list[str], max_length: int, num_labels: int, batch_size: int,
                 device: torch.device, chunk_tokens: int | None = None, truncation: str = "head") -> torch.Tensor:
    """Logits of a classifier in input order; texts are cleaned, cut to max_length tokens as `truncation` says
    (encode_texts), sorted by length into batches of at most batch_size texts and chunk_tokens padded tokens
    (default: eval_chunk_tokens; widths rounded up as pad_multiple says)."""
    texts = [clean_text(t) for t in check_texts(texts)]
    encoded = encode_texts(tokenizer, texts, max_length, truncation)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    pad = pad_multiple(device.type, max_length)
    out = torch.empty(len(texts), num_labels)
    for idx in token_budget_batches(lengths, eval_chunk_tokens(device.type, chunk_tokens), batch_size):
        features = [{key: encoded[key][i] for key in encoded.keys()} for i in idx]
        out[idx] = forward_logits(model, tokenizer.pad(features, return_tensors="pt", pad_to_multiple_of=pad), device)
    return out
