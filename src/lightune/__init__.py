"""lightune: parameter-efficient fine-tuning (LoRA, QLoRA, DoRA, IA3, ...) of pretrained transformer text
classifiers. As a library: train(), predict(), Classifier and evaluate() (README, "As a library").

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


def evaluate(run_dir, data: str | None = None, progress: bool = True, **options):
    """Score a finished run on a data source (default: its own test split), as `lightune evaluate` does: the
    options are EvaluationOptions' fields (split, eval_size, name, output_dir, ...). Writes evaluations/<name>/
    beside the run; returns the EvaluationResult (out_dir, and result with its "metrics")."""
    from .evaluate_run import EvaluationOptions, run_evaluation

    return run_evaluation(EvaluationOptions(run_dir=str(run_dir), data=data, **options), progress=progress)


__all__ = ["Classifier", "ConfigError", "DataError", "LightuneError", "ModelError", "RunResult", "TrainConfig",
           "evaluate", "load_config", "predict", "run_training", "train"]
