"""What an adapter method attaches to: the target layers and the head modules it trains in full and saves."""

from __future__ import annotations

from ..errors import ModelError

# Query/value projections for architectures peft's own table does not list.
EXTRA_TARGET_MODULES = {
    "distilbert": ["q_lin", "v_lin"],
    "deberta": ["in_proj"],
    "mpnet": ["q", "v"],
    "modernbert": ["Wqkv"],
    "albert": ["query", "value"],
    "electra": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "camembert": ["query", "value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
}
HEAD_MODULES = ["classifier", "score", "pre_classifier", "pooler"]


def default_target_modules(model_type: str) -> list[str]:
    """The attention query/value projections of an architecture, for LoRA."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = EXTRA_TARGET_MODULES.get(model_type) or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise ModelError(f"no default LoRA target modules for model type {model_type!r}; pass --target-modules")
    return list(targets)


def head_module_names(model) -> list[str]:
    """Names of the classification head modules (kept trainable and saved with the adapter).

    The head is the classifier plus the layers that feed it only: BERT's pooler, DistilBERT's pre_classifier.
    """
    names = [n for n, _ in model.named_children() if n in HEAD_MODULES] or ["classifier"]
    pooler = getattr(model.base_model, "pooler", None)
    if pooler is not None and any(True for _ in pooler.parameters()):  # not a parameter-free mean pooler
        names.append("pooler")
    return names


def target_modules(cfg, model) -> list[str] | str:
    """--target-modules, else the architecture's attention query/value projections; peft's "all-linear" as is."""
    targets = cfg.target_modules or default_target_modules(model.config.model_type)
    return "all-linear" if targets == ["all-linear"] else targets


def head_layer_names(model) -> list[str]:
    """The classification head as modules_to_save names of modules that hold weights: BERT's pooler becomes
    pooler.dense, because the merge_and_unload of IA3, LoHa, LoKr and VeRA cannot unwrap a container module
    (peft 0.21)."""
    modules = dict(model.named_modules())
    out = []
    for name in head_module_names(model):
        module = next(m for path, m in modules.items() if path == name or path.endswith("." + name))
        if any(True for _ in module.parameters(recurse=False)):
            out.append(name)
        else:
            out += [f"{name}.{child}" for child, sub in module.named_children() if any(True for _ in sub.parameters())]
    return out
