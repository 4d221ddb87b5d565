"""`lightune evaluate`: score a finished run on a data source and write the evaluation beside the run."""

from __future__ import annotations

import argparse

from ..config import DEVICES, TRUNCATIONS
from ..logs import silence_library_output
from .options import HELP, parse_list, parse_optional_int
from .predict import printable


def _parse_size(text: str) -> int | str:
    """An integer, or 'all'."""
    return "all" if text.lower() == "all" else parse_optional_int(text)


def add(subparsers) -> None:
    evaluate = subparsers.add_parser(
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
    evaluate.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..runs import read_run

    run = read_run(args.run_dir)  # a missing or unfinished run fails before the libraries load
    silence_library_output()
    from ..evaluate_run import EvaluationOptions, run_evaluation
    from ..reporting import evaluation_table

    size = args.eval_size
    options = EvaluationOptions(
        run_dir=args.run_dir, data=args.data, split=args.split, text_column=args.text_column,
        label_column=args.label_column, label_names=args.label_names, label_columns=args.label_columns,
        label_delimiter=args.label_delimiter, eval_size=None if size == "all" else size,
        all_rows=size == "all", validation_fraction=args.validation_fraction, test_fraction=args.test_fraction,
        split_seed=args.split_seed, output_dir=args.output_dir, name=args.name, device=args.device,
        truncation=args.truncation)
    evaluation = run_evaluation(options, run=run)
    result = evaluation.result
    print(f"{result['run_name']} on {printable(result['data']['source'])}, {args.split} split")
    print("\n".join(evaluation_table(result)))
    print(f"report: {evaluation.out_dir / 'report.md'}")
    return 0
