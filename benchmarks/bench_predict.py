"""Prediction speed: per-text prediction (the common recipe) vs lightune's batched path, same adapter, same texts.

common:   the seed projects' predict(): one text at a time, unmerged PEFT model, tokenizer(text, truncation=True)
lightune: Classifier.predict(): adapter merged into the base weights, texts sorted by length into
          token-budget batches (2,048 padded tokens per batch on CPU)

    python benchmarks/bench_predict.py                          # trains a small adapter first
    python benchmarks/bench_predict.py --run-dir runs/<run> --data rotten_tomatoes
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", help="a finished lightune run (default: train a small LoRA adapter first)")
    p.add_argument("--data", default="imdb", help="where the texts come from (its test split)")
    p.add_argument("--texts", type=int, default=1000)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p.parse_args(argv)


def quick_run(output_dir: str) -> str:
    from lightune.config import load_config
    from lightune.training import run_training

    cfg = load_config(overrides=dict(data="imdb", train_size=320, eval_size=64, max_steps=20, output_dir=output_dir,
                                     run_name="bench-predict"))
    return str(run_training(cfg, progress=False).run_dir)


def benchmark_texts(source: str, n: int) -> list[str]:
    from lightune.config import from_dict
    from lightune.data import build_splits

    # test_fraction 0.1 of IMDb is ~2,490 reviews; take the first n of a fixed, seeded split
    splits = build_splits(from_dict({"data": source, "train_size": 10, "eval_size": n}))
    return list(splits.test["text"])[:n]


def per_text(classifier, texts: list[str]):
    """The common recipe: one forward pass per text through the unmerged PEFT model."""
    import torch

    probs = []
    start = time.perf_counter()
    with torch.no_grad():
        for text in texts:
            enc = classifier.tokenizer(text, truncation=True, max_length=classifier.max_length,
                                       return_tensors="pt").to(classifier.device)
            probs.append(torch.softmax(classifier.model(**enc).logits.float(), -1).cpu())
    return time.perf_counter() - start, torch.cat(probs)


def batched(classifier, texts: list[str]):
    import torch

    start = time.perf_counter()
    logits = classifier.logits(texts)
    return time.perf_counter() - start, torch.softmax(logits, -1)


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    import datasets

    from lightune.data import clean_text
    from lightune.inference import Classifier

    datasets.disable_progress_bars()
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run_dir or quick_run(tmp)
        texts = [clean_text(t) for t in benchmark_texts(args.data, args.texts)]
        common = Classifier(run_dir, device=args.device, merge=False)
        fast = Classifier(run_dir, device=args.device, merge=True)
        common_s, common_p = per_text(common, texts)
        fast_s, fast_p = batched(fast, texts)
    agree = float((common_p.argmax(-1) == fast_p.argmax(-1)).float().mean())
    print(f"\n{len(texts)} {args.data} texts, device {fast.device.type}, max_length {fast.max_length}")
    print(f"{'recipe':<10} {'texts/s':>9} {'seconds':>9}")
    print(f"{'common':<10} {len(texts) / common_s:>9.1f} {common_s:>9.1f}   per text, unmerged adapter")
    print(f"{'lightune':<10} {len(texts) / fast_s:>9.1f} {fast_s:>9.1f}   merged, token-budget batches")
    print(f"speed-up (lightune / common): {common_s / fast_s:.2f}x; same label for {100 * agree:.1f}% of texts; "
          f"max probability difference {float((common_p - fast_p).abs().max()):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
