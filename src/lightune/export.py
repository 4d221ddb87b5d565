"""`lightune export RUN OUT`: a finished run as a model that runs without lightune and without peft.

- transformers (the default): the adapter merged into the base (a 4-bit or 8-bit base dequantized to its dtype
  first), saved as safetensors with its tokenizer and a config naming the labels, the problem type and, for
  multi-label runs, the thresholds (`label_thresholds`). [CLS]-pooled runs load with transformers' stock class;
  mean-pooled runs ship the pooling as model code (export_modeling.py, loaded with `trust_remote_code=True`).
- onnx: the same model with pooling, head and probabilities in one graph (torch.onnx.export), checked with
  ONNX Runtime against lightune's own forward pass before the export is put in place.

The exported tokenizer cuts and cleans as the run did: the run's max_length, truncation_side "left" for tail runs,
and lightune's text cleaning (forward.clean_text) as a normalizer. head_tail has no tokenizer equivalent: such
runs are refused unless --truncation head|tail says which cut to ship instead.

The run is read only through runs.read_run, its model loaded through inference.load_model (predict's path).
Nothing is written at OUT until everything is: the export is staged in a hidden directory beside it and renamed
into place at the end (removed on failure); an existing OUT is never touched.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from . import methods, model_card
from .errors import ConfigError, ModelError
from .runs import SavedRun, read_run, write_json

FORMATS = ("transformers", "onnx")
EXPORT_TRUNCATIONS = ("head", "tail")  # what a tokenizer can do
CODE_FILE = "modeling_lightune.py"
BASE_IMPORT_MARK = "# lightune: base"
ONNX_FILE = "model.onnx"
ONNX_PACKAGES = ("onnx", "onnxruntime")
ONNX_TOLERANCE = 1e-4  # the most an ONNX Runtime probability may differ from lightune's
# What the ONNX check feeds both ways: short, padded, HTML breaks and runs of spaces, and longer than any max_length.
CHECK_TEXTS = ["A wonderful, moving film.", "Dull<br /><br />and   far too long.",
               " ".join(["The first half was great and moving, then it got dull, slow and far too long."] * 40)]


def export_run(run_dir: str | Path, out: str | Path, fmt: str = "transformers", truncation: str | None = None,
               log=None) -> Path:
    """Export the finished run in run_dir to the new directory out; ConfigError or ModelError in one line for
    anything that cannot be exported, before anything is written."""
    log = log or (lambda message: print(message, file=sys.stderr))
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise ConfigError(f"{out} already exists; an export never overwrites: choose a new OUT")
    run = read_run(run_dir)
    if out.resolve().is_relative_to(run.run_dir.resolve()):
        raise ConfigError(f"{out} is inside the run {run.run_dir}, which is never altered: choose an OUT outside it")
    truncation = export_truncation(run, truncation)
    if fmt == "onnx":
        missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise ConfigError(f"--format onnx needs {', '.join(missing)}: pip install 'lightune[export]'")
    model, notes = exported_model(run)
    for note in notes:
        log(f"export: {note}")
    tokenizer = exported_tokenizer(run, truncation)
    if truncation != run.truncation:
        why = "no tokenizer can do it" if run.truncation not in EXPORT_TRUNCATIONS else "asked for with --truncation"
        notes.append(f"Cut with truncation {truncation} instead of the run's {run.truncation} ({why}): texts longer "
                     f"than {run.max_length} tokens are classified as `lightune predict --truncation {truncation}` "
                     "does.")
    with staged_export(out) as work:
        if fmt == "onnx":
            difference = save_onnx(model, tokenizer, run, work, truncation)
            log(f"export: checked with ONNX Runtime on {len(CHECK_TEXTS)} texts: probabilities within "
                f"{difference:.1e} of lightune's")
        else:
            save_transformers(model, tokenizer, run, work, truncation)
        model_card.write_card(work, run.metrics, fmt, [f"Exported by `lightune export` ({fmt}) from run "
                                                       f"{run.run_dir.name}.", *notes])
    return out


def export_truncation(run: SavedRun, requested: str | None) -> str:
    """The cut the exported tokenizer makes; ConfigError for runs whose model or cut cannot be exported."""
    method = methods.get(run.peft)
    if run.is_adapter and not method.merges:
        why = ("its trained virtual tokens are put before every input by peft" if run.peft == "prompt"
               else "its adapter")
        raise ConfigError(f"cannot export a {method.title} run: {why} and cannot be merged into the base weights; "
                          "use lightune predict or serve")
    if requested is not None and requested not in EXPORT_TRUNCATIONS:
        raise ConfigError(f"--truncation for an export must be one of {', '.join(EXPORT_TRUNCATIONS)} (what a "
                          f"tokenizer can do); got {requested!r}")
    if requested is None and run.truncation not in EXPORT_TRUNCATIONS:
        raise ConfigError(f"{run.run_dir} keeps head and tail of long texts ({run.truncation}), which no tokenizer "
                          f"can do; export with --truncation tail or head (texts over {run.max_length} tokens are "
                          "then cut that way)")
    return requested or run.truncation


def exported_model(run: SavedRun):
    """(the run's model on the CPU for export, notes for the log and the card): predict's model, with the adapter
    merged (a quantized base dequantized first) and the calibration temperature folded into the final layer."""
    from .inference import load_model

    notes = []
    model = load_model(run, torch.device("cpu"), merge=True, dequantize=True).eval()
    if run.quantize != "none":
        notes.append(f"The run's {run.quantize} base is dequantized to {str(model.dtype).removeprefix('torch.')} "
                     "and the adapter merged into it: the export computes on plain weights, not on quantized ones"
                     + (" (lightune's int8 forward also rounds activations to 8 bits, so probabilities differ "
                        "slightly)." if run.quantize == "int8" else "."))
    temperature = float(getattr(run, "temperature", None) or 1.0)  # runs may carry a calibration temperature
    if temperature != 1.0:
        from .heads import final_linear

        layer = final_linear(model)
        with torch.no_grad():
            layer.weight.div_(temperature)
            if layer.bias is not None:
                layer.bias.div_(temperature)
        notes.append(f"The final layer is divided by the run's calibration temperature {temperature:g}.")
    return model, notes


def exported_tokenizer(run: SavedRun, truncation: str):
    """The run's tokenizer as transformers' generic PreTrainedTokenizerFast around its tokenizer.json (so that
    transformers loads the file as it is, not rebuilt from the class's defaults), cutting as the run does
    (model_max_length, truncation_side) and cleaning texts as lightune does (forward.clean_text: HTML line breaks
    to spaces, whitespace collapsed, ends stripped) ahead of its own normalizer."""
    from tokenizers import Regex, Tokenizer, normalizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from .inference import damaged_files_as_model_error

    with damaged_files_as_model_error(f"tokenizer from {run.saved}"):
        tokenizer = AutoTokenizer.from_pretrained(run.saved)
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ModelError(f"cannot export {run.run_dir}: its tokenizer has no tokenizers backend (tokenizer.json) "
                         "to carry lightune's text cleaning")
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    cleaning = [normalizers.Replace(Regex(r"<[bB][rR]\s*/?>"), " "), normalizers.Replace(Regex(r"\s+"), " "),
                normalizers.Strip()]
    backend.normalizer = normalizers.Sequence(cleaning + ([backend.normalizer] if backend.normalizer else []))
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=run.max_length,
                                   truncation_side="left" if truncation == "tail" else "right",
                                   model_input_names=list(tokenizer.model_input_names), **tokenizer.special_tokens_map)


def exported_config(model, run: SavedRun, truncation: str) -> dict:
    """config.json of an export: the model's, with the problem type, thresholds and how the run reads texts."""
    config = model.config.to_dict()
    config.pop("_name_or_path", None)
    config["problem_type"] = ("multi_label_classification" if run.problem == "multi_label"
                              else "single_label_classification")
    if run.thresholds is not None:
        config["label_thresholds"] = dict(zip(run.label_names, run.thresholds))
    config["lightune"] = {"run": run.run_dir.name, "method": run.method, "pooling": run.pooling,
                          "max_length": run.max_length, "truncation": truncation}
    return config


def save_transformers(model, tokenizer, run: SavedRun, work: Path, truncation: str) -> None:
    """The merged model as safetensors, its tokenizer and config; for mean pooling the model code it needs."""
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    config = exported_config(model, run, truncation)
    if run.pooling == "mean":
        config.update(mean_pooling_code(model, work))
    write_json(work / "config.json", config)


def mean_pooling_code(model, work: Path) -> dict:
    """Write modeling_lightune.py (export_modeling.py on the model's own classes); the config fields naming it."""
    import transformers

    base, base_config = type(model).__name__, type(model.config).__name__
    if not (hasattr(transformers, base) and hasattr(transformers, base_config)):
        raise ModelError(f"cannot export mean pooling for {base}: transformers has no such class to build on")
    source = (Path(__file__).parent / "export_modeling.py").read_text(encoding="utf-8")
    lines = [f"from transformers import {base_config} as BaseConfig, {base} as BaseModel  {BASE_IMPORT_MARK}"
             if line.endswith(BASE_IMPORT_MARK) else line for line in source.splitlines()]
    (work / CODE_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    module = CODE_FILE.removesuffix(".py")
    return {"model_type": "mean_pooled_" + model.config.model_type,
            "architectures": ["MeanPooledForSequenceClassification"],
            "auto_map": {"AutoConfig": f"{module}.MeanPooledConfig",
                         "AutoModelForSequenceClassification": f"{module}.MeanPooledForSequenceClassification"}}


def save_onnx(model, tokenizer, run: SavedRun, work: Path, truncation: str) -> float:
    """model.onnx (logits and probabilities from the tokenizer's ids), tokenizer.json cutting and padding as the
    run does, config.json with the labels; returns the largest probability difference ONNX Runtime shows against
    lightune's forward pass on CHECK_TEXTS (ModelError above ONNX_TOLERANCE)."""
    names = onnx_input_names(model, tokenizer)
    sample = tokenizer(CHECK_TEXTS[:2], padding=True, truncation=True, return_tensors="pt")
    graph = ProbabilityGraph(model, run.problem == "multi_label").eval()
    outputs = ["logits", "probabilities"]
    # The TorchScript exporter (dynamo=False): every torch this project allows (>= 2.4) has it, it needs only the
    # onnx package and takes about a second for MiniLM-sized models where torch.export's took 20 s for the tests'
    # tiny one; the result is checked with ONNX Runtime below either way.
    torch.onnx.export(graph, tuple(sample[name] for name in names), str(work / ONNX_FILE), input_names=names,
                      output_names=outputs, dynamo=False,
                      dynamic_axes={**{name: {0: "batch", 1: "tokens"} for name in names},
                                    **{name: {0: "batch"} for name in outputs}})
    backend = tokenizer.backend_tokenizer
    backend.enable_truncation(run.max_length, direction="left" if truncation == "tail" else "right")
    backend.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token)
    tokenizer.save_pretrained(work)
    write_json(work / "config.json", exported_config(model, run, truncation))
    difference = onnx_difference(model, run, work, truncation)
    if not difference <= ONNX_TOLERANCE:
        raise ModelError(f"the ONNX export of {run.run_dir} gives probabilities {difference:.1e} away from "
                         f"lightune's (more than {ONNX_TOLERANCE:g}); nothing was written")
    return difference


def onnx_input_names(model, tokenizer) -> list[str]:
    """The tokenizer's outputs the graph takes: input_ids, attention_mask and token_type_ids where both have them."""
    import inspect

    takes = inspect.signature(model.forward).parameters
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tokenizer.model_input_names
             and n in takes]
    if names[:2] != ["input_ids", "attention_mask"]:
        raise ModelError(f"cannot export {type(model).__name__} to ONNX: its tokenizer gives "
                         f"{', '.join(tokenizer.model_input_names)}, not input_ids and attention_mask")
    return names


def _probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)


class ProbabilityGraph(torch.nn.Module):
    """The classifier as the ONNX graph runs it: token ids in, logits and probabilities out."""

    def __init__(self, model, multi_label: bool):
        super().__init__()
        self.model, self.multi_label = model, multi_label

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).logits
        return logits, _probabilities(logits, self.multi_label)


def onnx_difference(model, run: SavedRun, work: Path, truncation: str) -> float:
    """Largest difference between the probabilities of ONNX Runtime (tokenized by the exported tokenizer.json,
    as the card's snippet does) and of lightune's forward pass (forward.texts_logits) on CHECK_TEXTS."""
    import numpy as np
    import onnxruntime
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from .forward import resolve_device, texts_logits

    session = onnxruntime.InferenceSession(str(work / ONNX_FILE), providers=["CPUExecutionProvider"])
    encodings = Tokenizer.from_file(str(work / "tokenizer.json")).encode_batch(CHECK_TEXTS)
    fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
    feeds = {i.name: np.array([getattr(e, fields[i.name]) for e in encodings], dtype=np.int64)
             for i in session.get_inputs()}
    exported = session.run(["probabilities"], feeds)[0]
    ours = _probabilities(texts_logits(model, AutoTokenizer.from_pretrained(run.saved), CHECK_TEXTS, run.max_length,
                                       len(run.label_names), 64, resolve_device("cpu"), truncation=truncation),
                          run.problem == "multi_label")
    return float(np.abs(exported - ours.numpy()).max()) if torch.isfinite(ours).all() else float("inf")


@contextlib.contextmanager
def staged_export(out: Path):
    """Yield a hidden work directory beside out; rename it to out only if the block finishes (ConfigError if out
    appeared meanwhile). On any failure the work directory is removed: no half-written export is left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        yield work
        mask = os.umask(0)
        os.umask(mask)
        for path in (work, *work.rglob("*")):  # mkdtemp and some writers make private files; an export is shared
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        try:
            out.mkdir()  # claims the name atomically: fails if anything of that name appeared meanwhile
        except FileExistsError:
            raise ConfigError(f"{out} appeared while exporting; the export was not written there") from None
        os.rename(work, out)  # replaces only the empty directory just made
    finally:
        shutil.rmtree(work, ignore_errors=True)  # gone already after the rename
