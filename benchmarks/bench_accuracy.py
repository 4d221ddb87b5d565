"""Accuracy per CPU minute: lightune vs a linear probe on frozen embeddings vs SetFit, same splits, same seeds.

Every recipe reads lightune's own splits of the data (split seed 42 unless --split-seed), so each one is trained
on the same examples and scored on the same held-out test reviews (their fingerprint is printed):

- lightune: `lightune train` with its defaults and --train-size N --seed S (nothing tuned by hand).
- linear probe: the model's own sentence embedding (sentence-transformers: its pooling and normalisation),
  frozen, and a scikit-learn logistic regression on it; the time includes embedding the train and test texts.
  It has no randomness, so it runs once per size.
- SetFit (optional, `pip install -e ".[bench]"`): SetFit 1.2's defaults (contrastive fine-tuning of the body
  on 20 pair iterations per example, one epoch, then a logistic-regression head) with the same model.

Wall time is the whole recipe, from loading the model to the test figures. Each recipe runs in a fresh child
process (run_measured), so its peak memory (the child's peak resident set) is its own. For each size it prints
each recipe's accuracy and F1 as mean +- standard deviation over the seeds, wall time and peak memory:

    python benchmarks/bench_accuracy.py                                   # 32, 128, 2500 examples; 3 seeds
    python benchmarks/bench_accuracy.py --sizes 32 128 --setfit --json bench.json
    python benchmarks/bench_accuracy.py --sizes 32 128 --seeds 42 --setfit --only SetFit   # SetFit alone
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--data", default="imdb")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 2500], help="training examples")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="training seeds")
    p.add_argument("--split-seed", type=int, default=42)
    p.add_argument("--eval-size", type=int, default=500, help="held-out test examples (and validation)")
    p.add_argument("--setfit", action="store_true", help="also run SetFit (slow on a CPU; needs the bench extra)")
    p.add_argument("--setfit-max-size", type=int, default=128, help="skip SetFit above this many examples")
    p.add_argument("--only", nargs="+", choices=["lightune", "linear probe", "SetFit"],
                   help="run only these recipes (e.g. --only SetFit --setfit, to add SetFit to an earlier run)")
    p.add_argument("--json", help="also write every result to this JSON file")
    return p.parse_args(argv)


def load_splits(args, size: int):
    """lightune's train and test splits for this size (the same for every recipe and seed): train is the `size`
    labelled examples drawn, all of them (lightune's own run carves its validation out of them where its
    --validation-labels says so; the probe and SetFit choose nothing on validation)."""
    from lightune import data
    from lightune.config import load_config

    cfg = load_config(overrides=dict(model=args.model, data=args.data, train_size=size, eval_size=args.eval_size,
                                     split_seed=args.split_seed, validation_labels="separate"))
    return data.build_splits(cfg)


def scores(labels, predicted) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(labels, predicted)),
            "f1": float(f1_score(labels, predicted, average="macro"))}


def run_lightune(args, size: int, seed: int, splits) -> dict:
    from lightune.config import load_config
    from lightune.training import run_training

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(overrides=dict(model=args.model, data=args.data, train_size=size, eval_size=args.eval_size,
                                         split_seed=args.split_seed, seed=seed, output_dir=out, run_name="bench"))
        start = time.perf_counter()
        metrics = run_training(cfg, progress=False).metrics
        seconds = time.perf_counter() - start
    assert metrics["data"]["fingerprints"]["test"] == splits.info["fingerprints"]["test"]
    return {"accuracy": metrics["test"]["accuracy"], "f1": metrics["test"]["f1"], "seconds": seconds,
            "steps": metrics["training"]["steps"], "objective": metrics["training"]["objective"],
            "probe_start_accuracy": metrics["base"]["accuracy"], "kept_step": metrics["best"]["step"],
            "labelled": metrics["data"]["labelled"]}  # the labels it trained and validated on


def sentence_model_path(model: str) -> str:
    from lightune import models

    return str(models.resolve_model_path(model))


def run_linear_probe(args, size: int, seed: int, splits) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(seed)
    start = time.perf_counter()
    encoder = SentenceTransformer(sentence_model_path(args.model), device="cpu")
    train_x = encoder.encode(splits.train["text"], batch_size=64)
    test_x = encoder.encode(splits.test["text"], batch_size=64)
    probe = LogisticRegression(max_iter=2000, random_state=seed).fit(train_x, splits.train["label"])
    predicted = probe.predict(test_x)
    return {**scores(splits.test["label"], predicted), "seconds": time.perf_counter() - start}


def run_setfit(args, size: int, seed: int, splits) -> dict:
    from setfit import SetFitModel, Trainer, TrainingArguments

    start = time.perf_counter()
    model = SetFitModel.from_pretrained(sentence_model_path(args.model), device="cpu")
    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(output_dir=out, batch_size=16, num_epochs=1, seed=seed, report_to="none",
                                          show_progress_bar=False)
        Trainer(model=model, args=training_args, train_dataset=splits.train).train()
    predicted = model.predict(splits.test["text"], batch_size=64, as_numpy=True)
    return {**scores(splits.test["label"], predicted), "seconds": time.perf_counter() - start}


RECIPES = {"lightune": run_lightune, "linear probe": run_linear_probe, "SetFit": run_setfit}


def run_measured(recipe: str, args, size: int, seed: int) -> dict:
    """One recipe's result from a fresh process (multiprocessing's spawn: nothing shared with this one or the
    other rows), with that process's peak resident memory as peak_mb (MiB). The child reads the splits itself
    (load_splits: the same for every recipe and seed), as `lightune train` does."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measured_row, recipe, args, size, seed).result()


def measured_row(recipe: str, args, size: int, seed: int) -> dict:
    """In the child: the recipe's result and this process's peak resident set."""
    result = RECIPES[recipe](args, size, seed, load_splits(args, size))
    return {**result, "peak_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident set in MiB: VmHWM on Linux (its own memory's high-water mark, whatever the
    parent held), else getrusage's ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / (2**20 if sys.platform == "darwin" else 1024)


def recipes_for(args, size: int, seed: int) -> list[str]:
    """The recipes to run for this size and seed; the linear probe has no randomness, so it runs once."""
    names = ["lightune"] + (["linear probe"] if seed == args.seeds[0] else [])
    if args.setfit and size <= args.setfit_max_size:
        names.append("SetFit")
    return [name for name in names if not args.only or name in args.only]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"


def summary_rows(results: list[dict]) -> list[str]:
    """One row per (size, recipe): accuracy, F1 (mean +- std over seeds), mean wall time, peak memory (the most of
    any seed)."""
    rows = ["| examples | recipe | seeds | accuracy | macro F1 | wall time (s, mean) | peak memory (MiB, max) |",
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    keys = dict.fromkeys((r["size"], r["recipe"]) for r in results)
    for size, recipe in keys:
        runs = [r for r in results if (r["size"], r["recipe"]) == (size, recipe)]
        rows.append(f"| {size} | {recipe} | {len(runs)} | {mean_std([r['accuracy'] for r in runs])} | "
                    f"{mean_std([r['f1'] for r in runs])} | {statistics.mean(r['seconds'] for r in runs):.0f} | "
                    f"{max(r['peak_mb'] for r in runs):.0f} |")
    return rows


def cpu_has_avx512_bf16() -> bool | None:
    """Whether this CPU has AVX512-BF16 (torch and bitsandbytes take other code paths there); None off Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.setfit:
        try:
            import setfit  # noqa: F401
        except ImportError:
            sys.exit('bench_accuracy: error: --setfit needs SetFit: pip install -e ".[bench]"')
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {args.model}, data {args.data}",
          flush=True)
    results = []
    for size in args.sizes:
        splits = load_splits(args, size)
        print(f"\n{size} training examples; test: {len(splits.test)} examples, fingerprint "
              f"{splits.info['fingerprints']['test']}", flush=True)
        for seed in args.seeds:
            for recipe in recipes_for(args, size, seed):
                result = run_measured(recipe, args, size, seed)
                results.append({"size": size, "seed": seed, "recipe": recipe, **result,
                                "test_fingerprint": splits.info["fingerprints"]["test"]})
                print(f"  seed {seed} {recipe:>12}: accuracy {result['accuracy']:.4f}, F1 {result['f1']:.4f}, "
                      f"{result['seconds']:.0f} s, peak {result['peak_mb']:.0f} MiB", flush=True)
                if args.json:  # after every result: an interrupted run keeps what it measured
                    write_json(args, results)
    print("\n" + "\n".join(summary_rows(results)))
    return 0


def write_json(args, results: list[dict]) -> None:
    import torch

    with open(args.json + ".tmp", "w") as f:
        json.dump({"args": vars(args), "torch": torch.__version__, "cpu_avx512_bf16": cpu_has_avx512_bf16(),
                   "results": results}, f, indent=2)
    os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    sys.exit(main())
