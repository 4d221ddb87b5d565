"""Inference: load a finished run (adapter merged into the base for speed) and classify texts in length-sorted batches."""

from __future__ import annotations

import contextlib
import json
from functools import lru_cache
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import SafetensorError
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from . import heads, methods, models, quantization
from .config import PROBLEMS, TRUNCATIONS, saved_config
from .forward import clean_text, encode_texts, eval_chunk_tokens, pad_multiple, resolve_device, token_budget_batches
from .errors import ConfigError, DataError, ModelError
from .reporting import is_complete_run


def check_texts(texts) -> list[str]:
    """The texts as a list; DataError for a bare string, a non-string or a blank item."""
    if isinstance(texts, str):
        raise DataError("predict() takes a list of texts, not a single string")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"text {i + 1} is not a string ({type(text).__name__})")
        if not text.strip():
            raise DataError(f"text {i + 1} is empty")
    return texts


def read_run(run_dir: str | Path) -> tuple[Path, dict]:
    """The run directory and its metrics.json; ModelError if it is missing, unfinished or damaged."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ModelError(f"run directory not found: {run_dir}")
    if not is_complete_run(run_dir):
        raise ModelError(f"{run_dir} is not a finished lightune run (no metrics.json/config.json)")
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is damaged: not valid JSON ({str(exc).splitlines()[0]})") from None
    problem = _metrics_problem(metrics)
    if problem:
        raise ModelError(f"{path} is damaged: {problem}")
    saved = run_dir / metrics["saved"]
    if not saved.is_dir():
        raise ModelError(f"{run_dir} has no saved {metrics['saved']}/ directory")
    return run_dir, metrics


def _metrics_problem(metrics) -> str | None:
    """What is wrong with the parts of metrics.json that loading a run needs, or None."""
    if not isinstance(metrics, dict):
        return "not a JSON object"
    config, data = metrics.get("config"), metrics.get("data")
    if metrics.get("saved") not in ("adapter", "model"):
        return f"'saved' is {metrics.get('saved')!r}, not 'adapter' or 'model'"
    if not isinstance(config, dict) or not all(isinstance(config.get(k), str) and config[k]
                                               for k in ("model", "method")):
        return "'config' lacks the model or method"
    names = data.get("label_names") if isinstance(data, dict) else None
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names) \
            or len(set(names)) != len(names):
        return "'data.label_names' is not a list of distinct label names"
    if config.get("truncation", "head") not in TRUNCATIONS:
        return f"'config.truncation' is {config.get('truncation')!r}, not one of {', '.join(TRUNCATIONS)}"
    if config.get("problem", "single_label") not in PROBLEMS:
        return f"'config.problem' is {config.get('problem')!r}, not one of {', '.join(PROBLEMS)}"
    thresholds = metrics.get("thresholds")
    if config.get("problem") == "multi_label" and not (isinstance(thresholds, dict) and all(
            isinstance(thresholds.get(n), (int, float)) and not isinstance(thresholds[n], bool)
            and 0 <= thresholds[n] <= 1 for n in names)):
        return "'thresholds' does not give a threshold between 0 and 1 for every label"
    length = metrics.get("max_length")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        return f"'max_length' is {length!r}, not a positive integer"
    return None


@contextlib.contextmanager
def _damaged_files_as_model_error(what: str):
    """ModelError naming `what` for the errors libraries raise on missing, truncated or malformed files."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        first = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load {what}: {first}") from None


class Classifier:
    """A fine-tuned classifier ready for batched prediction."""

    def __init__(self, run_dir: str | Path, device: str = "auto", merge: bool = True, batch_size: int = 64,
                 chunk_tokens: int | None = None, truncation: str | None = None):
        if truncation is not None and truncation not in TRUNCATIONS:
            raise ConfigError(f"truncation must be one of {', '.join(TRUNCATIONS)}; got {truncation!r}")
        run_dir, metrics = read_run(run_dir)
        self.run_dir = run_dir
        self.metrics = metrics
        self.config = saved_config(metrics["config"])
        self.label_names: list[str] = metrics["data"]["label_names"]
        self.max_length: int = metrics["max_length"]
        self.truncation: str = truncation or run_truncation(metrics)
        self.problem: str = self.config["problem"]
        self.thresholds: list[float] | None = run_thresholds(metrics)  # multi-label only
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.chunk_tokens = chunk_tokens  # None: the device default (see batched_logits)
        saved = run_dir / metrics["saved"]
        with _damaged_files_as_model_error(f"tokenizer from {saved}"):
            self.tokenizer = AutoTokenizer.from_pretrained(saved)
        self.model = self._load_model(saved, merge).eval()

    def _load_model(self, saved: Path, merge: bool):
        pooling = self.metrics.get("pooling", "cls")  # runs from before pooling was recorded read [CLS]
        if metrics_saved_full(saved):
            with _damaged_files_as_model_error(f"model from {saved}"):
                model = AutoModelForSequenceClassification.from_pretrained(saved)
            heads.apply_pooling(model, pooling)
            return model.to(self.device)
        if not (saved / "adapter_config.json").is_file():
            raise ModelError(f"adapter missing: {saved}/adapter_config.json not found")
        quantize = self.config["quantize"]
        base = models.load_base_on_device(self.config["model"], self.label_names, quantize, self.device, self.problem)
        heads.apply_pooling(base, pooling)
        with _damaged_files_as_model_error(f"adapter from {saved}"):
            model = PeftModel.from_pretrained(base, saved)
        # Quantized bases cannot take merged weights without dequantizing: keep adapters separate there.
        mergeable = methods.get(self.config["peft"]).merges and quantize == "none"
        if merge and mergeable:
            return model.merge_and_unload()
        quantization.allow_cpu_inference_layout(model)  # prediction only: bitsandbytes' fast CPU layout may be used
        return model

    def logits(self, texts: list[str]) -> torch.Tensor:
        """Logits in input order; texts are sorted by length into token-budget batches (least padding)."""
        return batched_logits(self.model, self.tokenizer, texts, self.max_length, len(self.label_names),
                              self.batch_size, self.device, self.chunk_tokens, self.truncation)

    def predict(self, texts: list[str]) -> list[dict]:
        """[{text, label, probabilities: {label name: probability}}] for each text, in input order ({text, labels,
        probabilities} for a multi-label run; see to_predictions)."""
        texts = check_texts(texts)
        return to_predictions(texts, self.logits(texts) if texts else None, self.label_names, self.thresholds)


@torch.no_grad()
def batched_logits(model, tokenizer, texts: list[str], max_length: int, num_labels: int, batch_size: int,
                   device: torch.device, chunk_tokens: int | None = None, truncation: str = "head") -> torch.Tensor:
    """Logits of a classifier in input order; texts are sorted by length into batches of at most batch_size
    texts and chunk_tokens padded tokens (default: 2,048 on CPU, 65,536 on GPU; widths rounded up as
    forward.pad_multiple says); longer texts are cut to max_length tokens as `truncation` says (forward.encode_texts)."""
    texts = [clean_text(t) for t in check_texts(texts)]
    chunk_tokens = eval_chunk_tokens(device.type, chunk_tokens)
    encoded = encode_texts(tokenizer, texts, max_length, truncation)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    pad = pad_multiple(device.type, max_length)
    out = torch.empty(len(texts), num_labels)
    for idx in token_budget_batches(lengths, chunk_tokens, batch_size):
        features = [{key: encoded[key][i] for key in encoded.keys()} for i in idx]
        batch = tokenizer.pad(features, return_tensors="pt", pad_to_multiple_of=pad).to(device)
        out[idx] = model(**batch).logits.float().cpu()
    return out


def run_truncation(metrics: dict) -> str:
    """The truncation a run was trained with (runs from before it was recorded cut the tail off: head)."""
    return saved_config(metrics["config"])["truncation"]


def run_thresholds(metrics: dict) -> list[float] | None:
    """A multi-label run's threshold per label, in label order; None for single-label runs (older runs are)."""
    if saved_config(metrics["config"])["problem"] != "multi_label":
        return None
    return [float(metrics["thresholds"][name]) for name in metrics["data"]["label_names"]]


def to_predictions(texts: list[str], logits: torch.Tensor | None, label_names: list[str],
                   thresholds: list[float] | None = None) -> list[dict]:
    """[{text, label, probabilities: {label name: probability}}] from logits in input order (softmax).

    With thresholds (a multi-label run): [{text, labels: [each label whose sigmoid probability reaches its
    threshold], probabilities: {label name: probability}}]; the probabilities do not sum to one.
    """
    if thresholds is not None:
        probs = torch.sigmoid(logits.float()).tolist() if texts else []
        return [{"text": text, "labels": [name for name, q, t in zip(label_names, p, thresholds) if q >= t],
                 "probabilities": dict(zip(label_names, p))} for text, p in zip(texts, probs)]
    probs = torch.softmax(logits, dim=-1).tolist() if texts else []
    return [
        {"text": text, "label": label_names[max(range(len(p)), key=p.__getitem__)],
         "probabilities": dict(zip(label_names, p))}
        for text, p in zip(texts, probs)
    ]


def metrics_saved_full(saved: Path) -> bool:
    """True when the run saved a whole model (full or head-only fine-tuning) rather than an adapter."""
    return (saved / "config.json").is_file() and not (saved / "adapter_config.json").is_file()


@lru_cache(maxsize=4)
def load_classifier(run_dir: str, device: str = "auto") -> Classifier:
    """A cached Classifier per run directory, so repeated predict() calls load the model once."""
    return Classifier(run_dir, device=device)


def predict(texts: list[str], run_dir: str | Path, device: str = "auto") -> list[dict]:
    """Classify texts with a finished run: [{text, label, probabilities}] in input order."""
    texts = check_texts(texts)
    return load_classifier(str(Path(run_dir).resolve()), device).predict(texts)
