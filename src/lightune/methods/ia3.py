"""IA3 (peft IA3Config): learned vectors that rescale the attention keys and values and the feed-forward input."""

from __future__ import annotations

from ..errors import ModelError
from .registry import PeftMethod, register


def head_layer_names(model) -> list[str]:
    """The classification head as modules_to_save names of modules that hold weights: BERT's pooler becomes
    pooler.dense, because IA3's merge_and_unload cannot unwrap a container module (peft 0.21)."""
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


def ia3_config(cfg, model):
    """IA3 on peft's default modules for the architecture (or --target-modules); the head in modules_to_save."""
    from peft import IA3Config, TaskType
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING)

    model_type = model.config.model_type
    feedforward = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, [])
    targets = cfg.target_modules or TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type)
    if not targets:
        raise ModelError(f"no default IA3 target modules for model type {model_type!r}; pass --target-modules")
    if targets == ["all-linear"]:
        targets = "all-linear"
    else:  # feed-forward modules (input scaling) must be among the targets
        feedforward = [name for name in feedforward if name in targets]
    return IA3Config(task_type=TaskType.SEQ_CLS, target_modules=targets, feedforward_modules=feedforward,
                     modules_to_save=head_layer_names(model))


# 3e-3 as in the IA3 paper's T-Few recipe.
register(PeftMethod(name="ia3", title="IA3", help="learned rescaling of keys, values and feed-forward inputs",
                    learning_rate=3e-3, peft_config=ia3_config, kind="ia3"))
