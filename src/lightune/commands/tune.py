"""`lightune tune`: search hyperparameters with Optuna, then write the trials table, plots, report and best.toml."""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError
from ..logs import progress_bars, silence_library_output


def add(subparsers) -> None:
    tune = subparsers.add_parser(
        "tune", help="search hyperparameters with Optuna (TPE, pruning, Pareto fronts, parallel workers)",
        description="Search a space of training settings with Optuna: each trial is a run under "
                    "<output_dir>/<name>/runs/trial-N, scored on the validation split; the study resumes where it "
                    "stopped. Writes trials.csv, trials.md, plots, report.html and best.toml.")
    tune.add_argument("config", help="search file (TOML) with [base], [search] and optional [tune]")
    tune.add_argument("--trials", help="finished or pruned trials in total (default: [tune] trials or 20)")
    tune.add_argument("--objectives", help="comma-separated: a validation metric (accuracy, f1, loss), with seconds "
                                           "or memory beside it for the Pareto front of accuracy against compute "
                                           "(default: [tune] objectives or accuracy)")
    tune.add_argument("--workers", help="trial processes on this machine (default: [tune] workers or 1)")
    tune.add_argument("--storage", help="database URL of a study shared by workers on several machines, e.g. "
                                        "postgresql://user:password@host/lightune (default: the study directory's "
                                        "study.db, or study.journal for several workers)")
    tune.add_argument("--output-dir", help="write to OUTPUT_DIR/<name>/ (default: [tune] output_dir or runs)")
    tune.add_argument("--quiet", action="store_true", help="no progress bars")
    tune.add_argument("--in-process", action="store_true",
                      help="train the trials in the worker's process instead of a fresh process each (faster start; "
                           "peak memory on CPU then accumulates across trials)")
    tune.set_defaults(run=run)


def _integer(text: str | None):
    """A flag's integer (or the text as given, which the plan refuses in one line)."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return text


def check_storage_url(url: str) -> None:
    """ConfigError unless url is a database URL SQLAlchemy can parse (Optuna's RDB storage)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except (ArgumentError, ValueError):
        raise ConfigError(f"--storage must be a database URL such as postgresql://user:password@host/lightune or "
                          f"sqlite:///path/study.db; got {url!r}") from None


def run(args: argparse.Namespace) -> int:
    import importlib.util

    from ..tune_plan import load_plan

    if importlib.util.find_spec("optuna") is None:
        raise ConfigError('lightune tune needs Optuna: pip install "lightune[tune]" (or pip install optuna)')

    overrides = {"trials": _integer(args.trials), "workers": _integer(args.workers), "objectives": args.objectives,
                 "output_dir": args.output_dir, "isolate": False if args.in_process else None}
    plan = load_plan(args.config, overrides)  # a bad file or flag fails here, before torch loads
    if args.storage is not None:
        check_storage_url(args.storage)
    silence_library_output()
    from ..tune import run_tune, summary_text

    print(f"searching {len(plan.search)} setting(s) over {plan.trials} trials in {plan.root}", file=sys.stderr)
    try:
        result = run_tune(plan, storage=args.storage, progress=progress_bars(not args.quiet))
    except KeyboardInterrupt:
        print(f"lightune: search interrupted; finished trials are kept in the study, run the same command again to "
              f"resume ({plan.root})", file=sys.stderr)
        raise
    print(summary_text(result))
    print(f"report: {result.files['report.html']}" + (f"; best configuration: {result.files['best.toml']}"
                                                      if "best.toml" in result.files else ""))
    return 0 if result.best is not None else 1
