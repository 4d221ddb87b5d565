"""Command line: `lightune train`, `evaluate`, `predict`, `compare`, `serve`; user errors end in one line and a
non-zero exit.

Each subcommand is a module of lightune.commands (its parser and its run); this module registers them and maps
failures to one line on standard error and an exit status."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .commands import compare, evaluate, export, predict, serve, train, tune
from .commands.predict import printable
from .commands.train import Terminated
from .errors import LightuneError
from .logs import quiet_libraries


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose error messages are safe for a terminal: what they quote of the command line has its
    control and bidi characters written as escapes, as predict's output does."""

    def error(self, message: str):
        super().error(printable(message))


class _CommandParser(_Parser):
    """A subcommand's parser: options and positionals in any order (`predict RUN --json TEXT`), as argparse's
    parse_intermixed_args reads them (a plain parse ends a nargs='*' positional at the first option)."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:  # parse_known_intermixed_args parses in two passes through this method
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="lightune", description="Parameter-efficient fine-tuning of transformer text classifiers: LoRA (rsLoRA, "
        "PiSSA, OLoRA), QLoRA (4-bit NF4) and 8-bit bases, DoRA, IA3, LoHa, LoKr, VeRA, prompt tuning, and full or "
        "head-only baselines; then evaluate, predict, compare and serve.")
    parser.add_argument("--version", action="version", version=f"lightune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    train.add(sub)
    predict.add(sub)
    evaluate.add(sub)
    compare.add(sub)
    tune.add(sub)
    serve.add(sub)
    export.add(sub)
    return parser


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
    print(printable(f"lightune: {message}" + (f" ({hint})" if hint else "")), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        return args.run(args)
    except LightuneError as exc:
        _report_failure(f"error: {exc}", exc)
        return 2
    except Terminated as exc:  # SIGTERM while `lightune train` trains
        _report_failure("terminated (SIGTERM)", exc)
        return 128 + signal.SIGTERM
    except (KeyboardInterrupt, EOFError) as exc:
        _report_failure("interrupted", exc)
        return 130
    except Exception as exc:  # an unexpected failure: still one line, with a way to get the traceback
        if isinstance(exc, OSError) and exc.filename is not None:  # a path that cannot be read or written
            _report_failure(f"error: {exc.filename}: {exc.strerror or exc}", exc)
            return 2
        if os.environ.get("LIGHTUNE_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        _report_failure(f"error: {type(exc).__name__}: {first}", exc, "set LIGHTUNE_DEBUG=1 for the traceback")
        return 1


if __name__ == "__main__":
    sys.exit(main())
