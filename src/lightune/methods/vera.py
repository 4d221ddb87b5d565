"""VeRA (peft VeraConfig): one pair of frozen random projections shared by every target layer, and per layer two
trained scaling vectors; far fewer trained weights than LoRA at the same rank."""

from __future__ import annotations

from .registry import PeftMethod, register
from .targets import head_layer_names, target_modules

BIASES = {"none": "none", "lora_only": "vera_only", "all": "all"}  # --bias -> VeraConfig.bias


def vera_config(cfg, model):
    """VeRA at rank --rank on --target-modules, the head in modules_to_save.

    The shared projections are sized to the largest target layer and drawn from peft's fixed key
    (projection_prng_key 0); save_projection keeps them in the saved adapter, so stock peft reloads it exactly
    whatever its random-number generator does, and every VeRA run can share one served base (peft requires the
    same key and save_projection for all adapters of a model)."""
    from peft import TaskType, VeraConfig

    return VeraConfig(task_type=TaskType.SEQ_CLS, r=cfg.rank, target_modules=target_modules(cfg, model),
                      vera_dropout=cfg.dropout, bias=BIASES[cfg.bias], save_projection=True,
                      modules_to_save=head_layer_names(model))


def sharing(config: dict) -> str:
    """VeRA adapters share a base only at one rank on the same layers: peft sizes the shared projections for the
    first adapter loaded, and a later one of another rank or on larger layers does not fit them."""
    targets = config.get("target_modules")
    return f"r={config['rank']} on {','.join(targets) if targets else 'default targets'}"


def describe(config: dict) -> list[str]:
    return [f"r={config['rank']}"]


# VeRA trains only scaling vectors (and the head), which take a larger rate than LoRA's matrices; not tuned.
register(PeftMethod(name="vera", title="VeRA", help="shared frozen random projections (rank --rank) and trained "
                    "per-layer scaling vectors", learning_rate=1e-2, peft_config=vera_config, kind="vera",
                    sharing=sharing, describe=describe))
