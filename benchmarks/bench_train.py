"""Training speed: the common recipe vs lightune, same model, data, examples and LoRA settings, one invocation.

The common recipe (the seed projects' and most tutorials'): HF Trainer, every text padded to max_length (512),
fp32, no length grouping. lightune: its own training loop (accelerate) with dynamic padding, length-grouped
batches, and bf16 autocast + fused AdamW on GPUs that support them.

Each recipe runs in its own child process (so peak memory is its own), one after the other:

    python benchmarks/bench_train.py                       # IMDb reviews
    python benchmarks/bench_train.py --data rotten_tomatoes  # short sentences, like SST-2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time

RECIPES = ("common", "lightune")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--data", default="imdb")
    p.add_argument("--train-size", type=int, default=800)
    p.add_argument("--eval-size", type=int, default=500)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


def lightune_config(args, output_dir: str):
    from lightune.config import load_config

    return load_config(overrides=dict(model=args.model, data=args.data, train_size=args.train_size,
                                      eval_size=args.eval_size, max_length=args.max_length,
                                      batch_size=args.batch_size, learning_rate=args.lr, rank=args.rank,
                                      epochs=1, device=args.device, output_dir=output_dir, run_name="bench"))


def peak_bytes(device) -> int:
    from lightune.training import peak_memory

    return peak_memory(device)[0]


def run_common(args, out: dict) -> None:
    """HF Trainer, padding to max_length, fp32, random batches: the recipe most notebooks use."""
    import numpy as np
    from transformers import Trainer, TrainingArguments

    from lightune import data, models

    with tempfile.TemporaryDirectory() as tmp:
        cfg = lightune_config(args, tmp)
        device = models.resolve_device(cfg.device)
        splits = data.build_splits(cfg)
        tokenizer = models.load_tokenizer(cfg.model)

        def encode(ds):
            ds = ds.map(lambda b: tokenizer(b["text"], padding="max_length", truncation=True,
                                            max_length=cfg.max_length), batched=True, remove_columns=["text"])
            return ds.rename_column("label", "labels")

        train, test = encode(splits.train), encode(splits.test)
        model = models.prepare_for_training(models.load_base_model(cfg.model, splits.label_names), cfg)
        training_args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=64,
            num_train_epochs=1, learning_rate=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_ratio,
            lr_scheduler_type="linear", max_grad_norm=cfg.max_grad_norm, logging_strategy="no", save_strategy="no",
            eval_strategy="no", report_to=[], seed=cfg.seed, use_cpu=device.type == "cpu", disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=train)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        prediction = trainer.predict(test)
        accuracy = float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())
        out.update(recipe="common", examples=len(train), seconds=seconds, samples_per_s=len(train) / seconds,
                   accuracy=accuracy, peak_bytes=peak_bytes(device), device=device.type)


def run_lightune(args, out: dict) -> None:
    from lightune import models
    from lightune.training import run_training

    with tempfile.TemporaryDirectory() as tmp:
        cfg = lightune_config(args, tmp)
        m = run_training(cfg, progress=False).metrics
        out.update(recipe="lightune", examples=m["training"]["examples"], seconds=m["training"]["seconds"],
                   samples_per_s=m["training"]["samples_per_s"], accuracy=m["test"]["accuracy"],
                   peak_bytes=m["memory"]["peak_bytes"], device=models.resolve_device(cfg.device).type)


def _child(recipe: str, args, queue) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import datasets

    datasets.disable_progress_bars()
    out: dict = {}
    try:
        (run_common if recipe == "common" else run_lightune)(args, out)
    except BaseException as exc:  # hand the failure to the parent instead of leaving it waiting
        import traceback

        out = {"error": "".join(traceback.format_exception(exc))}
    queue.put(out)


def run_in_child(recipe: str, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(recipe, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise SystemExit(f"the {recipe} recipe failed:\n{result['error']}")
    return result


def weight_memory(model_name: str) -> dict:
    """Weight memory of the backbone loaded in fp32, 4-bit NF4 and 8-bit (bitsandbytes)."""
    import torch
    import transformers

    from lightune import models

    transformers.utils.logging.disable_progress_bar()
    out = {}
    for method, label in (("lora", "fp32"), ("qlora", "nf4"), ("int8", "int8")):
        try:
            model = models.load_base_model(model_name, ["negative", "positive"], method, torch.device("cpu"))
            out[label] = models.weight_memory_bytes(model)
        except Exception as exc:  # report, do not hide, a method this machine cannot load
            out[label] = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    results = {}
    for recipe in RECIPES:
        print(f"running {recipe} ...", file=sys.stderr, flush=True)
        results[recipe] = run_in_child(recipe, args)
    common, fast = results["common"], results["lightune"]
    mb = 2 ** 20
    print(f"\nmodel {args.model}, data {args.data}: {args.train_size} train / {args.eval_size} test examples, "
          f"max_length {args.max_length}, batch {args.batch_size}, LoRA r={args.rank}, device {fast['device']}")
    print(f"{'recipe':<10} {'train samples/s':>16} {'train s':>9} {'test accuracy':>14} {'peak memory MB':>15}")
    for r in (common, fast):
        print(f"{r['recipe']:<10} {r['samples_per_s']:>16.2f} {r['seconds']:>9.1f} {r['accuracy']:>14.4f} "
              f"{r['peak_bytes'] / mb:>15.0f}")
    ratio = fast["samples_per_s"] / common["samples_per_s"]
    print(f"speed-up (lightune / common): {ratio:.2f}x; accuracy difference: "
          f"{100 * (fast['accuracy'] - common['accuracy']):+.2f} points")
    memory = weight_memory(args.model)
    print("weight memory: " + ", ".join(f"{k} {v / mb:.1f} MB" if isinstance(v, int) else f"{k} {v}"
                                        for k, v in memory.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results, "speedup": ratio, "weight_memory": memory}, fh,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
