"""Command line: `lightune train`, `predict`, `compare`, `serve`; user errors end in one line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from . import methods
from .config import BIASES, DEVICES, PRECISIONS, SETTING_NAMES, TrainConfig, load_config
from .errors import ConfigError, DataError, LightuneError
from .logs import quiet_libraries as _quiet_libraries, silence_library_output as _silence_library_output

CHOICES = {"peft": methods.names(), "quantize": methods.QUANTIZE, "init": list(methods.lora.INITS), "bias": BIASES,
           "device": DEVICES, "precision": PRECISIONS}
HELP = {
    "model": "packaged alias (all-MiniLM-L6-v2), local model directory or hub id",
    "peft": "what is trained: " + "; ".join(f"{m.name}: {m.help}" for m in methods.REGISTRY.values()),
    "quantize": "how the frozen base is stored: none, nf4 (4-bit NormalFloat, double quantization), int8 "
                "(LLM.int8); adapter methods only",
    "method": "both at once, as before: lora, qlora (= --peft lora --quantize nf4), int8 (= --peft lora --quantize "
              "int8), full, head; or PEFT / PEFT+QUANTIZE (dora+nf4)",
    "rslora": "LoRA/DoRA: scale by alpha / sqrt(rank) (rsLoRA) instead of alpha / rank",
    "init": "LoRA/DoRA initialisation: default (B = 0), pissa, olora (both rewrite the base weights under the "
            "adapter) or gaussian",
    "rank": "LoRA rank r",
    "alpha": "LoRA alpha (default 2 * rank)",
    "attention_dropout": "dropout on attention probabilities while training (default 0: the fused attention "
                         "kernel runs; the model's own is 0.1 for BERT)",
    "target_modules": "comma-separated module names, or all-linear (default: the attention query/value)",
    "data": "imdb, rotten_tomatoes (packaged), hub:NAME, or a .csv/.tsv/.jsonl/.parquet file",
    "test_data": "evaluate on another source (default: the held-out test split of --data)",
    "label_names": "comma-separated label names in class-index order",
    "train_size": "train examples to sample (stratified); 'all' for every one",
    "eval_size": "validation and test examples each; 'all' for every one",
    "max_steps": "stop after this many optimizer steps (overrides epochs)",
    "learning_rate": "default: the method's (" + ", ".join(f"{m.name} {m.learning_rate:g}"
                                                             for m in methods.REGISTRY.values()) + ")",
    "group_by_length": "batch texts of similar length together (less padding)",
    "compile": "torch.compile the model",
    "run_name": "name of the run directory under --output-dir (default: time-method-data)",
}
ALIASES = {"learning_rate": ["--lr"], "label_names": ["--labels"]}


def _parse_optional_int(text: str) -> int | None:
    if text.lower() in ("all", "none"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'all', got {text!r}") from None


def _parse_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field; unset flags keep the config file's or the default value."""
    parsers = {"int": int, "float": float, "str": str, "int | None": _parse_optional_int, "float | None": float,
               "str | None": str, "list[str] | None": _parse_list}
    for f in fields(TrainConfig):
        if f.name == "peft":  # the alias beside the two settings it names
            parser.add_argument("--method", choices=methods.method_names(), default=None, help=HELP["method"],
                                metavar="METHOD")
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=HELP.get(f.name))
            continue
        parser.add_argument(flag, *ALIASES.get(f.name, []), dest=f.name, type=parsers[f.type], default=None,
                            choices=CHOICES.get(f.name), help=HELP.get(f.name), metavar=f.name.upper())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightune", description="LoRA / QLoRA fine-tuning of text classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a model and save a run directory",
                           description="Fine-tune; with no arguments: LoRA on the packaged all-MiniLM-L6-v2 "
                                       "with packaged IMDb reviews.")
    train.add_argument("--config", help="TOML file with the settings (top level or a [train] table)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_arguments(train)
    predict = sub.add_parser("predict", help="classify texts with a finished run")
    predict.add_argument("run_dir", help="a run directory written by `lightune train`")
    predict.add_argument("texts", nargs="*", help="texts to classify (default: read standard input)")
    predict.add_argument("--file", help="read texts from a file: one per line, or .jsonl with a 'text' field")
    predict.add_argument("--interactive", "-i", action="store_true", help="type texts one at a time")
    predict.add_argument("--json", action="store_true", help="print one JSON object per text")
    predict.add_argument("--device", choices=DEVICES, default="auto")
    compare = sub.add_parser("compare", help="train a grid of configurations and compare them",
                             description="Train every cell of a grid (same data, split and steps), skipping cells "
                                         "finished earlier, then write results.csv, results.md, plots and "
                                         "report.html.")
    compare.add_argument("config", help="comparison file (TOML, or YAML) with [base], [grid] and optional [compare]")
    compare.add_argument("--output-dir", help="write to OUTPUT_DIR/<name>/ (default: [compare] output_dir or runs)")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")
    compare.add_argument("--in-process", action="store_true",
                         help="train the cells in this process instead of a fresh process each (faster start; "
                              "peak memory on CPU then accumulates across cells)")
    serve = sub.add_parser("serve", help="serve runs over HTTP: JSON API and a web page, many adapters on one base",
                           description="Serve one or more finished LoRA runs of the same base model: one base "
                                       "model in memory, one adapter per run, chosen per request.")
    serve.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                       help="finished adapter run directories (lora, qlora, dora, ia3, ...; one peft kind)")
    serve.add_argument("--name", action="append", dest="names", metavar="NAME",
                       help="adapter name, once per RUN_DIR in order (default: each run directory's name)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--device", choices=DEVICES, default="auto")
    serve.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    serve.add_argument("--max-texts", type=int, default=64, help="most texts per request (default 64)")
    serve.add_argument("--max-chars", type=int, default=5000, help="most characters per text (default 5000)")
    serve.add_argument("--max-body-bytes", type=int, default=1_000_000,
                       help="largest request body in bytes (default 1000000)")
    return parser


def _cli_overrides(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k in SETTING_NAMES and v is not None}


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, _cli_overrides(args))  # bad values fail here, before the heavy imports
    _silence_library_output()
    from .training import run_training

    result = run_training(cfg, progress=not args.quiet)
    test, base = result.metrics["test"], result.metrics["base"]
    print(f"test accuracy {test['accuracy']:.4f} (base {base['accuracy']:.4f}), F1 {test['f1']:.4f}; "
          f"report: {result.run_dir / 'report.md'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare_plan import load_plan

    plan = load_plan(args.config, output_dir=args.output_dir)  # a bad file fails here, before torch loads
    from .compare import run_compare, summary_text

    print(f"comparing {len(plan.cells)} cells in {plan.root}", file=sys.stderr)
    try:
        result = run_compare(plan, progress=not args.quiet, isolate=False if args.in_process else None)
    except KeyboardInterrupt:
        print(f"lightune: comparison interrupted; finished cells are kept in {plan.runs_dir}, run the same command "
              f"again to resume", file=sys.stderr)
        raise
    print(summary_text(result))
    print(f"{len(plan.cells)} cells ({result.failed} failed) in {result.seconds:.0f} s; "
          f"report: {result.files['report.html']}")
    return 1 if result.failed else 0


def read_texts_file(path: str) -> list[str]:
    """Texts from a file: JSONL objects with a 'text' field, or plain text one per line (blank lines skipped)."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"file not found: {path}")
    lines = [line for line in file.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    if file.suffix.lower() != ".jsonl":
        return lines
    texts = []
    for n, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}: line {n} is not valid JSON") from None
        if not isinstance(obj, dict) or "text" not in obj:
            raise DataError(f"{path}: line {n} has no 'text' field")
        texts.append(obj["text"])
    return texts


def _print_predictions(predictions: list[dict], as_json: bool) -> None:
    for p in predictions:
        if as_json:
            print(json.dumps(p, ensure_ascii=False))
        else:
            prob = p["probabilities"][p["label"]]
            preview = p["text"] if len(p["text"]) <= 70 else p["text"][:67] + "..."
            print(f"{p['label']}\t{prob:.3f}\t{preview}")


def cmd_predict(args: argparse.Namespace) -> int:
    from .inference import Classifier

    classifier = Classifier(args.run_dir, device=args.device)
    if args.interactive:
        print(f"labels: {', '.join(classifier.label_names)}. Type a text and press Enter; an empty line quits.",
              file=sys.stderr)
        for line in iter(lambda: input("> "), ""):
            _print_predictions(classifier.predict([line]), args.json)
        return 0
    if args.file:
        texts = read_texts_file(args.file)
    elif args.texts:
        texts = args.texts
    elif not sys.stdin.isatty():
        texts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    else:
        raise ConfigError("give texts as arguments, --file, standard input, or --interactive")
    if not texts:
        raise DataError("no texts to classify")
    _print_predictions(classifier.predict(texts), args.json)
    return 0


def build_registry(run_dirs: list[str], names: list[str] | None, device: str = "auto", batch_size: int = 32):
    """An AdapterRegistry with one adapter per run directory; ConfigError/ModelError for bad arguments."""
    from .serving import AdapterRegistry, adapter_name_for

    if names and len(names) != len(run_dirs):
        raise ConfigError(f"--name was given {len(names)} time(s) for {len(run_dirs)} run directories; "
                          "give one name per run directory or none")
    names = names or [adapter_name_for(d) for d in run_dirs]
    if len(set(names)) != len(names):
        raise ConfigError(f"adapter names must be unique, got {', '.join(names)}; use --name")
    registry = AdapterRegistry(device=device, batch_size=batch_size)
    for name, run_dir in zip(names, run_dirs):
        registry.add(name, run_dir)
    return registry


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .serving import Limits, create_app

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, got {args.port}")
    for flag in ("batch_size", "max_texts", "max_chars", "max_body_bytes"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    registry = build_registry(args.run_dirs, args.names, args.device, args.batch_size)
    app = create_app(registry, Limits(args.max_texts, args.max_chars, args.max_body_bytes))
    print(f"serving {', '.join(registry.names())} on {registry.base_model} ({registry.device}) at "
          f"http://{args.host}:{args.port}/  (API docs: /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        if args.command != "train":
            _silence_library_output()
        commands = {"train": cmd_train, "predict": cmd_predict, "compare": cmd_compare, "serve": cmd_serve}
        return commands[args.command](args)
    except LightuneError as exc:
        print(f"lightune: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, EOFError):
        print("lightune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: still one line, with a way to get the traceback
        if os.environ.get("LIGHTUNE_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"lightune: error: {type(exc).__name__}: {first} (set LIGHTUNE_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
