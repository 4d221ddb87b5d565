"""The train configuration's flags (one per TrainConfig field, with help, choices and aliases) and the small
argument parsers the commands share."""

from __future__ import annotations

import argparse
from dataclasses import fields

from .. import methods
from ..config import (BIASES, DEFAULTS, DEVICES, HEAD_INITS, METRICS_FOR_BEST, OBJECTIVES, POOLINGS, PRECISIONS,
                      PROBLEMS, SETTING_NAMES, TRUNCATIONS, VALIDATION_LABELS, TrainConfig)

CHOICES = {"peft": methods.names(), "quantize": methods.QUANTIZE, "init": list(methods.lora.INITS), "bias": BIASES,
           "device": DEVICES, "precision": PRECISIONS, "pooling": POOLINGS, "head_init": HEAD_INITS,
           "objective": OBJECTIVES, "truncation": TRUNCATIONS, "metric_for_best": METRICS_FOR_BEST, "problem": PROBLEMS,
           "validation_labels": VALIDATION_LABELS}
HELP = {
    "model": "packaged alias (all-MiniLM-L6-v2), local model directory or hub id",
    "peft": "what is trained: " + "; ".join(f"{m.name}: {m.help}" for m in methods.REGISTRY.values()),
    "quantize": "how the frozen base is stored: none, nf4 (4-bit NormalFloat, double quantization), int8 "
                "(LLM.int8); adapter methods only",
    "method": "both at once, as before: lora, qlora (= --peft lora --quantize nf4), int8 (= --peft lora --quantize "
              "int8), full, head; or PEFT / PEFT+QUANTIZE (dora+nf4) (default: lora, i.e. --peft lora --quantize "
              "none)",
    "rslora": "LoRA/DoRA: scale by alpha / sqrt(rank) (rsLoRA) instead of alpha / rank",
    "init": "LoRA/DoRA initialisation: default (B = 0), pissa, olora (both rewrite the base weights under the "
            "adapter) or gaussian",
    "loraplus_lr_ratio": "LoRA/DoRA: LoRA+, the B matrices learn at this multiple of --lr, e.g. 16 (peft's "
                         "create_loraplus_optimizer; default: off)",
    "virtual_tokens": "prompt tuning: trained virtual tokens put before each text (default 20)",
    "rank": "LoRA rank r (also LoHa, LoKr and VeRA's rank)",
    "dropout": "LoRA/DoRA dropout on the adapter's input while training",
    "bias": "which biases train: none, lora_only (those of the adapted layers) or all",
    "alpha": "LoRA alpha (default 2 * rank)",
    "attention_dropout": "dropout on attention probabilities while training (default 0: the fused attention "
                         "kernel runs; the model's own is 0.1 for BERT)",
    "pooling": "what the classifier reads: auto (the model's own sentence-transformers pooling, else the "
               "architecture's head), cls or mean (masked mean of the token states; BERT-style models)",
    "head_init": "probe (default: start the classifier from a logistic regression on the frozen pooled "
                 "training features, then fine-tune) or random",
    "objective": "what training minimises: auto (default: contrastive for few-shot runs of at most 256 "
                 "examples, else cross_entropy), cross_entropy (on the classifier's logits) or contrastive "
                 "(SetFit's loss on pairs of texts' pooled embeddings, then the probe head refitted on them)",
    "truncation": "which tokens of a text longer than --max-length are kept: tail (the last; default), head (the "
                  "first) or head_tail (a quarter of them from the start, the rest from the end); recorded in the "
                  "run and reused by evaluate, predict and serve",
    "eval_steps": "evaluate on the validation split every N optimizer steps (default: after every epoch); the "
                  "weights saved are the best evaluation's",
    "early_stopping_patience": "stop after K evaluations in a row without improvement (default: never)",
    "metric_for_best": "what picks the best evaluation: loss (lowest; default for cross-entropy), accuracy "
                       "(highest; default for contrastive) or f1 (highest)",
    "class_weights": "weights of the classes in the training loss: none (default), balanced (n / (classes x "
                     "count) on the training split) or W1,W2,... one per label in class-index order",
    "target_modules": "comma-separated module names, or all-linear (default: the attention query/value)",
    "data": "imdb, rotten_tomatoes (packaged), hub:NAME, or a .csv/.tsv/.json/.jsonl/.parquet file",
    "text_column": "the text column of a file source",
    "label_column": "the label column of a file source (names or class indices)",
    "test_data": "evaluate on another source (default: the held-out test split of --data)",
    "label_names": "comma-separated label names in class-index order (default: the source's own, or its labels "
                   "sorted)",
    "problem": "single_label (one class per text; default) or multi_label (any set of labels per text: a sigmoid "
               "and binary cross-entropy per label, micro/macro F1 and subset accuracy)",
    "label_columns": "multi_label: comma-separated 0/1 columns, one per label (the column names name the labels; "
                     "default: none)",
    "label_delimiter": "multi_label: split --label-column at this string into each text's label names (e.g. ','; "
                       "default: none)",
    "tune_thresholds": "multi_label: per label, use the threshold that maximises F1 on the validation split "
                       "(default: 0.5); recorded in the run and used by evaluate, predict and serve",
    "train_size": "labelled examples to sample (stratified) for training, and for validation too where "
                  "--validation-labels is given (auto: runs of at most 256); 'all' for every one",
    "eval_size": "validation and test examples each; 'all' for every one",
    "validation_labels": "where the validation labels come from: given (a stratified quarter of the --train-size "
                         "labelled examples, at least 2 a label, so a run of N labels sees N), separate (--eval-size "
                         "rows of a validation split beside them) or auto (default: given for single-label runs of "
                         "at most 256 examples, else separate)",
    "unlabeled": "self-training on unlabelled texts: a file of texts (.txt one a line, or .csv/.tsv/.jsonl/.json/"
                 ".parquet with a text column) or packaged (the texts of --data imdb or rotten_tomatoes outside the "
                 "run's splits); the tuned model pseudo-labels them, the most confident alike for each label train "
                 "it further, and the run keeps the better model on validation (default: none)",
    "unlabeled_column": "the text column of an --unlabeled data file (default: --text-column)",
    "unlabeled_size": "the most unlabelled texts read (a seeded sample); 'all' for every one",
    "self_training_rounds": "self-training rounds: each pseudo-labels a fresh share of the unlabelled texts and "
                            "trains one epoch of cross-entropy on the labelled and the selected ones",
    "validation_fraction": "share of the source held out for validation",
    "test_fraction": "share of the source held out for test (when --test-data does not give the test texts)",
    "split_seed": "seed of the train/validation/test split and of the samples drawn from it",
    "max_length": "most tokens of a text the model reads (capped at what the model takes)",
    "seed": "seed of the training: head and adapter initialisation, batch order, dropout",
    "epochs": "passes over the training split (fractions allowed; the few-shot objective may raise it, see "
              "--objective)",
    "max_steps": "stop after this many optimizer steps (overrides epochs; default: none)",
    "batch_size": "training texts per optimizer step (per process)",
    "eval_batch_size": "most texts per evaluation batch (batches are also capped by --chunk-tokens)",
    "weight_decay": "AdamW weight decay (none on biases and norms)",
    "warmup_ratio": "share of the steps with a linear learning-rate warm-up",
    "max_grad_norm": "gradient clipping: largest norm of the gradient",
    "learning_rate": "default: the method's (" + ", ".join(f"{m.name} {m.learning_rate:g}"
                                                             for m in methods.REGISTRY.values()) + ")",
    "group_by_length": "batch texts of similar length together (less padding)",
    "compile": "torch.compile training and its evaluations (CUDA graphs at the fixed padded widths on CUDA, "
               "inductor on CPU); where it cannot run, one line says so and the run goes on eagerly",
    "device": "auto (a GPU when there is one), cpu or cuda",
    "precision": "auto (bf16 autocast on GPUs that support it, else fp32), fp32, bf16 or fp16",
    "chunk_tokens": "most padded tokens through the model at once: larger training batches run in chunks with "
                    "gradient accumulation (default: 2048 on CPU, 1024 for the contrastive objective's training; "
                    "on GPU, as many as a quarter of its memory holds)",
    "num_workers": "data loader worker processes",
    "output_dir": "the folder runs are written to",
    "run_name": "name of the run directory under --output-dir (default: time-method-data)",
    "report_to": "experiment trackers to log to, comma-separated: none (default), tensorboard (event files in the "
                 "run), mlflow (a store under --output-dir unless MLFLOW_TRACKING_URI is set), trackio, wandb, ...",
    "save_every": "write a checkpoint every N optimizer steps into the run in progress (default: only when Ctrl-C "
                  "or SIGTERM stops training), for --resume",
    "allow_unusual_labels": "train even if a label has very few rows (under 1%% and 10 rows, or under 3), a label "
                            "name has no rows, or labels mix numbers and names (one label is always refused)",
}
ALIASES = {"learning_rate": ["--lr"], "label_names": ["--labels"]}


def parse_optional_int(text: str) -> int | None:
    if text.lower() in ("all", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all', got {text!r}") from None


def parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_class_weights(text: str) -> str | list[float]:
    """none, balanced, or comma-separated numbers (checked for range in config.validate)."""
    if text.strip().lower() in ("none", "balanced"):
        return text.strip().lower()
    try:
        return [float(part) for part in parse_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected none, balanced or comma-separated numbers, got {text!r}") from None


def _shown_default(name: str) -> str:
    value = DEFAULTS[name]
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def help_text(name: str) -> str:
    """A flag's help: HELP's text, with the default appended where the text does not give it."""
    text = HELP[name]
    return text if "default" in text else f"{text} (default: {_shown_default(name)})"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field; unset flags keep the config file's or the default value."""
    parsers = {"int": int, "float": float, "str": str, "int | None": parse_optional_int, "float | None": float,
               "str | None": str, "list[str] | None": parse_list, "str | list[float]": parse_class_weights}
    for f in fields(TrainConfig):
        if f.name == "peft":  # the alias beside the two settings it names
            parser.add_argument("--method", choices=methods.method_names(), default=None, help=HELP["method"],
                                metavar="METHOD")
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text(f.name))
            continue
        parser.add_argument(flag, *ALIASES.get(f.name, []), dest=f.name, type=parsers[f.type], default=None,
                            choices=CHOICES.get(f.name), help=help_text(f.name), metavar=f.name.upper())


def cli_overrides(args: argparse.Namespace) -> dict:
    """The TrainConfig settings given as flags (unset flags are None and left out)."""
    return {k: v for k, v in vars(args).items() if k in SETTING_NAMES and v is not None}
