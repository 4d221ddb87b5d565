"""The registry of PEFT methods: one entry per method, saying what it trains and what the rest of lightune may do
with its runs. Modelled on peft's `register_peft_method`; no heavy imports here (config validation reads it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ConfigError

# How the frozen base is stored: as loaded (fp32/bf16), 4-bit NormalFloat with double quantization, LLM.int8.
QUANTIZE = ("none", "nf4", "int8")
# Method names from before --quantize existed: method -> (peft, quantize). Every other method name is
# PEFT (quantize none) or PEFT+QUANTIZE ("dora+nf4").
ALIASES = {"qlora": ("lora", "nf4"), "int8": ("lora", "int8")}


@dataclass(frozen=True)
class PeftMethod:
    """One PEFT method: how to build it, and what its runs can do."""

    name: str  # the --peft value
    title: str  # how messages name it: "LoRA"
    help: str  # one line for `lightune train --help`
    learning_rate: float  # the default when the run gives none
    # (TrainConfig, the loaded base model) -> the peft config to attach; None: the method trains the model's own
    # weights (no adapter), choosing which through `trains`.
    peft_config: Callable[[Any, Any], Any] | None = None
    # (parameter name, head module names) -> whether it trains; only for methods without a peft config.
    trains: Callable[[str, set[str]], bool] | None = None
    quantize: tuple[str, ...] = QUANTIZE  # the base storages it can sit on
    quantize_note: str = ""  # why it cannot sit on the others, for the error message
    merges: bool = True  # prediction merges the adapter into the (unquantized) base weights
    # Several runs can be served as named adapters on one shared base; only adapters of one peft kind (`kind`)
    # can share a base model (peft cannot mix LoRA and IA3 adapters in one model).
    shares_base: bool = True
    kind: str | None = None
    # (saved run config) -> what else must match for adapters of this kind to share a base (VeRA: its rank)
    sharing: Callable[[dict], str] | None = None
    options: tuple[str, ...] = ()  # method-specific TrainConfig fields it reads (rslora, init)
    check: Callable[[Any], None] | None = None  # extra validation of a TrainConfig: ConfigError in one line
    # (saved run config) -> why this run cannot share a served base, or None
    serving_problem: Callable[[dict], str | None] | None = None
    describe: Callable[[dict], list[str]] | None = None  # (saved run config) -> settings worth reporting

    @property
    def saves(self) -> str:
        """The run's saved folder: `adapter` (a peft adapter and the tokenizer) or `model` (the whole model)."""
        return "model" if self.peft_config is None else "adapter"


REGISTRY: dict[str, PeftMethod] = {}


def register(method: PeftMethod) -> PeftMethod:
    """Add a method to the registry; a name already registered is an error (as in peft)."""
    if method.name in REGISTRY:
        raise ValueError(f"a PEFT method named {method.name!r} is already registered")
    if (method.peft_config is None) == (method.trains is None):
        raise ValueError(f"method {method.name!r} needs exactly one of peft_config and trains")
    if method.name in ALIASES or "+" in method.name:
        raise ValueError(f"method name {method.name!r} would clash with a method alias")
    REGISTRY[method.name] = method
    return method


def names() -> list[str]:
    """The --peft choices, in registration order."""
    return list(REGISTRY)


def get(name: str) -> PeftMethod:
    """The registered method; ConfigError naming the choices if there is none."""
    if name not in REGISTRY:
        raise ConfigError(f"peft must be one of {', '.join(REGISTRY)}; got {name!r}")
    return REGISTRY[name]


def method_label(peft: str, quantize: str) -> str:
    """The one-word name of a (peft, quantize) pair: lora, qlora, int8, dora, dora+nf4, full, ..."""
    for alias, pair in ALIASES.items():
        if pair == (peft, quantize):
            return alias
    return peft if quantize == "none" else f"{peft}+{quantize}"


def method_names() -> list[str]:
    """Every valid --method value: each method on each base storage it can sit on."""
    return [method_label(m.name, q) for m in REGISTRY.values() for q in m.quantize]


def split_method(name: str) -> tuple[str, str]:
    """(peft, quantize) of a method name; ConfigError listing the valid names."""
    if not isinstance(name, str) or name not in method_names():
        raise ConfigError(f"method must be one of {', '.join(method_names())}; got {name!r}")
    if name in ALIASES:
        return ALIASES[name]
    peft, _, quantize = name.partition("+")
    return peft, quantize or "none"


def quantize_of(name: str) -> str:
    """The base storage named by a quantize value or by a method name (qlora: nf4; lora: none)."""
    return name if name in QUANTIZE else split_method(name)[1]


def option_names() -> set[str]:
    """The method-specific TrainConfig fields some method reads (LoRA's rslora and init)."""
    return {option for m in REGISTRY.values() for option in m.options}


def sharing_kind(config: dict) -> str | None:
    """The kind a run's adapter shares a served base with: the method's peft kind, plus what else must match."""
    method = get(config["peft"])
    return f"{method.kind} {method.sharing(config)}" if method.sharing else method.kind


def takers(option: str) -> list[str]:
    """The methods that read a method-specific option."""
    return [m.name for m in REGISTRY.values() if option in m.options]
