"""IA3 (peft IA3Config): learned vectors that rescale the attention keys and values and the feed-forward input."""

from __future__ import annotations

from ..errors import ModelError
from .registry import PeftMethod, register
from .targets import head_layer_names


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
