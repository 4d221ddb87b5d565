"""Training speed: the common recipe vs lightune, same model, data, examples and LoRA settings, one invocation.

The common recipe (the seed projects' and most tutorials'): HF Trainer, every text padded to max_length (512),
fp32, no length grouping, the model's attention dropout. lightune: its own training loop (accelerate) with
dynamic padding, length-grouped batches run in token-budget chunks, no attention-probability dropout (so the
fused SDPA kernel runs), and bf16 autocast + fused AdamW on GPUs that support them.

Each recipe runs in its own child process (so peak memory is its own), one after the other. Both start from
the same seeded initialisation (LoRA matrices and head) and use the same optimizer, parameter groups and
schedule; they differ in batch order, dropout masks and attention dropout. With --seeds, each seed runs both
recipes and the accuracy difference is reported as mean +- standard deviation over the seeds:

    python benchmarks/bench_train.py                       # IMDb reviews
    python benchmarks/bench_train.py --data rotten_tomatoes  # short sentences, like SST-2
    python benchmarks/bench_train.py --data rotten_tomatoes --max-length 128 --seeds 1 2 3 4 5
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
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
    p.add_argument("--seeds", type=int, nargs="+", default=[42], help="training seeds (default: 42, lightune's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


def lightune_config(args, seed: int, output_dir: str, recipe: str = "lightune"):
    """The run's settings; the common recipe keeps the model's own attention dropout."""
    from lightune.config import load_config

    cfg = load_config(overrides=dict(model=args.model, data=args.data, train_size=args.train_size,
                                     eval_size=args.eval_size, max_length=args.max_length,
                                     batch_size=args.batch_size, learning_rate=args.lr, rank=args.rank, seed=seed,
                                     epochs=1, device=args.device, output_dir=output_dir, run_name="bench",
                                     truncation="head"))  # as the common recipe's tokenizer cuts: same tokens
    if recipe == "common":
        cfg.attention_dropout = None
    return cfg


def peak_bytes(device) -> int:
    from lightune.forward import peak_memory

    return peak_memory(device)[0]


def run_common(args, seed: int, out: dict) -> None:
    """HF Trainer, padding to max_length, fp32, random batches: the recipe most notebooks use."""
    import numpy as np
    from transformers import Trainer, TrainingArguments, set_seed

    from lightune import data, forward, models

    with tempfile.TemporaryDirectory() as tmp:
        cfg = lightune_config(args, seed, tmp, "common")
        device = forward.resolve_device(cfg.device)
        set_seed(cfg.seed)  # as lightune does before building the model: the same initial LoRA matrices and head
        splits = data.build_splits(cfg)
        tokenizer = models.load_tokenizer(cfg.model)

        def encode(ds):
            ds = ds.map(lambda b: tokenizer(b["text"], padding="max_length", truncation=True,
                                            max_length=cfg.max_length), batched=True, remove_columns=["text"])
            return ds.rename_column("label", "labels")

        train, test = encode(splits.train), encode(splits.test)
        model = models.prepare_for_training(models.load_base_model(cfg.model, splits.label_names), cfg)
        warmup_steps = int(cfg.warmup_ratio * math.ceil(len(train) / cfg.batch_size))  # lightune's rounding
        training_args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=64,
            num_train_epochs=1, learning_rate=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=warmup_steps,
            lr_scheduler_type="linear", max_grad_norm=cfg.max_grad_norm, logging_strategy="no", save_strategy="no",
            eval_strategy="no", report_to=[], seed=cfg.seed, use_cpu=device.type == "cpu", disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=train)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        prediction = trainer.predict(test)
        accuracy = float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())
        out.update(recipe="common", seed=seed, examples=len(train), seconds=seconds, samples_per_s=len(train) / seconds,
                   accuracy=accuracy, peak_bytes=peak_bytes(device), device=device.type)


def run_lightune(args, seed: int, out: dict) -> None:
    from lightune import forward
    from lightune.training import run_training

    with tempfile.TemporaryDirectory() as tmp:
        cfg = lightune_config(args, seed, tmp)
        m = run_training(cfg, progress=False).metrics
        out.update(recipe="lightune", seed=seed, examples=m["training"]["examples"], seconds=m["training"]["seconds"],
                   samples_per_s=m["training"]["samples_per_s"], accuracy=m["test"]["accuracy"],
                   peak_bytes=m["memory"]["peak_bytes"], device=forward.resolve_device(cfg.device).type)


def _child(recipe: str, args, seed: int, queue) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import datasets

    datasets.disable_progress_bars()
    out: dict = {}
    try:
        (run_common if recipe == "common" else run_lightune)(args, seed, out)
    except BaseException as exc:  # hand the failure to the parent instead of leaving it waiting
        import traceback

        out = {"error": "".join(traceback.format_exception(exc))}
    queue.put(out)


def run_in_child(recipe: str, args, seed: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(recipe, args, seed, queue))
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
    for quantize, label in (("none", "fp32"), ("nf4", "nf4"), ("int8", "int8")):
        try:
            model = models.load_base_model(model_name, ["negative", "positive"], quantize, torch.device("cpu"))
            out[label] = models.weight_memory_bytes(model)
        except Exception as exc:  # report, do not hide, a method this machine cannot load
            out[label] = f"unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return out


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f}" + (f" +- {statistics.stdev(values):.4f}" if len(values) > 1 else "")


def print_results(args, runs: list[dict]) -> float:
    """The per-seed table and the summary; returns the speed-up (ratio of mean samples/s)."""
    mb = 2 ** 20
    by_recipe = {r: [run[r] for run in runs] for r in RECIPES}
    print(f"\nmodel {args.model}, data {args.data}: {args.train_size} train / {args.eval_size} test examples, "
          f"max_length {args.max_length}, batch {args.batch_size}, LoRA r={args.rank}, device {runs[0]['lightune']['device']}")
    print(f"{'recipe':<10} {'seed':>5} {'train samples/s':>16} {'train s':>9} {'test accuracy':>14} {'peak memory MB':>15}")
    for run in runs:
        for r in (run["common"], run["lightune"]):
            print(f"{r['recipe']:<10} {r['seed']:>5} {r['samples_per_s']:>16.2f} {r['seconds']:>9.1f} "
                  f"{r['accuracy']:>14.4f} {r['peak_bytes'] / mb:>15.0f}")
    speed = {r: statistics.mean(x["samples_per_s"] for x in by_recipe[r]) for r in RECIPES}
    ratio = speed["lightune"] / speed["common"]
    diffs = [100 * (run["lightune"]["accuracy"] - run["common"]["accuracy"]) for run in runs]
    print(f"speed-up (lightune / common, mean samples/s): {ratio:.2f}x")
    print(f"test accuracy over {len(runs)} seed(s): common {mean_sd([x['accuracy'] for x in by_recipe['common']])}, "
          f"lightune {mean_sd([x['accuracy'] for x in by_recipe['lightune']])}")
    sd = f" +- {statistics.stdev(diffs):.2f}" if len(diffs) > 1 else ""
    se = f" (standard error {statistics.stdev(diffs) / math.sqrt(len(diffs)):.2f})" if len(diffs) > 1 else ""
    print(f"accuracy difference (lightune - common): {statistics.mean(diffs):+.2f}{sd} points{se}")
    return ratio


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = []
    for seed in args.seeds:
        run = {}
        for recipe in RECIPES:
            print(f"seed {seed}: running {recipe} ...", file=sys.stderr, flush=True)
            run[recipe] = run_in_child(recipe, args, seed)
            r = run[recipe]
            print(f"seed {seed}: {recipe} {r['samples_per_s']:.2f} samples/s, test accuracy {r['accuracy']:.4f}",
                  file=sys.stderr, flush=True)
        runs.append(run)
    ratio = print_results(args, runs)
    memory = weight_memory(args.model)
    mb = 2 ** 20
    print("weight memory: " + ", ".join(f"{k} {v / mb:.1f} MB" if isinstance(v, int) else f"{k} {v}"
                                        for k, v in memory.items()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "runs": runs, "speedup": ratio, "weight_memory": memory}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
