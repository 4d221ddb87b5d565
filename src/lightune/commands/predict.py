"""`lightune predict`: classify texts from arguments, a file, standard input or a prompt with a finished run; what
it prints is safe for a terminal."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from ..config import DEVICES, INFERENCE_PRECISIONS, TRUNCATIONS
from ..errors import ConfigError, DataError, ModelError
from ..logs import silence_library_output


def add(subparsers) -> None:
    predict = subparsers.add_parser("predict", help="classify texts with a finished run")
    predict.add_argument("run_dir", help="a run directory written by `lightune train`")
    predict.add_argument("texts", nargs="*", default=[], help="texts to classify (default: read standard input)")
    predict.add_argument("--file", help="read texts from a file: one per line, or .jsonl with a 'text' field")
    predict.add_argument("--interactive", "-i", action="store_true", help="type texts one at a time")
    predict.add_argument("--json", action="store_true", help="print one JSON object per text")
    predict.add_argument("--device", choices=DEVICES, default="auto")
    predict.add_argument("--truncation", choices=TRUNCATIONS, help="override the run's truncation (see train)")
    predict.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="auto",
                         help="the weights' dtype: auto (bf16 on GPUs that support it, else fp32), fp32 or bf16")
    predict.add_argument("--compile", action="store_true",
                         help="torch.compile the forward (CUDA graphs at fixed padded widths on CUDA; pays off for "
                              "many texts: each new shape compiles first)")
    predict.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..runs import read_run

    # the run and the texts are checked before torch and transformers load (most of a short predict's time)
    saved = read_run(args.run_dir)
    texts = None if args.interactive else _texts_to_classify(args)  # bad input fails before the model loads
    silence_library_output(datasets_too=False)
    from ..inference import Classifier

    classifier = Classifier(saved, device=args.device, truncation=args.truncation, precision=args.precision,
                            compile=args.compile, log=lambda line: print(line, file=sys.stderr))
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


def read_texts_file(path: str) -> list[str]:
    """Texts from a UTF-8 file: JSONL objects with a 'text' field, or plain text one per line (blank lines skipped)."""
    from ..texts import decode_text

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
    """Non-blank lines (texts.is_blank: nothing visible once cleaned) split at line feeds only (str.splitlines would
    also split at \\x0b, \\x85, \\u2028...)."""
    from ..texts import is_blank

    return [line.removesuffix("\r") for line in text.split("\n") if not is_blank(line)]


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
        from ..texts import decode_text

        texts = _text_lines(decode_text(sys.stdin.buffer.read(), "standard input"))
    else:
        raise ConfigError("give texts as arguments, --file, standard input, or --interactive")
    if not texts:
        raise DataError("no texts to classify")
    return texts
