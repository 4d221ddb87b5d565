"""Training configuration: one dataclass, validated, loadable from TOML and overridable from the CLI."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from . import methods
from .errors import ConfigError
from .tracking import check_report_to

BIASES = ("none", "lora_only", "all")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
INFERENCE_PRECISIONS = ("auto", "fp32", "bf16")  # predict and serve: the weights' dtype (forward.inference_dtype)
POOLINGS = ("auto", "cls", "mean")  # what the classifier reads (heads.py)
HEAD_INITS = ("random", "probe")  # how the classifier starts (heads.py)
# what training minimises (objectives.py): auto is contrastive for few-shot runs, else cross-entropy
OBJECTIVES = ("auto", "cross_entropy", "contrastive")
METRICS_FOR_BEST = ("loss", "accuracy", "f1")  # validation loss is lowest-best, the others highest-best
TRUNCATIONS = ("head", "tail", "head_tail")  # which tokens of a longer text are kept (forward.encode_texts)
# single_label: one class per text (softmax, cross-entropy); multi_label: any set of labels per text (one sigmoid
# per label, binary cross-entropy, a threshold per label)
PROBLEMS = ("single_label", "multi_label")
VALIDATION_LABELS = ("auto", "given", "separate")  # where the validation labels come from (data.py)
# --unlabeled packaged: the packaged source's texts outside the run's splits; the packaged sources are
# sources.PACKAGED_SOURCES (not imported here: sources imports datasets, and config must stay light)
PACKAGED_UNLABELED = "packaged"
PACKAGED_DATA = ("imdb", "rotten_tomatoes")
DEFAULT_MODEL = "all-MiniLM-L6-v2"
# A failed run is kept as `<name>.incomplete` (then `.incomplete-2`, ...); a run in progress is a hidden
# `.<name>.<random>.partial`. Run names that look like these are refused, so no run can take another's place.
INCOMPLETE_SUFFIX = ".incomplete"
RESERVED_RUN_NAME = re.compile(r"\.(incomplete(-\d+)?|partial)$")
MAX_SEED = 2**32 - 1  # numpy's seed range (accelerate's set_seed seeds numpy too)


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved as config.json in the run directory."""

    # model and method: what is trained (peft) and how the frozen base is stored (quantize); `method` in a
    # settings mapping is a name for both (qlora = lora on an nf4 base; see methods.split_method)
    model: str = DEFAULT_MODEL
    peft: str = "lora"  # a methods registry name: lora, dora, ia3, full, head
    quantize: str = "none"  # none, nf4 (4-bit NormalFloat), int8 (LLM.int8)
    rank: int = 8
    alpha: int | None = None  # None: 2 * rank
    dropout: float = 0.1
    # Dropout on the attention probabilities while training. 0 lets PyTorch's fused attention kernel run (on CPU
    # it does not take dropout; about 1.9x faster training there); None keeps the model's own (0.1 for BERT).
    attention_dropout: float | None = 0.0
    target_modules: list[str] | None = None  # None: the architecture's query/value projections
    bias: str = "none"
    # head: auto reads the model's own sentence-transformers pooling (mean for all-MiniLM-L6-v2), else [CLS];
    # probe starts the classifier from a logistic regression on the frozen pooled training features
    pooling: str = "auto"
    head_init: str = "probe"
    # auto: contrastive (SetFit's pair loss on the pooled embeddings, then the probe head refitted on them) for
    # few-shot runs (objectives.resolve_objective), else cross_entropy on the classifier's logits
    objective: str = "auto"
    rslora: bool = False  # LoRA: scale by alpha / sqrt(rank) instead of alpha / rank
    init: str = "default"  # LoRA initialisation: default, pissa, olora, gaussian
    loraplus_lr_ratio: float | None = None  # LoRA+: B matrices learn at this multiple of the rate (None: off)
    virtual_tokens: int = 20  # prompt tuning: trained tokens put before each text
    # data
    data: str = "imdb"
    test_data: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    label_names: list[str] | None = None
    # multi_label: the labels as several 0/1 columns (label_columns), or as one column of delimited label names
    # (label_column split at label_delimiter)
    problem: str = "single_label"
    label_columns: list[str] | None = None
    label_delimiter: str | None = None
    # multi_label: per label, the threshold that maximises F1 on the validation split (else 0.5 for every label)
    tune_thresholds: bool = False
    train_size: int | None = 2500
    eval_size: int | None = 500
    # where the validation labels come from (data.hold_out_validation): given carves them out of the train_size
    # labelled examples (a stratified quarter, at least 2 a label), so a run of N labels sees N labels in all;
    # separate takes eval_size rows of a validation split beside them; auto: given for single-label runs of at most
    # objectives.FEW_SHOT_MAX_EXAMPLES (256) examples, else separate
    validation_labels: str = "auto"
    # self-training (self_training.py): unlabelled texts (a file of texts, or "packaged": the packaged source's
    # texts outside the run's splits), pseudo-labelled by the tuned model in self_training_rounds rounds
    unlabeled: str | None = None
    unlabeled_column: str | None = None  # the text column of an unlabelled data file (None: text_column)
    unlabeled_size: int | None = 20000  # the most unlabelled texts read (a seeded sample; None: all)
    self_training_rounds: int = 3
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 42
    max_length: int = 256
    truncation: str = "tail"  # which tokens of a longer text are kept: head, tail or head_tail (forward.encode_texts)
    # optimisation
    seed: int = 42
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    eval_batch_size: int = 64  # most texts per evaluation batch; batches are also capped by chunk_tokens
    learning_rate: float | None = None  # None: the method's default (methods registry)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    # weights of the classes in the training loss (weighted cross-entropy): none, balanced (n / (classes x count),
    # scikit-learn's) or one positive number per label in class-index order
    class_weights: str | list[float] = "none"
    group_by_length: bool = True
    # evaluation on the validation split: every eval_steps optimizer steps (None: after every epoch) and after the
    # last step; the weights saved are those of the best evaluation by metric_for_best; training stops after
    # early_stopping_patience evaluations in a row without improvement (None: never)
    eval_steps: int | None = None
    early_stopping_patience: int | None = None
    metric_for_best: str | None = None  # None: loss for cross-entropy runs, accuracy for contrastive ones
    # train even when the label checks find a label with very few rows, a label name without rows, or numbers
    # mixed with names (see data.check_classes); one class is always refused
    allow_unusual_labels: bool = False
    # hardware
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    # Most padded tokens run through the model at once. Training batches larger than this are split into
    # chunks with gradient accumulation (same gradient); evaluation batches are formed up to it.
    # None: 2048 on CPU (a smaller working set is faster there; 1024 for contrastive training), on GPU see steps.
    chunk_tokens: int | None = None
    num_workers: int = 0
    # output
    output_dir: str = "runs"
    run_name: str | None = None
    # write a checkpoint every save_every optimizer steps into the run in progress (None: only when SIGINT or
    # SIGTERM stops training); `lightune train --resume` continues a run that did not finish from its latest one
    save_every: int | None = None
    # experiment trackers the run logs to through accelerate (tracking.py): tensorboard, mlflow, trackio, ...
    report_to: list[str] | None = None

    @property
    def lora_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.rank

    @property
    def method(self) -> str:
        """One name for peft and quantize: lora, qlora, int8, dora+nf4, full, ..."""
        return methods.method_label(self.peft, self.quantize)

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else methods.get(self.peft).learning_rate

    @property
    def uses_adapter(self) -> bool:
        return methods.get(self.peft).saves == "adapter"

    def to_dict(self) -> dict[str, Any]:
        """The saved configuration: every field, the method name (what older runs have alone; readers take
        peft and quantize from it, see saved_config) and the resolved defaults."""
        out = {"method": self.method, **dataclasses.asdict(self)}
        out["resolved"] = {"lora_alpha": self.lora_alpha, "learning_rate": self.lr}
        return out


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_number(name: str, value: Any, kind: type, low: float | None = None, high: float | None = None,
                  low_inclusive: bool = True) -> None:
    """ConfigError unless value is a finite number (an integer for kind int) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ConfigError(f"{name} must be {'a number' if kind is float else 'an integer'}; got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; got {value!r}")
    if low is not None and (value < low if low_inclusive else value <= low):
        raise ConfigError(f"{name} must be {'>=' if low_inclusive else '>'} {low}; got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{name} must be <= {high}; got {value!r}")


def _check_text(name: str, value: Any, optional: bool = False) -> None:
    """ConfigError unless value is a non-empty string without NUL characters (or None when optional)."""
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{name} must be a non-empty string; got {value!r}")
    if "\0" in value:
        raise ConfigError(f"{name} must not contain a NUL character; got {value!r}")


def _check_run_name(name: str | None) -> None:
    """A plain, visible directory name that cannot be mistaken for a failed or staged run."""
    if name is not None:
        check_directory_name("run_name", name)


def check_directory_name(what: str, name: str) -> None:
    """ConfigError unless name is a plain, visible directory name that cannot be mistaken for a failed or staged
    run (what: the setting's name in the message)."""
    _check_text(what, name)
    separators = {"/", "\\"} & set(name)
    if name.startswith(".") or separators or name != name.strip() or len(name.encode()) > 255 or any(
            not ch.isprintable() for ch in name):
        raise ConfigError(f"{what} must be a plain directory name (no path separators, control characters, "
                          f"leading dot or surrounding spaces); got {name!r}")
    if RESERVED_RUN_NAME.search(name):
        raise ConfigError(f"{what} must not end in {INCOMPLETE_SUFFIX} or .partial (reserved for failed and "
                          f"unfinished runs); got {name!r}")


def is_run_directory(path: Path) -> bool:
    """True for a lightune run: finished (config.json and metrics.json), failed (<name>.incomplete) or staged."""
    if path.name.startswith(".") and path.name.endswith(".partial"):
        return True
    if RESERVED_RUN_NAME.search(path.name) and (path / "error.txt").is_file():
        return True
    return (path / "config.json").is_file() and (path / "metrics.json").is_file()


def _check_output_dir(output_dir: str) -> None:
    """ConfigError if output_dir or a folder above it is a file, if it lies inside a run directory, or if no
    directory can be made in the deepest of them that exists (found by making one and removing it: os.access says
    yes to root everywhere, /proc included), before anything loads."""
    path, deepest = Path(output_dir).absolute(), None
    for folder in (path, *path.parents):
        try:
            if not folder.exists():
                continue
        except OSError:  # unreadable: staging the run will say so
            continue
        if not folder.is_dir():
            raise ConfigError(f"output_dir {output_dir}: {folder} is not a directory")
        if is_run_directory(folder):
            raise ConfigError(f"output_dir {output_dir} is inside the run directory {folder}; "
                              "runs are never written into another run")
        deepest = deepest or folder
    try:
        if deepest is not None:
            os.rmdir(tempfile.mkdtemp(prefix=".lightune-write-check-", dir=deepest))
    except OSError as exc:
        raise ConfigError(f"output_dir {output_dir}: cannot create a directory in {deepest} ({exc.strerror})") from None


def _check_method(cfg: TrainConfig) -> None:
    """peft, quantize and the LoRA options: each known, and a combination the method can run."""
    _check_choice("peft", cfg.peft, tuple(methods.names()))
    _check_choice("quantize", cfg.quantize, methods.QUANTIZE)
    _check_choice("init", cfg.init, tuple(methods.lora.INITS))
    if not isinstance(cfg.rslora, bool):
        raise ConfigError(f"rslora must be true or false; got {cfg.rslora!r}")
    method = methods.get(cfg.peft)
    if cfg.quantize not in method.quantize:
        if method.saves == "model":
            raise ConfigError(f"quantize {cfg.quantize!r} needs an adapter method: peft {cfg.peft!r} trains the "
                              f"model's own weights, which cannot be quantized; use quantize 'none'")
        why = f" ({method.quantize_note})" if method.quantize_note else ""
        raise ConfigError(f"peft {cfg.peft!r} cannot sit on a {cfg.quantize} base{why}; use quantize "
                          f"{' or '.join(repr(q) for q in method.quantize)}")
    for option in sorted(methods.option_names() - set(method.options)):
        if getattr(cfg, option) != DEFAULTS[option]:
            raise ConfigError(f"{option} is an option of {', '.join(methods.takers(option))}; peft {cfg.peft!r} "
                              f"does not use it")
    if method.check is not None:
        method.check(cfg)


def validate(cfg: TrainConfig) -> TrainConfig:
    """Raise ConfigError with a readable message on the first bad value; return cfg unchanged.

    Every number is checked here to be finite and in range, every text to be usable, before anything loads.
    """
    _check_method(cfg)
    check_report_to(cfg.report_to)
    _check_choice("bias", cfg.bias, BIASES)
    _check_choice("device", cfg.device, DEVICES)
    _check_choice("precision", cfg.precision, PRECISIONS)
    _check_choice("pooling", cfg.pooling, POOLINGS)
    _check_choice("head_init", cfg.head_init, HEAD_INITS)
    _check_choice("objective", cfg.objective, OBJECTIVES)
    _check_choice("truncation", cfg.truncation, TRUNCATIONS)
    if cfg.metric_for_best is not None:
        _check_choice("metric_for_best", cfg.metric_for_best, METRICS_FOR_BEST)
    _check_problem(cfg)
    _check_self_training(cfg)
    for name in ("model", "data", "text_column", "label_column", "output_dir"):
        _check_text(name, getattr(cfg, name))
    _check_text("test_data", cfg.test_data, optional=True)
    for name in ("group_by_length", "compile", "allow_unusual_labels", "tune_thresholds"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name} must be true or false; got {getattr(cfg, name)!r}")
    _check_number("rank", cfg.rank, int, 1, 4096)
    if cfg.alpha is not None:
        _check_number("alpha", cfg.alpha, float, 0, low_inclusive=False)
    for name in ("dropout", "attention_dropout"):
        value = getattr(cfg, name)
        if name == "attention_dropout" and value is None:  # the model's own
            continue
        _check_number(name, value, float, 0, 1)
        if value >= 1:
            raise ConfigError(f"{name} must be < 1; got {value!r}")
    for name in ("train_size", "eval_size", "max_steps", "eval_steps", "early_stopping_patience", "save_every"):
        if getattr(cfg, name) is not None:
            _check_number(name, getattr(cfg, name), int, 1)
    _check_number("validation_fraction", cfg.validation_fraction, float, 0, 0.5, low_inclusive=False)
    _check_number("test_fraction", cfg.test_fraction, float, 0, 0.5, low_inclusive=False)
    _check_number("split_seed", cfg.split_seed, int, 0, MAX_SEED)
    _check_number("seed", cfg.seed, int, 0, MAX_SEED)
    _check_number("max_length", cfg.max_length, int, 8, 8192)
    _check_number("epochs", cfg.epochs, float, 0, 10_000, low_inclusive=False)
    _check_number("batch_size", cfg.batch_size, int, 1)
    _check_number("eval_batch_size", cfg.eval_batch_size, int, 1)
    if cfg.learning_rate is not None:
        _check_number("learning_rate", cfg.learning_rate, float, 0, 1, low_inclusive=False)
    _check_number("weight_decay", cfg.weight_decay, float, 0)
    _check_number("warmup_ratio", cfg.warmup_ratio, float, 0, 1)
    _check_number("max_grad_norm", cfg.max_grad_norm, float, 0)
    _check_number("num_workers", cfg.num_workers, int, 0, 64)
    if cfg.chunk_tokens is not None:
        _check_number("chunk_tokens", cfg.chunk_tokens, int, 1)
    if cfg.target_modules is not None and (
        not cfg.target_modules or not all(isinstance(m, str) and m for m in cfg.target_modules)
    ):
        raise ConfigError(f"target_modules must be a non-empty list of module names; got {cfg.target_modules!r}")
    if cfg.label_names is not None and (
        not isinstance(cfg.label_names, (list, tuple)) or len(cfg.label_names) < 2
        or not all(isinstance(n, str) and n.strip() for n in cfg.label_names)
        or len(set(cfg.label_names)) != len(cfg.label_names)
    ):
        raise ConfigError(f"label_names must list at least two distinct names; got {cfg.label_names!r}")
    _check_class_weights(cfg.class_weights)
    if cfg.label_names is not None:
        check_class_weight_count(cfg.class_weights, cfg.label_names)
    _check_run_name(cfg.run_name)
    _check_output_dir(cfg.output_dir)
    return cfg


def _check_problem(cfg: TrainConfig) -> None:
    """The multi-label settings: given together with problem multi_label, and only with it."""
    _check_choice("problem", cfg.problem, PROBLEMS)
    columns, delimiter = cfg.label_columns, cfg.label_delimiter
    if columns is not None and (not isinstance(columns, (list, tuple)) or len(columns) < 2 or len(set(columns)) != len(
            columns) or not all(isinstance(c, str) and c.strip() for c in columns)):
        raise ConfigError(f"label_columns must list at least two distinct column names; got {columns!r}")
    if delimiter is not None and (not isinstance(delimiter, str) or not delimiter or "\0" in delimiter):
        raise ConfigError(f"label_delimiter must be a non-empty string such as ','; got {delimiter!r}")
    if cfg.problem == "single_label":
        given = [f"--{name.replace('_', '-')}" for name in ("label_columns", "label_delimiter", "tune_thresholds")
                 if getattr(cfg, name) not in (None, False)]
        if given:
            raise ConfigError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for multi-label data; "
                              "add --problem multi_label")
        return
    if columns is None and delimiter is None:
        raise ConfigError("multi-label data needs its labels: --label-columns A,B,C (one 0/1 column per label) or "
                          "--label-column COLUMN --label-delimiter ',' (one column of delimited label names)")
    if columns is not None and delimiter is not None:
        raise ConfigError("give --label-columns (0/1 columns) or --label-delimiter (one delimited column), not both")
    if columns is not None and cfg.label_names is not None and len(cfg.label_names) != len(columns):
        raise ConfigError(f"label_names gives {len(cfg.label_names)} name(s) for {len(columns)} label columns; give "
                          "one per column, in the same order")
    # a weighted multi-label loss needs a positive weight per label (BCE pos_weight), not class weights
    if cfg.class_weights != "none":
        raise ConfigError("class_weights is for single-label data; multi-label training uses the unweighted "
                          "binary cross-entropy (use --class-weights none)")


def _check_self_training(cfg: TrainConfig) -> None:
    """Where the validation labels come from, and the self-training settings: given with --unlabeled, and only
    with it; single-label data; `packaged` for the packaged sources only."""
    _check_choice("validation_labels", cfg.validation_labels, VALIDATION_LABELS)
    _check_text("unlabeled", cfg.unlabeled, optional=True)
    _check_text("unlabeled_column", cfg.unlabeled_column, optional=True)
    if cfg.unlabeled_size is not None:
        _check_number("unlabeled_size", cfg.unlabeled_size, int, 1)
    _check_number("self_training_rounds", cfg.self_training_rounds, int, 1, 20)
    if cfg.unlabeled is None:
        given = [f"--{name.replace('_', '-')}" for name in ("unlabeled_column", "unlabeled_size",
                                                            "self_training_rounds")
                 if getattr(cfg, name) != DEFAULTS[name]]
        if given:
            raise ConfigError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for self-training; add "
                              "--unlabeled SOURCE (a file of texts, or packaged)")
        return
    if cfg.problem != "single_label":
        raise ConfigError("--unlabeled (self-training on pseudo-labels) is for single-label data; multi-label runs "
                          "cannot use it")
    if cfg.unlabeled == PACKAGED_UNLABELED and cfg.data not in PACKAGED_DATA:
        raise ConfigError(f"--unlabeled packaged takes the texts of --data {' or '.join(PACKAGED_DATA)} outside the "
                          f"run's splits; with --data {cfg.data} give a file of texts (.txt one a line, or .csv, "
                          ".tsv, .jsonl, .json, .parquet with a text column)")


CLASS_WEIGHTS = ("none", "balanced")


def _check_class_weights(weights: Any) -> None:
    """ConfigError unless weights is none, balanced or a list of finite positive numbers."""
    if isinstance(weights, str):
        _check_choice("class_weights", weights, CLASS_WEIGHTS)
        return
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ConfigError(f"class_weights must be none, balanced or one number per label; got {weights!r}")
    for weight in weights:
        _check_number("class_weights", weight, float, 0, low_inclusive=False)


def check_class_weight_count(weights: Any, label_names: list[str]) -> None:
    """ConfigError when a list of class weights does not give one weight per label."""
    if not isinstance(weights, str) and len(weights) != len(label_names):
        raise ConfigError(f"class_weights gives {len(weights)} weight(s) for {len(label_names)} labels "
                          f"({', '.join(label_names)}); give one per label in this order")


FIELD_NAMES = {f.name for f in fields(TrainConfig)}
DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}
SETTING_NAMES = FIELD_NAMES | {"method"}  # what a settings mapping may hold: the fields and the method alias


def expand_method(values: dict[str, Any]) -> dict[str, Any]:
    """The settings with a `method` name replaced by the peft and quantize it stands for (qlora: lora, nf4);
    ConfigError if the same mapping gives a peft or quantize that contradicts it."""
    if "method" not in values:
        return dict(values)
    out = dict(values)
    name = out.pop("method")
    peft, quantize = methods.split_method(name)
    for key, value in (("peft", peft), ("quantize", quantize)):
        if key in out and out[key] != value:
            raise ConfigError(f"method {name!r} means peft {peft!r} with quantize {quantize!r}, but {key} "
                              f"{out[key]!r} is given with it; give one or the other")
        out[key] = value
    return out


def from_dict(values: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Build a validated config from a flat mapping (TOML table or CLI overrides) laid over base."""
    unknown = sorted(set(values) - SETTING_NAMES)
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    cfg = dataclasses.replace(base or TrainConfig(), **expand_method(values))
    return validate(cfg)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file into a dict; ConfigError if it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot parse config file {path}: {exc}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load a TOML file (its top level or its [train] table), then apply overrides; validated."""
    values: dict[str, Any] = {}
    if path is not None:
        raw = read_toml(path)
        values.update(expand_method(raw.get("train", raw)))
    values.update(expand_method(overrides or {}))  # a flag overrides the file, also across method/peft/quantize
    return from_dict(values)
