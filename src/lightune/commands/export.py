"""`lightune export`: a finished run as a model that loads without lightune and without peft (transformers
safetensors, or ONNX); see lightune.export."""

from __future__ import annotations

import argparse

from ..logs import silence_library_output

def add(subparsers) -> None:
    export = subparsers.add_parser(
        "export", help="save a finished run as a model that runs without lightune or peft",
        description="Write a finished run to the new directory OUT as a model that needs neither lightune nor peft: "
                    "the adapter merged into the base (quantized bases dequantized), safetensors with tokenizer, "
                    "config and model card, loading with transformers.pipeline (transformers), or one ONNX graph "
                    "with pooling, head and probabilities, checked with ONNX Runtime (onnx: needs "
                    "pip install 'lightune[export]'). OUT must not exist.")
    export.add_argument("run_dir", help="a run directory written by `lightune train`")
    export.add_argument("out", metavar="OUT", help="the directory to create (never overwritten)")
    # --format and --truncation are checked by lightune.export: a wrong value is one line there, not a usage
    export.add_argument("--format", dest="fmt", default="transformers", metavar="{transformers,onnx}",
                        help="transformers (default): safetensors for transformers; onnx: model.onnx for ONNX Runtime")
    export.add_argument("--truncation", metavar="{head,tail}",
                        help="cut long texts this way instead of the run's own (needed for head_tail runs, which "
                             "no tokenizer can reproduce)")
    export.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    silence_library_output()
    from ..export import export_run

    out = export_run(args.run_dir, args.out, args.fmt, args.truncation)
    print(f"exported {args.run_dir} to {out} ({args.fmt})")
    return 0
