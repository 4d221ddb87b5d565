"""DoRA (peft LoraConfig with use_dora): LoRA on the direction of each weight plus a trained magnitude vector."""

from __future__ import annotations

from ..errors import ConfigError
from .lora import LORA_FAMILY, lora_config
from .registry import PeftMethod, register


def dora_config(cfg, model):
    """LoRA's config with use_dora; refused on an 8-bit base on CPU, where peft's DoRA set-up drops bitsandbytes'
    8-bit scales and the first forward pass fails (peft 0.21, bitsandbytes 0.50)."""
    if cfg.quantize == "int8" and next(model.parameters()).device.type == "cpu":
        raise ConfigError("DoRA on an int8 base does not run on CPU (peft loses the 8-bit scales there); use "
                          "quantize 'nf4' or 'none', or a GPU")
    return lora_config(cfg, model, use_dora=True)


register(PeftMethod(name="dora", title="DoRA", help="LoRA plus a trained magnitude per output feature",
                    peft_config=dora_config, **LORA_FAMILY))
