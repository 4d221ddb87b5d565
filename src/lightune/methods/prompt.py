"""Prompt tuning (peft PromptTuningConfig): trained embeddings of virtual tokens put before every text; the
model's own weights stay as they are (nothing to merge).

The virtual tokens lengthen every sequence: peft extends the attention mask over them, so with mean pooling
the classifier reads the mean over the virtual and the real tokens, and with [CLS] pooling it reads the first
virtual token (BERT's pooler takes position 0). Either way training and prediction read the same thing.

Prefix tuning (peft PrefixTuningConfig) is not offered: peft injects its prefixes as past_key_values, which BERT-
style encoders do not take in transformers 5 (peft refuses: "Model does not support past key values"), and
encoders do not use that cache even where they take it (peft's documentation, PR #2989).
"""

from __future__ import annotations

from ..errors import ConfigError
from .registry import PeftMethod, register

MAX_VIRTUAL_TOKENS = 512


def check(cfg) -> None:
    n = cfg.virtual_tokens
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_VIRTUAL_TOKENS:
        raise ConfigError(f"virtual_tokens must be an integer from 1 to {MAX_VIRTUAL_TOKENS}; got {n!r}")


def prompt_config(cfg, model):
    """--virtual-tokens prompt embeddings started from randomly drawn word embeddings (peft's SAMPLE_VOCAB; a
    random start far from any word trains poorly); the head in modules_to_save."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType

    from .targets import head_module_names

    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and cfg.max_length + cfg.virtual_tokens > positions:
        raise ConfigError(f"prompt tuning puts {cfg.virtual_tokens} virtual tokens before each text of up to "
                          f"max_length {cfg.max_length} tokens, more than the {positions} positions of "
                          f"{model.config.model_type}; lower max_length or virtual_tokens")
    return PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=cfg.virtual_tokens,
                              prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,
                              modules_to_save=head_module_names(model))


def describe(config: dict) -> list[str]:
    return [f"{config.get('virtual_tokens')} virtual tokens"]


# Prompt embeddings take a large rate (the prompt tuning paper used 0.3 with Adafactor); 1e-2 with AdamW, not tuned.
register(PeftMethod(name="prompt", title="prompt tuning", help="trained virtual-token embeddings (--virtual-tokens) "
                    "before each text", learning_rate=1e-2, peft_config=prompt_config, merges=False,
                    kind="prompt_tuning", options=("virtual_tokens",), check=check, describe=describe))
