"""Command line: `lightune train`, `evaluate`, `predict`, `compare`, `serve`; user errors end in one line and a non-zero exit."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import re
import signal
import socket
import sys
from pathlib import Path

from .commands.options import HELP, add_config_arguments, cli_overrides, parse_list, parse_optional_int
from .config import DEVICES, TRUNCATIONS, load_config
from .errors import ConfigError, DataError, LightuneError, ModelError
from .logs import quiet_libraries as _quiet_libraries, silence_library_output as _silence_library_output

def _parse_size(text: str) -> int | str:
    """An integer, or 'all'."""
    return "all" if text.lower() == "all" else parse_optional_int(text)


def _add_evaluate_parser(sub) -> None:
    evaluate = sub.add_parser(
        "evaluate", help="score a finished run on a data source",
        description="Score a finished run (any method) on a data source, its labels matched to the run's by name; "
                    "writes metrics.json, confusion_matrix.png (single-label runs) and report.md to "
                    "evaluations/<name>/ beside the run and prints the table. Data settings not given are the run's "
                    "own (column names and --labels only when the source is the run's own data).")
    evaluate.add_argument("run_dir", help="a run directory written by `lightune train`")
    evaluate.add_argument("--data", help="source to evaluate on (default: the run's own); " + HELP["data"])
    evaluate.add_argument("--split", choices=("test", "all"), default="test",
                          help="test: the source's test split, carved as training carves it (default); all: "
                               "every distinct row")
    evaluate.add_argument("--text-column", help="text column of a file source")
    evaluate.add_argument("--label-column", help="label column of a file source")
    evaluate.add_argument("--label-columns", type=parse_list, metavar="LABEL_COLUMNS",
                          help="multi-label run: the source's 0/1 label columns (default: the run's own)")
    evaluate.add_argument("--label-delimiter", help="multi-label run: the delimiter of --label-column (default: the "
                                                    "run's own)")
    evaluate.add_argument("--labels", dest="label_names", type=parse_list, metavar="LABEL_NAMES",
                          help="the source's label names in class-index order (names integer labels)")
    evaluate.add_argument("--eval-size", type=_parse_size, metavar="EVAL_SIZE",
                          help="texts to sample (stratified); 'all' for every one (default: the run's eval_size "
                               "with --split test, all with --split all)")
    evaluate.add_argument("--split-seed", type=int)
    evaluate.add_argument("--validation-fraction", type=float)
    evaluate.add_argument("--test-fraction", type=float)
    evaluate.add_argument("--output-dir", help="write to OUTPUT_DIR/<name>/ (default: evaluations/ beside the run)")
    evaluate.add_argument("--name", help="the evaluation's directory name (default: <run>-on-<source>-<split>)")
    evaluate.add_argument("--device", choices=DEVICES, default="auto")
    evaluate.add_argument("--truncation", choices=TRUNCATIONS, help="override the run's truncation (see train)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightune", description="LoRA / QLoRA fine-tuning of text classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a model and save a run directory",
                           description="Fine-tune; with no arguments: LoRA on the packaged all-MiniLM-L6-v2 "
                                       "with packaged IMDb reviews.")
    train.add_argument("--config", help="TOML file with the settings (top level or a [train] table)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue a run that did not finish (RUN.incomplete, or the hidden .RUN.*.partial of a "
                            "killed process) from its latest checkpoint, with its own settings; the finished run "
                            "takes its normal name and RUN_DIR is removed once it is complete")
    add_config_arguments(train)
    predict = sub.add_parser("predict", help="classify texts with a finished run")
    predict.add_argument("run_dir", help="a run directory written by `lightune train`")
    predict.add_argument("texts", nargs="*", help="texts to classify (default: read standard input)")
    predict.add_argument("--file", help="read texts from a file: one per line, or .jsonl with a 'text' field")
    predict.add_argument("--interactive", "-i", action="store_true", help="type texts one at a time")
    predict.add_argument("--json", action="store_true", help="print one JSON object per text")
    predict.add_argument("--device", choices=DEVICES, default="auto")
    predict.add_argument("--truncation", choices=TRUNCATIONS, help="override the run's truncation (see train)")
    _add_evaluate_parser(sub)
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
                           description="Serve one or more finished adapter runs (LoRA, DoRA, IA3, ...) of the same "
                                       "base model: one base model in memory, one adapter per run, chosen per "
                                       "request; concurrent requests share forward passes. SIGTERM or Ctrl-C "
                                       "answers the requests in flight, then exits.")
    serve.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                       help="finished adapter run directories (lora, qlora, dora, ia3, ...; one peft kind)")
    serve.add_argument("--name", action="append", dest="names", metavar="NAME",
                       help="adapter name, once per RUN_DIR in order (default: each run directory's name)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--allowed-hosts", type=parse_list, default=[], metavar="HOSTS",
                       help="comma-separated Host header values to answer besides localhost, 127.0.0.1 and [::1] "
                            "(each with any port), e.g. lightune.example.com,*.corp.example; on a non-loopback "
                            "--host: the only ones answered (default: any)")
    serve.add_argument("--device", choices=DEVICES, default="auto")
    serve.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default 32)")
    serve.add_argument("--batching", choices=("on", "off"), default="on",
                       help="on: concurrent requests share forward passes, rows of several LoRA adapters in one "
                            "pass; off: one request at a time, switching adapters per request (default on)")
    serve.add_argument("--batch-wait-ms", type=float, default=2.0,
                       help="with batching: how long a pass waits for more requests once one arrives (default 2)")
    serve.add_argument("--max-texts", type=int, default=64, help="most texts per request (default 64)")
    serve.add_argument("--max-chars", type=int, default=5000, help="most characters per text (default 5000)")
    serve.add_argument("--max-body-bytes", type=int, default=1_000_000,
                       help="largest request body in bytes (default 1000000)")
    serve.add_argument("--max-queue", type=int, default=32,
                       help="most prediction requests admitted at once, running or waiting; one more gets 503 "
                            "with Retry-After (default 32)")
    serve.add_argument("--max-adapters", type=int, default=16,
                       help="most adapters loaded at once, those given here included (default 16)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer API_KEY' on every endpoint but / and "
                                         "/health (default: $LIGHTUNE_API_KEY; prefer it, the process list shows "
                                         "arguments to every user)")
    serve.add_argument("--allow-adapter-loading", metavar="ROOT",
                       help="let clients load (POST /adapters) and unload (DELETE) adapters, from runs inside ROOT "
                            "only (default: off)")
    return parser


class Terminated(BaseException):
    """SIGTERM during training, raised like Ctrl-C's KeyboardInterrupt so the run is kept as <name>.incomplete."""


@contextlib.contextmanager
def _sigterm_raises_terminated():
    """While the block runs in the main thread, SIGTERM raises Terminated; the previous handler is restored after."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt saving error.txt
        raise Terminated("terminated by SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals stay as they are
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        from .checkpoints import resume_config

        cfg = resume_config(args.resume, args.config, cli_overrides(args))
    else:
        cfg = load_config(args.config, cli_overrides(args))  # bad values fail here, before the heavy imports
    _silence_library_output()
    from .training import run_training

    try:
        with _sigterm_raises_terminated():
            result = run_training(cfg, progress=not args.quiet, resume=Path(args.resume) if args.resume else None)
    except Terminated as exc:
        _report_failure("terminated (SIGTERM)", exc)
        return 128 + signal.SIGTERM
    test, base = result.metrics["test"], result.metrics["base"]
    accuracy = "subset accuracy" if "subset_accuracy" in test else "accuracy"  # multi-label: every label right
    print(f"test {accuracy} {test['accuracy']:.4f} (base {base['accuracy']:.4f}), F1 {test['f1']:.4f}; "
          f"report: {result.run_dir / 'report.md'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate_run import EvaluationOptions, run_evaluation
    from .reporting import evaluation_table

    size = args.eval_size
    options = EvaluationOptions(
        run_dir=args.run_dir, data=args.data, split=args.split, text_column=args.text_column,
        label_column=args.label_column, label_names=args.label_names, label_columns=args.label_columns,
        label_delimiter=args.label_delimiter, eval_size=None if size == "all" else size,
        all_rows=size == "all", validation_fraction=args.validation_fraction, test_fraction=args.test_fraction,
        split_seed=args.split_seed, output_dir=args.output_dir, name=args.name, device=args.device,
        truncation=args.truncation)
    evaluation = run_evaluation(options)
    result = evaluation.result
    print(f"{result['run_name']} on {printable(result['data']['source'])}, {args.split} split")
    print("\n".join(evaluation_table(result)))
    print(f"report: {evaluation.out_dir / 'report.md'}")
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
    """Texts from a UTF-8 file: JSONL objects with a 'text' field, or plain text one per line (blank lines skipped)."""
    from .data import decode_text

    file = Path(path)
    if not file.is_file():
        raise DataError(f"file not found: {path}")
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    lines = _text_lines(decode_text(raw, path))
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


def _text_lines(text: str) -> list[str]:
    """Non-blank lines split at line feeds only (str.splitlines would also split at \\x0b, \\x85, \\u2028...)."""
    return [line.removesuffix("\r") for line in text.split("\n") if line.strip()]


# Characters that move the cursor, retitle or clear a terminal, or reorder the text shown (bidi controls).
_TERMINAL_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """text with terminal control characters written as escapes (\\x1b, \\t, \\u202e), safe to print raw."""
    return _TERMINAL_CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def _json_line(obj) -> str:
    """One JSON line; control characters that json.dumps leaves raw (DEL, C1, bidi) written as \\u escapes."""
    return _TERMINAL_CONTROLS.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(obj, ensure_ascii=False,
                                                                                   allow_nan=False))


def _print_predictions(predictions: list[dict], as_json: bool) -> None:
    if any(not math.isfinite(v) for p in predictions for v in p["probabilities"].values()):
        raise ModelError("the run's model gives NaN probabilities: its weights are broken; train it again")
    for p in predictions:
        if as_json:
            print(_json_line(p))
        else:
            preview = p["text"] if len(p["text"]) <= 70 else p["text"][:67] + "..."
            if "labels" in p:  # multi-label: the label set, each with its probability
                chosen = ", ".join(f"{printable(name)} {p['probabilities'][name]:.3f}" for name in p["labels"])
                print(f"{chosen or '(no label)'}\t{printable(preview)}")
                continue
            prob = p["probabilities"][p["label"]]
            print(f"{printable(p['label'])}\t{prob:.3f}\t{printable(preview)}")


def _check_unicode(texts: list[str], where: str) -> list[str]:
    """DataError for a text holding undecodable bytes (Python keeps them as lone surrogates in arguments)."""
    for i, text in enumerate(texts, 1):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(f"{where} {i} is not UTF-8 text (undecodable byte at character {exc.start + 1})") from None
    return texts


def _texts_to_classify(args: argparse.Namespace) -> list[str]:
    """The texts from --file, the arguments or standard input; DataError naming the place of bad input."""
    if args.file:
        texts = read_texts_file(args.file)
    elif args.texts:
        texts = _check_unicode(args.texts, "argument")
    elif not sys.stdin.isatty():
        from .data import decode_text

        texts = _text_lines(decode_text(sys.stdin.buffer.read(), "standard input"))
    else:
        raise ConfigError("give texts as arguments, --file, standard input, or --interactive")
    if not texts:
        raise DataError("no texts to classify")
    return texts


def cmd_predict(args: argparse.Namespace) -> int:
    from .inference import Classifier

    texts = None if args.interactive else _texts_to_classify(args)  # bad input fails before the model loads
    classifier = Classifier(args.run_dir, device=args.device, truncation=args.truncation)
    if args.interactive:
        print(f"labels: {printable(', '.join(classifier.label_names))}. Type a text and press Enter; an empty line "
              "quits.", file=sys.stderr)
        try:
            for line in iter(lambda: input("> "), ""):
                _print_predictions(classifier.predict(_check_unicode([line], "input line")), args.json)
        except UnicodeDecodeError as exc:
            raise DataError(f"standard input is not UTF-8 text: byte 0x{exc.object[exc.start]:02x}") from None
        return 0
    _print_predictions(classifier.predict(texts), args.json)
    return 0


def build_registry(run_dirs: list[str], names: list[str] | None, device: str = "auto", batch_size: int = 32,
                   max_adapters: int = 16):
    """An AdapterRegistry with one adapter per run directory; ConfigError/ModelError for bad arguments."""
    from .serving import AdapterRegistry, adapter_name_for

    if names and len(names) != len(run_dirs):
        raise ConfigError(f"--name was given {len(names)} time(s) for {len(run_dirs)} run directories; "
                          "give one name per run directory or none")
    names = names or [adapter_name_for(d) for d in run_dirs]
    if len(set(names)) != len(names):
        raise ConfigError(f"adapter names must be unique, got {', '.join(names)}; use --name")
    if len(run_dirs) > max_adapters:
        raise ConfigError(f"{len(run_dirs)} run directories but --max-adapters is {max_adapters}")
    registry = AdapterRegistry(device=device, batch_size=batch_size, max_adapters=max_adapters)
    for name, run_dir in zip(names, run_dirs):
        registry.add(name, run_dir)
    return registry


def bound_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it); ConfigError with one line when that is not possible."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = "the port is in use; stop the other server or choose another --port" \
            if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
        raise ConfigError(f"cannot listen on {where}: {reason}") from None
    return sock


def api_key_of(args: argparse.Namespace) -> str | None:
    """--api-key, else $LIGHTUNE_API_KEY (unset or empty: no key)."""
    key = args.api_key if args.api_key is not None else os.environ.get("LIGHTUNE_API_KEY") or None
    if key is not None and not re.fullmatch(r"[\x21-\x7e]+", key):
        raise ConfigError("the API key must be printable ASCII without spaces (it is sent in an HTTP header)")
    return key


def cmd_serve(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, got {args.port}")
    for flag in ("batch_size", "max_texts", "max_chars", "max_body_bytes", "max_queue", "max_adapters"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.batch_wait_ms <= 1000:
        raise ConfigError(f"--batch-wait-ms must be between 0 and 1000, got {args.batch_wait_ms:g}")
    api_key = api_key_of(args)
    sock = bound_socket(args.host, args.port)  # before anything loads: a port in use fails at once
    try:
        import uvicorn

        from .serving import Access, AdapterRoot, Batching, GracefulServer, Limits, create_app, is_loopback, \
            trusted_hosts

        root = AdapterRoot(args.allow_adapter_loading) if args.allow_adapter_loading else None
        access = Access(trusted_hosts(args.host, args.allowed_hosts), api_key, root)
        if api_key is None and not is_loopback(args.host):
            print(f"lightune: warning: serving on {args.host} without an API key: anyone who can reach this port "
                  f"can use the server; set LIGHTUNE_API_KEY", file=sys.stderr)
        registry = build_registry(args.run_dirs, args.names, args.device, args.batch_size, args.max_adapters)
        limits = Limits(args.max_texts, args.max_chars, args.max_body_bytes, args.max_queue)
        app = create_app(registry, limits, access, Batching(args.batching == "on", args.batch_wait_ms))
        print(f"serving {', '.join(registry.names())} on {registry.base_model} ({registry.device}) at "
              f"http://{args.host}:{args.port}/  (API docs: /docs)", file=sys.stderr)
        GracefulServer(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def _end_progress_bars() -> None:
    """Close the progress bars a failure left open, so the error line starts on a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", [])):
        bar.close()


def _report_failure(message: str, exc: BaseException, hint: str = "") -> None:
    """One line on standard error; it names the `.incomplete` run directory a failed training left behind (and how
    to resume it when an interruption left a checkpoint in it)."""
    _end_progress_bars()
    run = getattr(exc, "incomplete_run_dir", None)
    hint = f"unfinished run kept in {run}, traceback in its error.txt" if run else hint
    if run and isinstance(exc, (KeyboardInterrupt, Terminated)):
        from .checkpoints import latest_checkpoint

        checkpoint = latest_checkpoint(run)
        if checkpoint is not None:
            hint = f"stopped at {checkpoint.name}; resume with: lightune train --resume {run}"
    print(f"lightune: {message}" + (f" ({hint})" if hint else ""), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        if args.command != "train":
            _silence_library_output()
        commands = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "compare": cmd_compare,
                    "serve": cmd_serve}
        return commands[args.command](args)
    except LightuneError as exc:
        _report_failure(f"error: {exc}", exc)
        return 2
    except (KeyboardInterrupt, EOFError) as exc:
        _report_failure("interrupted", exc)
        return 130
    except Exception as exc:  # an unexpected failure: still one line, with a way to get the traceback
        if os.environ.get("LIGHTUNE_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        _report_failure(f"error: {type(exc).__name__}: {first}", exc, "set LIGHTUNE_DEBUG=1 for the traceback")
        return 1


if __name__ == "__main__":
    sys.exit(main())
