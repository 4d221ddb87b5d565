"""LoHa and LoKr (peft LoHaConfig / LoKrConfig, from LyCORIS): the update of each target layer is a Hadamard
product of two low-rank matrices (LoHa) or a Kronecker product of a small matrix and a low-rank one (LoKr)."""

from __future__ import annotations

from .registry import PeftMethod, register
from .targets import head_layer_names, target_modules


def lycoris_config(config_name: str):
    """A builder of peft's `config_name` (LoHaConfig, LoKrConfig) from a run: --rank, --alpha and
    --target-modules as for LoRA (their rank and module dropout stay off), the head in modules_to_save."""

    def build(cfg, model):
        import peft

        return getattr(peft, config_name)(task_type=peft.TaskType.SEQ_CLS, r=cfg.rank, alpha=cfg.lora_alpha,
                                          target_modules=target_modules(cfg, model),
                                          modules_to_save=head_layer_names(model))

    return build


def describe(config: dict) -> list[str]:
    return [f"r={config['rank']}", f"alpha={config['resolved']['lora_alpha']}"]


# peft 0.21 has LoHa/LoKr layers for torch's Linear and Conv only: on a bitsandbytes layer the update's shape does
# not match the packed 4-bit weight, so the forward pass fails.
LYCORIS = dict(learning_rate=3e-3, quantize=("none",), quantize_note="peft's LoHa and LoKr have no bitsandbytes "
               "layers", describe=describe)

register(PeftMethod(name="loha", title="LoHa", help="Hadamard product of two low-rank updates (rank --rank)",
                    peft_config=lycoris_config("LoHaConfig"), kind="loha", **LYCORIS))
register(PeftMethod(name="lokr", title="LoKr", help="Kronecker product of a small and a low-rank update (--rank)",
                    peft_config=lycoris_config("LoKrConfig"), kind="lokr", **LYCORIS))
