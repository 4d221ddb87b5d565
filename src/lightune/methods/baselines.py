"""Baselines without an adapter: full fine-tuning and training the classification head only."""

from __future__ import annotations

from .registry import PeftMethod, register


def in_head(name: str, heads: set[str]) -> bool:
    """Whether a parameter belongs to the head (the classifier, or BERT's pooler one level down)."""
    return any(part in heads for part in name.split(".")[:2])


register(PeftMethod(name="full", title="full fine-tuning", help="full fine-tuning of every weight",
                    learning_rate=5e-5, trains=lambda name, heads: True, quantize=("none",), merges=False,
                    shares_base=False))
register(PeftMethod(name="head", title="head-only training", help="train the classification head only",
                    learning_rate=3e-3, trains=in_head, quantize=("none",), merges=False, shares_base=False))
