"""`lightune train`: fine-tune a model and save a run directory; SIGTERM keeps the run as <name>.incomplete."""

from __future__ import annotations

import argparse
import contextlib
import signal
from pathlib import Path

from ..config import load_config
from ..logs import progress_bars, silence_library_output
from .options import add_config_arguments, cli_overrides


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


def add(subparsers) -> None:
    train = subparsers.add_parser("train", help="fine-tune a model and save a run directory",
                                  description="Fine-tune; with no arguments: LoRA on the packaged all-MiniLM-L6-v2 "
                                              "with packaged IMDb reviews.")
    train.add_argument("--config", help="TOML file with the settings (top level or a [train] table; flags override "
                                        "it; default: none)")
    train.add_argument("--quiet", action="store_true", help="no progress bars (default: bars when standard error is "
                                                            "a terminal)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue a run that did not finish (RUN.incomplete, or the hidden .RUN.*.partial of a "
                            "killed process) from its latest checkpoint, with its own settings; the finished run "
                            "takes its normal name and RUN_DIR is removed once it is complete (default: none, a new "
                            "run)")
    add_config_arguments(train)
    train.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train; Terminated (SIGTERM while training) goes up to the command line's error handling."""
    if args.resume:
        from ..checkpoints import resume_config

        cfg = resume_config(args.resume, args.config, cli_overrides(args))
    else:
        cfg = load_config(args.config, cli_overrides(args))  # bad values fail here, before the heavy imports
    from ..hub import check_sources

    check_sources(cfg)  # a hub model or dataset without network fails here in one line, before torch loads
    silence_library_output()
    from ..training import run_training

    with _sigterm_raises_terminated():
        result = run_training(cfg, progress=progress_bars(not args.quiet), resume=Path(args.resume) if args.resume else None)
    test, base = result.metrics["test"], result.metrics["base"]
    accuracy = "subset accuracy" if "subset_accuracy" in test else "accuracy"  # multi-label: every label right
    print(f"test {accuracy} {test['accuracy']:.4f} (base {base['accuracy']:.4f}), F1 {test['f1']:.4f}; "
          f"report: {result.run_dir / 'report.md'}")
    return 0
