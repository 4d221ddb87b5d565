"""The PEFT methods lightune trains, one registry entry each; every other module asks the registry.

Adding a method: a module here that builds its peft config from the run's TrainConfig and calls
`register(PeftMethod(...))`, one import line below, and its tests (train, save, reload in stock peft with
identical logits, predict). Registration order is the order of the --peft and --method choices.
"""

from .registry import (ALIASES, QUANTIZE, REGISTRY, PeftMethod, get, method_label, method_names, names,
                       option_names, quantize_of, register, sharing_kind, split_method, takers)

from . import lora, baselines, dora, ia3, lycoris, vera, prompt  # noqa: E402,F401,I001  (each registers its methods, in this order)

__all__ = ["ALIASES", "QUANTIZE", "REGISTRY", "PeftMethod", "get", "method_label", "method_names", "names",
           "option_names", "quantize_of", "register", "sharing_kind", "split_method",
           "takers"]
