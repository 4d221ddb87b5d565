"""lightune: LoRA / QLoRA fine-tuning of pretrained transformer text classifiers.

Heavy parts (torch, transformers) load on first use, so `lightune --help` and config checks stay fast.
"""

from .config import TrainConfig, from_dict, load_config
from .errors import ConfigError, DataError, LightuneError, ModelError
from .quantization import hide_hub_kernel_notice

hide_hub_kernel_notice()  # before anything imports bitsandbytes (see quantization.py)

__version__ = "0.1.0"
_LAZY = {"Classifier": "inference", "predict": "inference", "RunResult": "training", "run_training": "training"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lightune' has no attribute {name!r}")


def train(config: TrainConfig | None = None, progress: bool = True, **overrides):
    """Train with a TrainConfig and/or keyword overrides of its fields (or `method`); returns the finished RunResult."""
    from .training import run_training

    return run_training(from_dict(overrides, base=config), progress=progress)


__all__ = ["Classifier", "ConfigError", "DataError", "LightuneError", "ModelError", "RunResult", "TrainConfig",
           "load_config", "predict", "run_training", "train"]
