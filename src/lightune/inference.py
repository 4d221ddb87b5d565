"""Inference: load a finished run (adapter merged into the base for speed) and classify texts through the one
forward path (forward.texts_logits)."""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
from peft import PeftModel
from safetensors import SafetensorError
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from . import compiling, heads, methods, models, quantization
from .calibration import apply_temperature
from .config import TRUNCATIONS
from .errors import ConfigError, ModelError
from .forward import inference_dtype, resolve_device, texts_logits
from .logs import quiet_model_loading
from .texts import check_texts
from .runs import SavedRun, read_run


@contextlib.contextmanager
def damaged_files_as_model_error(what: str):
    """ModelError naming `what` for the errors libraries raise on missing, truncated or malformed files."""
    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        first = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load {what}: {first}") from None


NONFINITE_WEIGHTS = "{file} holds NaN or infinite weights: the run is broken; train it again"


def check_finite_weights(run: SavedRun) -> None:
    """ModelError when the run's saved weights hold NaN or infinity: the one check of prediction, evaluation and
    serving (a broken run would classify every text with probabilities NaN)."""
    with damaged_files_as_model_error(f"{run.saved_kind} from {run.saved}"):  # the words load_model uses
        stat = run.weights_file.stat()
        version = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        finite = _finite_tensors(str(run.weights_file), version)
    if not finite:
        raise ModelError(NONFINITE_WEIGHTS.format(file=run.weights_file))


@lru_cache(maxsize=8)
def _finite_tensors(path: str, version: tuple) -> bool:
    """Whether every floating-point tensor of a safetensors file is finite (read one tensor at a time; cached per
    version of the file: evaluation checks before loading its data, then the Classifier again)."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as weights:
        for name in weights.keys():
            tensor = weights.get_tensor(name)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                return False
    return True


class Classifier:
    """A fine-tuned classifier ready for batched prediction.

    `run` is a run directory or a run already read (runs.read_run); its fields (labels, max_length, truncation,
    pooling, thresholds, temperature) are the run's, resolved once there. `truncation` overrides the run's.
    `logits` are the model's own; `predict`'s probabilities are of the logits divided by the temperature.
    `precision`: the weights' dtype (forward.inference_dtype: auto is bf16 on CUDA, fp32 on CPU); `compile`: the
    forward through torch.compile (compiling.compile_model: CUDA graphs at the fixed padded widths on CUDA), its
    compile costs logged through `log`.
    """

    def __init__(self, run: str | Path | SavedRun, device: str = "auto", merge: bool = True, batch_size: int = 64,
                 chunk_tokens: int | None = None, truncation: str | None = None, precision: str = "auto",
                 compile: bool = False, log: Callable[[str], None] = lambda line: None):
        if truncation is not None and truncation not in TRUNCATIONS:
            raise ConfigError(f"truncation must be one of {', '.join(TRUNCATIONS)}; got {truncation!r}")
        self.run = run if isinstance(run, SavedRun) else read_run(run)
        self.run_dir = self.run.run_dir
        self.metrics = self.run.metrics
        self.config = self.run.config
        self.label_names: list[str] = self.run.label_names
        self.max_length: int = self.run.max_length
        self.truncation: str = truncation or self.run.truncation
        self.problem: str = self.run.problem
        self.thresholds: list[float] | None = self.run.thresholds  # multi-label only
        self.temperature: float = self.run.temperature  # fitted on validation after training (1.0: none)
        self.batch_size = batch_size
        self.device = resolve_device(device)
        self.dtype = inference_dtype(precision, self.device)
        self.chunk_tokens = chunk_tokens  # None: the device default (forward.eval_chunk_tokens)
        check_finite_weights(self.run)
        with quiet_model_loading():  # no loading bar or deprecation warnings in a user's program
            with damaged_files_as_model_error(f"tokenizer from {self.run.saved}"):
                self.tokenizer = AutoTokenizer.from_pretrained(self.run.saved)
            self.model = in_dtype(load_model(self.run, self.device, merge), self.dtype, self.run.quantize).eval()
        self.compiled = compiling.compile_model(self.model, self.device, log) if compile else None

    @property
    def forward_model(self):
        """What the forward passes run: the compiled model (compile=True), or the model itself, also when
        `model` was replaced after loading."""
        return self.compiled if self.compiled is not None and self.compiled.eager is self.model else self.model

    def logits(self, texts: list[str]) -> torch.Tensor:
        """Logits in input order; texts are sorted by length into token-budget batches (least padding)."""
        return texts_logits(self.forward_model, self.tokenizer, texts, self.max_length, len(self.label_names),
                            self.batch_size, self.device, self.chunk_tokens, self.truncation)

    def predict(self, texts: list[str]) -> list[dict]:
        """[{text, label, probabilities: {label name: probability}}] for each text, in input order ({text, labels,
        probabilities} for a multi-label run; see to_predictions)."""
        texts = check_texts(texts)
        return to_predictions(texts, self.logits(texts) if texts else None, self.label_names, self.thresholds,
                              self.temperature)


def load_model(run: SavedRun, device: torch.device, merge: bool = True, dequantize: bool = False):
    """The run's model on `device` for prediction: its whole saved model, or the base with its adapter (merged into
    unquantized bases when the method merges and `merge` is on). `dequantize` (export): a 4-bit or 8-bit base is
    turned back into plain weights of its dtype first (transformers' dequantize), so the adapter merges into it."""
    if not run.is_adapter:
        with damaged_files_as_model_error(f"model from {run.saved}"):
            model = AutoModelForSequenceClassification.from_pretrained(run.saved)
        heads.apply_pooling(model, run.pooling)
        return model.to(device)
    base = models.load_base_on_device(run.model, run.label_names, run.quantize, device, run.problem)
    dequantize = dequantize and run.quantize != "none"
    if dequantize:
        base = base.dequantize()
    heads.apply_pooling(base, run.pooling)
    with damaged_files_as_model_error(f"adapter from {run.saved}"):
        model = PeftModel.from_pretrained(base, run.saved)
    # Quantized bases cannot take merged weights without dequantizing: keep adapters separate there.
    if merge and methods.get(run.peft).merges and (run.quantize == "none" or dequantize):
        return model.merge_and_unload()
    quantization.allow_cpu_inference_layout(model)  # prediction only: bitsandbytes' fast CPU layout may be used
    return model


def in_dtype(model, dtype: torch.dtype, quantize: str):
    """The model with its weights in `dtype` (a 4-bit or 8-bit base stays as bitsandbytes stores it: its compute
    dtype is set at load)."""
    if dtype == torch.float32 or quantize != "none":
        return model
    return model.to(dtype)


def to_predictions(texts: list[str], logits: torch.Tensor | None, label_names: list[str],
                   thresholds: list[float] | None = None, temperature: float = 1.0) -> list[dict]:
    """[{text, label, probabilities: {label name: probability}}] from logits in input order: the softmax of the
    logits divided by the run's temperature (calibration.apply_temperature; the label is the same at any
    temperature). Prediction (Classifier.predict) and serving both come here.

    With thresholds (a multi-label run): [{text, labels: [each label whose sigmoid probability reaches its
    threshold], probabilities: {label name: probability}}]; the probabilities do not sum to one.
    """
    if thresholds is not None:
        probs = torch.sigmoid(apply_temperature(logits, temperature)).tolist() if texts else []
        return [{"text": text, "labels": [name for name, q, t in zip(label_names, p, thresholds) if q >= t],
                 "probabilities": dict(zip(label_names, p))} for text, p in zip(texts, probs)]
    probs = torch.softmax(apply_temperature(logits, temperature), dim=-1).tolist() if texts else []
    return [
        {"text": text, "label": label_names[max(range(len(p)), key=p.__getitem__)],
         "probabilities": dict(zip(label_names, p))}
        for text, p in zip(texts, probs)
    ]


@lru_cache(maxsize=4)
def load_classifier(run_dir: str, device: str = "auto") -> Classifier:
    """A cached Classifier per run directory, so repeated predict() calls load the model once."""
    return Classifier(run_dir, device=device)


def predict(texts: list[str], run_dir: str | Path, device: str = "auto") -> list[dict]:
    """Classify texts with a finished run: [{text, label, probabilities}] in input order."""
    texts = check_texts(texts)
    return load_classifier(str(Path(run_dir).resolve()), device).predict(texts)
