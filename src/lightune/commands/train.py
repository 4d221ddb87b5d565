"""`lightune train`: fine-tune a model and save a run directory; SIGTERM keeps the run as <name>.incomplete."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

from ..config import load_config
from ..logs import progress_bars, silence_library_output
from .options import add_config_arguments, cli_overrides


class Terminated(BaseException):
    """SIGTERM during training, raised like Ctrl-C's KeyboardInterrupt so the run is kept as <name>.incomplete."""


@contextlib.contextmanager
def _sigterm_raises_terminated():
    """While the block runs in the main thread, SIGTERM raises Terminated; the previous handler is restored after.

    An exception raised in a finalizer (the __del__ of a tqdm bar or a datasets Dataset that the interrupted code
    was freeing) cannot leave it: Python prints it as "Exception ignored in ..." with a traceback and goes on as if
    no signal had come. So a signal that lands in one is delivered again a moment later (_deliver_later), and a
    Terminated that a finalizer swallowed all the same (one not named __del__) too, without the traceback."""
    def handler(signum, frame):
        if _in_finalizer(frame):
            _deliver_later(signum)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt saving error.txt
        raise Terminated("terminated by SIGTERM")

    def swallowed(unraisable):
        if not isinstance(unraisable.exc_value, Terminated):
            return previous_hook(unraisable)
        signal.signal(signal.SIGTERM, handler)
        _deliver_later(signal.SIGTERM)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: signals stay as they are
        yield
        return
    previous_hook, sys.unraisablehook = sys.unraisablehook, swallowed
    _FINALIZERS.add(swallowed.__code__)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook
        _FINALIZERS.discard(swallowed.__code__)


_FINALIZERS: set = set()  # code that runs like a finalizer: a signal handler must not raise in it


def _in_finalizer(frame) -> bool:
    while frame is not None:
        if frame.f_code.co_name == "__del__" or frame.f_code in _FINALIZERS:
            return True
        frame = frame.f_back
    return False


def _deliver_later(signum: int, delay_s: float = 0.05) -> None:
    """Send the signal to this process again after delay_s, from a helper thread (the handler then runs in the main
    thread, past the finalizer)."""
    timer = threading.Timer(delay_s, os.kill, (os.getpid(), signum))
    timer.daemon = True  # a process that ends meanwhile ends as it would have
    timer.start()


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
