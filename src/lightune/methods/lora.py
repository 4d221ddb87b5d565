"""LoRA (peft LoraConfig): low-rank updates of chosen linear layers, the classification head trained in full.

Its one-field variants are options, as in peft: rsLoRA scaling (`rslora`) and the initialisation (`init`).
DoRA (dora.py) is LoRA with `use_dora`, built here too.
"""

from __future__ import annotations

from ..errors import ConfigError
from .registry import PeftMethod, register

# --init -> peft's init_lora_weights
INITS = {"default": True, "pissa": "pissa", "olora": "olora", "gaussian": "gaussian"}
# Initialisations that rewrite the base weights under the adapter (W - BA). peft repeats them when it loads the
# adapter (they are deterministic), so a stock reload is exact; but a second adapter on that base would see the
# rewritten weights, so such runs are not served beside others.
BASE_REWRITING_INITS = ("pissa", "olora")
OPTIONS = ("rslora", "init", "loraplus_lr_ratio")


def lora_config(cfg, model, **extra):
    """The LoraConfig of a run: rank, alpha, dropout, targets, bias, rsLoRA and init; the head in modules_to_save."""
    from peft import LoraConfig, TaskType

    from .targets import head_module_names, target_modules

    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_modules(cfg, model),
        bias=cfg.bias,
        modules_to_save=head_module_names(model),
        use_rslora=cfg.rslora,
        init_lora_weights=INITS[cfg.init],
        **extra,
    )


def check(cfg) -> None:
    ratio = cfg.loraplus_lr_ratio
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or not 1 <= ratio <= 1000):
        raise ConfigError(f"loraplus_lr_ratio must be a number from 1 to 1000 (LoRA+ trains B faster than A); "
                          f"got {ratio!r}")
    if cfg.init == "pissa" and cfg.quantize != "none":
        raise ConfigError(f"init 'pissa' needs a full-precision base (peft takes the SVD of its weights); use quantize "
                          f"'none', not {cfg.quantize!r}")


def serving_problem(config: dict) -> str | None:
    init = config.get("init", "default")
    if init in BASE_REWRITING_INITS:
        return (f"init {init!r} rewrote the base weights under its adapter, so it cannot share a base with other "
                f"adapters")
    return None


def describe(config: dict) -> list[str]:
    """r, alpha and the options that are on, for reports."""
    out = [f"r={config['rank']}", f"alpha={config['resolved']['lora_alpha']}"]
    if config.get("rslora"):
        out.append("rsLoRA")
    if config.get("init", "default") != "default":
        out.append(f"init {config['init']}")
    if config.get("loraplus_lr_ratio"):
        out.append(f"LoRA+ ratio {config['loraplus_lr_ratio']:g}")
    return out


def loraplus_optimizer(model, cfg, fused: bool):
    """peft's LoRA+ optimizer (AdamW): lora_B and the 1-d parameters (biases, DoRA's magnitudes) at
    loraplus_lr_ratio times the rate, the rest at the rate; weight decay as the run's, off for biases and norms."""
    import torch
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.lr, loraplus_lr_ratio=cfg.loraplus_lr_ratio,
                                     loraplus_weight_decay=cfg.weight_decay, fused=fused)


# What LoRA and DoRA share. The rate suits the short default job (one epoch of 2,500 reviews); for long runs on
# large models 2e-4..5e-4 is the usual LoRA range.
LORA_FAMILY = dict(learning_rate=3e-3, kind="lora", options=OPTIONS, check=check, serving_problem=serving_problem,
                   describe=describe)

register(PeftMethod(name="lora", title="LoRA", help="LoRA adapters (rank --rank) on --target-modules",
                    peft_config=lora_config, **LORA_FAMILY))
