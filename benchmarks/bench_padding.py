"""Padding share of GPU batches: the padded tokens a GPU computes beyond the texts' own, per rule for the fixed
padded widths, on the packaged data's token lengths. What unpadded (varlen) attention or sequence packing could
save at most is this share; the rule in use is forward.pad_multiple.

    python benchmarks/bench_padding.py --json benchmarks/results/gpu-padding-<date>.json

Training batches come from transformers' LengthGroupedSampler (batch 64, as `lightune train` groups them);
prediction batches from forward.token_budget_batches (65,536 tokens, at most 64 texts, as on a GPU). No timing:
counts only, so it runs anywhere in under a minute.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

def rules(forward) -> dict:
    """The rules compared, each a function of max_length giving the multiple a padded width is rounded up to."""
    return {"steps of 64 (before 2026-12-01)": lambda max_length: math.gcd(max_length, 64),
            "lightune (forward.pad_multiple)": lambda max_length: forward.pad_multiple("cuda", max_length),
            "no fixed widths (each batch at its longest text)": lambda max_length: 1}


def padded_tokens(batches: list[list[int]], lengths: list[int], multiple: int) -> int:
    return sum(-(-max(lengths[i] for i in batch) // multiple) * multiple * len(batch) for batch in batches)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="write the rows to this JSON file")
    args = p.parse_args(argv)
    import pandas as pd
    import torch
    from transformers import AutoTokenizer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from lightune import forward, models
    from lightune.sources import packaged_reviews_csv

    reviews = pd.read_csv(packaged_reviews_csv())
    tokenizer = AutoTokenizer.from_pretrained(models.resolve_model_path("all-MiniLM-L6-v2"))
    rows = []
    for source, max_lengths, n in (("imdb", (256, 512), 20000), ("rotten_tomatoes", (64, 128), None)):
        texts = reviews[reviews.source == source].text.tolist()[:n]
        full = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max(max_lengths))["input_ids"]]
        for max_length in max_lengths:
            lengths = [min(n_tokens, max_length) for n_tokens in full]
            order = list(LengthGroupedSampler(64, lengths=lengths, generator=torch.Generator().manual_seed(0)))
            train = [order[i:i + 64] for i in range(0, len(order), 64)]
            predict = forward.token_budget_batches(lengths, forward.GPU_EVAL_CHUNK_TOKENS, 64)
            for rule, multiple_of in rules(forward).items():
                multiple = multiple_of(max_length)
                row = {"data": source, "texts": len(lengths), "max_length": max_length, "rule": rule,
                       "pad_multiple": multiple, "widths": -(-max_length // multiple),
                       "mean_tokens": sum(lengths) / len(lengths),
                       "train_padding_share": padded_tokens(train, lengths, multiple) / sum(lengths) - 1,
                       "predict_padding_share": padded_tokens(predict, lengths, multiple) / sum(lengths) - 1}
                rows.append(row)
                print(f"{source:16} max_length {max_length:3} ({row['mean_tokens']:.0f} tokens on average) "
                      f"{rule:49} x{multiple:<3} padding: training +{row['train_padding_share']:.1%}, "
                      f"prediction +{row['predict_padding_share']:.1%}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": "all-MiniLM-L6-v2", "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
