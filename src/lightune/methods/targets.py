"""What an adapter method attaches to: the target layers and the head modules it trains in full and saves."""

from __future__ import annotations


def target_modules(cfg, model) -> list[str] | str:
    """--target-modules, else the architecture's attention query/value projections; peft's "all-linear" as is."""
    from ..models import default_target_modules

    targets = cfg.target_modules or default_target_modules(model.config.model_type)
    return "all-linear" if targets == ["all-linear"] else targets


def head_layer_names(model) -> list[str]:
    """The classification head as modules_to_save names of modules that hold weights: BERT's pooler becomes
    pooler.dense, because the merge_and_unload of IA3, LoHa, LoKr and VeRA cannot unwrap a container module
    (peft 0.21)."""
    from ..models import head_module_names

    modules = dict(model.named_modules())
    out = []
    for name in head_module_names(model):
        module = next(m for path, m in modules.items() if path == name or path.endswith("." + name))
        if any(True for _ in module.parameters(recurse=False)):
            out.append(name)
        else:
            out += [f"{name}.{child}" for child, sub in module.named_children() if any(True for _ in sub.parameters())]
    return out
