"""The subcommands of `lightune`, one module each: `add(subparsers)` adds its parser, `run(args)` returns the exit
status. Module level imports stay light (argparse, config, methods); torch, datasets and the rest load in `run`.
options.py holds the train configuration's flags, which are not a command."""

__all__ = ["train", "predict", "evaluate", "compare", "serve", "export"]  # in the order `lightune --help` lists them
