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

--recipes picks the recipes (default: common lightune). `strong` is the strongest HF Trainer recipe a GPU user
would run: bf16 (fp16 where the GPU has no bf16; fp32 on a CPU), group_by_length=True, dynamic padding, and a large batch
(--strong-batch-size); `lightune-compile` is lightune with --compile. Lightune's speed-up is reported against each
Trainer recipe run, and the useful share of the device: the FLOPs of the training step on the unpadded texts
(the forward and the backward to the inputs: the frozen weights get no gradients) per second, over the best rate
of a large matrix product measured in the same invocation (bf16 on CUDA, fp32 on CPU). The JSON (--json) is
rewritten after each run, so a run cut off by a time limit keeps what it measured:

    python benchmarks/bench_train.py --device cuda --train-size 20000 --eval-size 2000 --seeds 1 2 3 \
        --recipes strong lightune --strong-batch-size 64 --json bench-train.json
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

RECIPES = ("common", "strong", "lightune", "lightune-compile")
TRAINER_RECIPES = ("common", "strong")


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
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=["common", "lightune"],
                   help="the recipes to run, in this order for each seed (default: common lightune)")
    p.add_argument("--strong-batch-size", type=int, default=64, help="the strong Trainer recipe's batch")
    p.add_argument("--json", help="also write the results to this JSON file (after each run)")
    return p.parse_args(argv)


def lightune_config(args, seed: int, output_dir: str, recipe: str = "lightune"):
    """The run's settings; the Trainer recipes keep the model's own attention dropout, the strong one has its own
    batch size, lightune-compile compiles."""
    from lightune.config import load_config

    cfg = load_config(overrides=dict(model=args.model, data=args.data, train_size=args.train_size,
                                     eval_size=args.eval_size, max_length=args.max_length,
                                     batch_size=args.strong_batch_size if recipe == "strong" else args.batch_size,
                                     learning_rate=args.lr, rank=args.rank, seed=seed, compile=recipe.endswith("compile"),
                                     epochs=1, device=args.device, output_dir=output_dir, run_name="bench",
                                     truncation="head"))  # as the common recipe's tokenizer cuts: same tokens
    if recipe in TRAINER_RECIPES:
        cfg.attention_dropout = None
    return cfg


def peak_bytes(device) -> int:
    from lightune.forward import peak_memory

    return peak_memory(device)[0]


def run_trainer(args, seed: int, out: dict, recipe: str = "common") -> None:
    """HF Trainer. common: padding to max_length, fp32, random batches (the recipe most notebooks use); strong:
    dynamic padding, bf16 (fp16 on GPUs without it; fp32 on a CPU), group_by_length, the strong batch size."""
    import numpy as np
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    from lightune import data, forward, models

    strong = recipe == "strong"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = lightune_config(args, seed, tmp, recipe)
        device = forward.resolve_device(cfg.device)
        set_seed(cfg.seed)  # as lightune does before building the model: the same initial LoRA matrices and head
        splits = data.build_splits(cfg)
        tokenizer = models.load_tokenizer(cfg.model)

        def encode(ds):
            ds = ds.map(lambda b: tokenizer(b["text"], padding=False if strong else "max_length", truncation=True,
                                            max_length=cfg.max_length), batched=True, remove_columns=["text"])
            return ds.rename_column("label", "labels")

        train, test = encode(splits.train), encode(splits.test)
        model = models.prepare_for_training(models.load_base_model(cfg.model, splits.label_names), cfg)
        warmup_steps = int(cfg.warmup_ratio * math.ceil(len(train) / cfg.batch_size))  # lightune's rounding
        # mixed precision on GPUs only: a CPU without bf16 matrix units runs bf16 slower than fp32
        cuda = device.type == "cuda"
        bf16 = strong and cuda and torch.cuda.is_bf16_supported()
        fp16 = strong and cuda and not bf16
        options = dict(bf16=bf16, fp16=fp16, **group_by_length_option(TrainingArguments),
                       data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8)) if strong else {}
        collator = options.pop("data_collator", None)
        training_args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=64,
            num_train_epochs=1, learning_rate=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=warmup_steps,
            lr_scheduler_type="linear", max_grad_norm=cfg.max_grad_norm, logging_strategy="no", save_strategy="no",
            eval_strategy="no", report_to=[], seed=cfg.seed, use_cpu=device.type == "cpu", disable_tqdm=True,
            **options)
        trainer = Trainer(model=model, args=training_args, train_dataset=train, data_collator=collator)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        prediction = trainer.predict(test)
        accuracy = float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())
        out.update(recipe=recipe, seed=seed, examples=len(train), seconds=seconds, samples_per_s=len(train) / seconds,
                   accuracy=accuracy, peak_bytes=peak_bytes(device), device=device.type, batch_size=cfg.batch_size,
                   precision="bf16" if bf16 else "fp16" if fp16 else "fp32")


def group_by_length_option(training_arguments) -> dict:
    """TrainingArguments' group_by_length=True, or train_sampling_strategy="group_by_length" where a newer
    transformers has replaced the flag with it."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(training_arguments)}
    if "train_sampling_strategy" in fields:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def run_lightune(args, seed: int, out: dict, recipe: str = "lightune") -> None:
    from lightune import forward
    from lightune.training import run_training

    with tempfile.TemporaryDirectory() as tmp:
        cfg = lightune_config(args, seed, tmp, recipe)
        m = run_training(cfg, progress=False).metrics
        out.update(recipe=recipe, seed=seed, examples=m["training"]["examples"], seconds=m["training"]["seconds"],
                   samples_per_s=m["training"]["samples_per_s"], accuracy=m["test"]["accuracy"],
                   peak_bytes=m["memory"]["peak_bytes"], device=forward.resolve_device(cfg.device).type,
                   batch_size=cfg.batch_size, precision=m["precision"])


def _child(recipe: str, args, seed: int, queue) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import datasets

    datasets.disable_progress_bars()
    out: dict = {}
    try:
        (run_trainer if recipe in TRAINER_RECIPES else run_lightune)(args, seed, out, recipe)
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
    return result  # {"error": traceback} when the recipe failed


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


def train_flops_per_text(args) -> dict:
    """Useful FLOPs of training on the train split, counted on its unpadded texts: 2 x the forward (the forward and
    the backward to the inputs; the frozen weights get no gradients, LoRA's own are about 1%), the forward being
    2 per weight of the encoder's linear layers per token plus the attention products (4 x length^2 x hidden per
    layer). Returns the mean per text and the mean tokens per text."""
    from lightune import data, models
    from lightune.forward import encode_texts

    cfg = lightune_config(args, args.seeds[0], tempfile.gettempdir())  # the split does not depend on the seed
    config = models.load_model_config(cfg.model)
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    weights = layers * (4 * h * h + 2 * h * i)
    texts = list(data.build_splits(cfg).train["text"])
    lengths = [len(ids) for ids in encode_texts(models.load_tokenizer(cfg.model), texts, cfg.max_length)["input_ids"]]
    flops = [2 * (2 * n * weights + 4 * layers * n * n * h) for n in lengths]
    return {"flops_per_text": sum(flops) / len(flops), "tokens_per_text": sum(lengths) / len(lengths)}


def matmul_rate(device_name: str, seconds: float = 1.0) -> dict:
    """The best FLOP/s over a few short windows of one large matrix product: bf16 8192^2 on CUDA, fp32 1024^2 on the
    CPU (the device's own ceiling for this work, measured here rather than taken from a data sheet)."""
    import torch

    from lightune.forward import resolve_device

    device = resolve_device(device_name)
    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(4):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 4:
            a @ b
            count += 1
            if cuda and count % 16 == 0:
                torch.cuda.synchronize()
        if cuda:
            torch.cuda.synchronize()
        best = max(best, count * 2 * n ** 3 / (time.perf_counter() - start))
    out = {"flop_per_s": best, "dtype": str(dtype).replace("torch.", ""), "size": n,
           "device": torch.cuda.get_device_name(device) if cuda else "cpu"}
    del a, b
    if cuda:
        torch.cuda.empty_cache()  # the training runs (child processes) get the memory back
    return out


def summary(args, runs: list[dict], work: dict | None = None, rate: dict | None = None) -> dict:
    """Per recipe: mean samples/s, accuracy (mean, sd), peak memory; lightune's speed-ups over each Trainer recipe
    and accuracy differences (points, per seed); the useful share of the device where work and rate are known."""
    by_recipe = {r: [run[r] for run in runs if "error" not in run.get(r, {"error": ""})] for r in args.recipes}
    out: dict = {"recipes": {}}
    for recipe, results in by_recipe.items():
        if not results:
            continue
        accuracy = [x["accuracy"] for x in results]
        speed = statistics.mean(x["samples_per_s"] for x in results)
        row = {"samples_per_s": speed, "accuracy": statistics.mean(accuracy),
               "accuracy_sd": statistics.stdev(accuracy) if len(accuracy) > 1 else None,
               "peak_bytes": max(x["peak_bytes"] for x in results), "seeds": [x["seed"] for x in results]}
        if work and rate:
            row["useful_share"] = speed * work["flops_per_text"] / rate["flop_per_s"]
        out["recipes"][recipe] = row
    for fast in ("lightune", "lightune-compile"):
        for base in TRAINER_RECIPES:
            pairs = [(run[fast], run[base]) for run in runs
                     if "error" not in run.get(fast, {"error": ""}) and "error" not in run.get(base, {"error": ""})]
            if not pairs:
                continue
            diffs = [100 * (f["accuracy"] - b["accuracy"]) for f, b in pairs]
            out[f"{fast} / {base}"] = {
                "speedup": statistics.mean(f["samples_per_s"] for f, _ in pairs)
                / statistics.mean(b["samples_per_s"] for _, b in pairs),
                "accuracy_points": statistics.mean(diffs),
                "accuracy_points_sd": statistics.stdev(diffs) if len(diffs) > 1 else None}
    return out


def print_results(args, runs: list[dict], result: dict) -> None:
    """The per-seed table and the summary."""
    mb = 2 ** 20
    device = next((r["device"] for run in runs for r in run.values() if "device" in r), "none")
    print(f"\nmodel {args.model}, data {args.data}: {args.train_size} train / {args.eval_size} test examples, "
          f"max_length {args.max_length}, batch {args.batch_size} (strong {args.strong_batch_size}), LoRA r={args.rank}, "
          f"device {device}")
    print(f"{'recipe':<17} {'seed':>5} {'train samples/s':>16} {'train s':>9} {'test accuracy':>14} {'peak memory MB':>15}")
    for run in runs:
        for r in (r for r in run.values() if "error" not in r):
            print(f"{r['recipe']:<17} {r['seed']:>5} {r['samples_per_s']:>16.2f} {r['seconds']:>9.1f} "
                  f"{r['accuracy']:>14.4f} {r['peak_bytes'] / mb:>15.0f}")
    for recipe, row in result["recipes"].items():
        sd = f" +- {row['accuracy_sd']:.4f}" if row["accuracy_sd"] is not None else ""
        share = f", {row['useful_share']:.1%} of the measured matrix-product rate" if "useful_share" in row else ""
        print(f"{recipe}: {row['samples_per_s']:.1f} samples/s, test accuracy {row['accuracy']:.4f}{sd} over "
              f"{len(row['seeds'])} seed(s){share}")
    for key, row in result.items():
        if key != "recipes" and isinstance(row, dict) and "speedup" in row:
            sd = f" +- {row['accuracy_points_sd']:.2f}" if row["accuracy_points_sd"] is not None else ""
            print(f"speed-up {key}: {row['speedup']:.2f}x; accuracy difference {row['accuracy_points']:+.2f}{sd} points")


def write_json(args, runs: list[dict], **extra) -> None:
    """The results so far (rewritten after each run: a run cut off keeps what it measured)."""
    if args.json:
        with open(args.json + ".tmp", "w") as fh:
            json.dump({"args": vars(args), "runs": runs, **extra}, fh, indent=2)
        os.replace(args.json + ".tmp", args.json)


def main(argv=None) -> int:
    args = parse_args(argv)
    # the device's rate and the useful work first: a benchmark cut off by a time limit keeps the useful share
    work, rate = train_flops_per_text(args), matmul_rate(args.device)
    runs: list[dict] = []
    failed: list[str] = []
    for seed in args.seeds:
        run: dict = {}
        runs.append(run)
        for recipe in args.recipes:
            print(f"seed {seed}: running {recipe} ...", file=sys.stderr, flush=True)
            run[recipe] = r = run_in_child(recipe, args, seed)
            if "error" in r:  # the other recipes and seeds still run: one failure does not lose their figures
                failed.append(recipe)
                print(f"seed {seed}: the {recipe} recipe failed:\n{r['error']}", file=sys.stderr, flush=True)
            else:
                print(f"seed {seed}: {recipe} {r['samples_per_s']:.2f} samples/s, test accuracy {r['accuracy']:.4f}",
                      file=sys.stderr, flush=True)
            write_json(args, runs, summary=summary(args, runs, work, rate), useful_work=work, matmul=rate)
    result = summary(args, runs, work, rate)
    print_results(args, runs, result)
    print(f"useful work: {work['flops_per_text'] / 1e9:.2f} GFLOP a text ({work['tokens_per_text']:.0f} tokens); "
          f"matrix-product rate ({rate['dtype']}, {rate['device']}): {rate['flop_per_s'] / 1e12:.2f} TFLOP/s")
    memory = weight_memory(args.model)
    mb = 2 ** 20
    print("weight memory: " + ", ".join(f"{k} {v / mb:.1f} MB" if isinstance(v, int) else f"{k} {v}"
                                        for k, v in memory.items()))
    write_json(args, runs, summary=result, useful_work=work, matmul=rate, weight_memory=memory)
    if failed:
        print(f"failed: {', '.join(failed)} (tracebacks above and in the JSON)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
