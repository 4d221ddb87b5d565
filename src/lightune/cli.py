"""Command line: `lightune train`, `evaluate`, `predict`, `compare`, `serve`; user errors end in one line and a
non-zero exit.

Each subcommand is a module of lightune.commands (its parser and its run); this module registers them and maps
failures to one line on standard error and an exit status."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .commands import compare, evaluate, predict, serve, train, tune
from .commands.train import Terminated
from .errors import LightuneError
from .logs import quiet_libraries


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightune", description="LoRA / QLoRA fine-tuning of text classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)
    train.add(sub)
    predict.add(sub)
    evaluate.add(sub)
    compare.add(sub)
    tune.add(sub)
    serve.add(sub)
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
    print(f"lightune: {message}" + (f" ({hint})" if hint else ""), file=sys.stderr)


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
        if os.environ.get("LIGHTUNE_DEBUG"):
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        _report_failure(f"error: {type(exc).__name__}: {first}", exc, "set LIGHTUNE_DEBUG=1 for the traceback")
        return 1


if __name__ == "__main__":
    sys.exit(main())
