"""Base models and adapters: resolve a model name, load it (fp32 / 4-bit / 8-bit), attach the method's adapter,
count parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

from . import methods, quantization
from .errors import ModelError
# where a model name points (packaged, local, or a hub id checked for network) is hub.py's; re-exported here
from .hub import PACKAGED_MODELS, resolve_model_path  # noqa: F401
from .methods.targets import HEAD_MODULES, head_module_names
from .logs import quiet_transformers as _quiet_transformers


def load_model_config(name: str):
    """The transformers config of a model; ModelError with one line when it cannot be found."""
    path = resolve_model_path(name)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot load model {name!r}: {first}") from None


# transformers 5 matches skip patterns as regexes anchored at the start of the module path, or as suffixes.
UNQUANTIZED_MODULES = HEAD_MODULES + [f".*{name}" for name in HEAD_MODULES]


def quantization_config(quantize: str, device: torch.device) -> BitsAndBytesConfig | None:
    """bitsandbytes settings: NF4 with double quantization for nf4, LLM.int8 for int8; the head stays full precision."""
    if quantize == "nf4":
        compute = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    return None


def load_base_model(name: str, label_names: list[str], quantize: str = "none", device: torch.device | None = None,
                    problem: str = "single_label"):
    """The pretrained backbone with a fresh classification head, its weights stored as `quantize` says (a method
    name such as qlora is taken for the quantize it stands for); a multi_label problem sets the config's
    problem_type, so transformers' own loss is BCEWithLogitsLoss."""
    _quiet_transformers()
    device = device or torch.device("cpu")
    path = resolve_model_path(name)
    quant = quantization_config(methods.quantize_of(quantize), device)
    kwargs = dict(
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
        attn_implementation="sdpa",
    )
    if problem == "multi_label":
        kwargs["problem_type"] = "multi_label_classification"
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map={"": device.index or 0} if device.type == "cuda" else {"": "cpu"})
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except ValueError as exc:
        if "sdpa" not in str(exc).lower():
            raise ModelError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from None
        kwargs.pop("attn_implementation")
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelError(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id or 0
    # a model loaded here may train: keep bitsandbytes' 4-bit weights in the layout training and saving need
    # (prediction-only code opts in to the fast CPU layout with quantization.allow_cpu_inference_layout)
    quantization.keep_standard_layout(model)
    return model


def load_base_on_device(name: str, label_names: list[str], quantize: str, device: torch.device,
                        problem: str = "single_label"):
    """The base model on `device` for prediction: bitsandbytes places quantized weights at load, others are moved."""
    model = load_base_model(name, label_names, quantize, device, problem)
    return model.to(device) if methods.quantize_of(quantize) == "none" else model


def load_tokenizer(name: str):
    """The model's tokenizer (a fast one when available)."""
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load tokenizer of {name!r}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def set_attention_dropout(model, p: float | None) -> None:
    """Set the dropout on attention probabilities of every attention module (None: leave the model's own)."""
    if p is None:
        return
    for module in model.modules():
        dropout = getattr(module, "dropout", None)
        if "Attention" in type(module).__name__ and isinstance(dropout, torch.nn.Dropout):
            dropout.p = p


def prepare_for_training(model, cfg):
    """Attach the method's adapter, or choose which of the model's own weights train; set attention dropout."""
    set_attention_dropout(model, cfg.attention_dropout)
    method = methods.get(cfg.peft)
    if cfg.quantize != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if method.peft_config is None:
        heads = set(head_module_names(model))
        for name, param in model.named_parameters():
            param.requires_grad = method.trains(name, heads)
        return model
    try:
        return get_peft_model(model, method.peft_config(cfg, model))
    except ValueError as exc:
        raise ModelError(f"cannot attach {method.title}: {str(exc).splitlines()[0]}") from None


@dataclass
class ParameterCount:
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable: {100 * self.share:.4f}%"


def count_parameters(model) -> ParameterCount:
    """Trainable and total parameters (4-bit weights counted as their unpacked element count)."""
    if isinstance(model, PeftModel):
        trainable, total = model.get_nb_trainable_parameters()
        return ParameterCount(trainable, total)
    trainable = total = 0
    for param in model.parameters():
        n = param.numel() * (2 if param.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if param.requires_grad else 0
    return ParameterCount(trainable, total)


def weight_memory_bytes(model) -> int:
    """Bytes held by the model's parameters and buffers (4-bit and 8-bit weights at their stored size)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return int(base.get_memory_footprint())
