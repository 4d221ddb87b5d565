"""`lightune compare`: train a grid of configurations, then write the comparison's tables, plots and report."""

from __future__ import annotations

import argparse
import sys

from ..logs import progress_bars, silence_library_output


def add(subparsers) -> None:
    compare = subparsers.add_parser("compare", help="train a grid of configurations and compare them",
                                    description="Train every cell of a grid (same data, split and steps), skipping "
                                                "cells finished earlier, then write results.csv, results.md, plots "
                                                "and report.html.")
    compare.add_argument("config", help="comparison file (TOML, or YAML) with [base], [grid] and optional [compare]")
    compare.add_argument("--output-dir", help="write to OUTPUT_DIR/<name>/ (default: [compare] output_dir or runs)")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")
    compare.add_argument("--in-process", action="store_true",
                         help="train the cells in this process instead of a fresh process each (faster start; "
                              "peak memory on CPU then accumulates across cells)")
    compare.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    silence_library_output()
    from ..compare_plan import load_plan

    plan = load_plan(args.config, output_dir=args.output_dir)  # a bad file fails here, before torch loads
    from ..compare import run_compare, summary_text

    print(f"comparing {len(plan.cells)} cells in {plan.root}", file=sys.stderr)
    try:
        result = run_compare(plan, progress=progress_bars(not args.quiet), isolate=False if args.in_process else None)
    except KeyboardInterrupt:
        print(f"lightune: comparison interrupted; finished cells are kept in {plan.runs_dir}, run the same command "
              f"again to resume", file=sys.stderr)
        raise
    print(summary_text(result))
    print(f"{len(plan.cells)} cells ({result.failed} failed) in {result.seconds:.0f} s; "
          f"report: {result.files['report.html']}")
    return 1 if result.failed else 0
