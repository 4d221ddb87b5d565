"""What a run's saved folder and its exports tell someone without lightune: the base model by its hub id, the
labels in a config.json, and a model card (README.md: labels, data, metrics, how to load) instead of peft's empty
template.

A run's adapter names its base by the hub id where it has one (the packaged all-MiniLM-L6-v2 is
sentence-transformers/all-MiniLM-L6-v2), not by a path inside the virtual environment it was trained in; lightune
itself reads the base from the run's config.json, never from there. Light imports only.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import methods
from .runs import saved_config, write_text

CARD_FILE = "README.md"
EXAMPLE_TEXTS = '["A wonderful, moving film.", "Dull and far too long."]'
CODE = "```python"


def hub_id(name: str) -> str | None:
    """The Hugging Face hub id of a model as a run names it: a packaged model's own id, a hub name as it is; None
    for a local directory (it has none)."""
    from .models import PACKAGED_MODELS

    if name in PACKAGED_MODELS:
        return next(key for key, where in PACKAGED_MODELS.items() if where == PACKAGED_MODELS[name] and "/" in key)
    if Path(name).expanduser().exists() or name.startswith(("/", ".", "~")):
        return None
    return name


def name_base_by_hub_id(model, base: str) -> None:
    """Before a peft model is saved: its adapter_config.json names the base by its hub id, if it has one."""
    repo = hub_id(base)
    for config in getattr(model, "peft_config", {}).values():
        if repo is not None:
            config.base_model_name_or_path = repo


def save_label_config(model, folder: Path, problem: str) -> None:
    """An adapter's folder gets the base's config with the run's labels and problem type (config.json): what
    stock peft's AutoPeftModelForSequenceClassification needs to be told (see the card's snippet)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.to_dict()
    config["problem_type"] = "multi_label_classification" if problem == "multi_label" else "single_label_classification"
    for key in ("_name_or_path", "quantization_config"):  # where the base was, how it was stored: not the labels
        config.pop(key, None)
    write_text(Path(folder) / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_card(folder: Path, metrics: dict, kind: str, notes: list[str] = ()) -> None:
    """The folder's README.md: the model card of a run's saved adapter/model or of an export (kind: adapter,
    model, transformers or onnx)."""
    write_text(Path(folder) / CARD_FILE, card_text(metrics, kind, notes))


def card_text(metrics: dict, kind: str, notes: list[str] = ()) -> str:
    """A model card from a run's metrics.json (as SavedRun.metrics holds it, or as training is about to write it)."""
    config = saved_config(metrics["config"])
    data, test, base = metrics["data"], metrics["test"], metrics.get("base") or {}
    names, pooling = data["label_names"], metrics.get("pooling", "cls")
    base_name = hub_id(config["model"]) or config["model"]
    method = methods.get(config["peft"])
    storage = {"nf4": " on a 4-bit NF4 base", "int8": " on an 8-bit base"}.get(config["quantize"], "")
    library = {"adapter": "peft", "onnx": "onnx"}.get(kind, "transformers")
    multi = config["problem"] == "multi_label"
    thresholds = metrics.get("thresholds") or {}
    lines = [
        "---", f"base_model: {base_name}", f"library_name: {library}", "pipeline_tag: text-classification",
        "tags:", "- lightune", f"- {config['peft']}", "- text-classification", "---", "",
        f"# {metrics.get('run_name', 'lightune run')}", "",
        f"A {'multi-label' if multi else 'single-label'} text classifier ({len(names)} labels) fine-tuned from "
        f"`{base_name}` with {method.title}{storage} by lightune. Its head reads "
        + ("the mean of the last token states (padding excluded)" if pooling == "mean" else "the [CLS] token")
        + f" of at most {metrics['max_length']} tokens; longer texts keep "
        + {"head": "their first tokens", "tail": "their last tokens",
           "head_tail": "a quarter of the budget from the start and the rest from the end"}[config["truncation"]]
        + " (special tokens always stay). HTML line breaks become spaces and whitespace is collapsed first.", "",
        "## Labels", "",
        "| id | label |" + (" threshold |" if multi else ""), "| ---: | --- |" + (" ---: |" if multi else ""),
        *(f"| {i} | {name} |" + (f" {thresholds.get(name, 0.5):.4g} |" if multi else "")
          for i, name in enumerate(names)),
        *(["", "A label is predicted when its sigmoid probability reaches its threshold "
                "(`label_thresholds` in config.json)."] if multi and kind != "adapter" else []),
        "", "## Data", "", data_line(data), "",
        "## Test metrics", "",
        "| metric | fine-tuned | base model |", "| --- | ---: | ---: |",
        *(f"| {label} | {test[key]:.4f} | {base[key]:.4f} |" if key in base else f"| {label} | {test[key]:.4f} | |"
          for key, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced accuracy"),
                             ("f1", "F1 (macro)"), ("precision", "precision (macro)"), ("recall", "recall (macro)"),
                             ("loss", "loss")) if isinstance(test.get(key), (int, float))),
        "", "## How to load", "", *how_to_load(kind, config, metrics, multi),
    ]
    if notes:
        lines += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def data_line(data: dict) -> str:
    """Where the run's data came from and how it was split (runs of older versions record less)."""
    sizes, fingerprints = data.get("sizes") or {}, data.get("fingerprints") or {}
    line = f"Trained on `{data.get('train_source', 'unknown')}`, tested on `{data.get('test_source', 'unknown')}`"
    if data.get("split"):
        line += f" (split `{data['split']}`)"
    if sizes:
        line += ": " + ", ".join(f"{sizes[k]} {k}" for k in ("train", "validation", "test") if k in sizes) + " examples"
    if fingerprints.get("test"):
        line += f" (test fingerprint `{fingerprints['test']}`)"
    return line + "."


def how_to_load(kind: str, config: dict, metrics: dict, multi: bool) -> list[str]:
    """The snippet that loads this folder and gives the run's probabilities (tests run them as written)."""
    mean = metrics.get("pooling") == "mean"
    truncation, length = config["truncation"], metrics["max_length"]
    if kind == "transformers":
        return transformers_snippet(mean, multi)
    if kind == "onnx":
        return onnx_snippet()
    loader = ("from peft import AutoPeftModelForSequenceClassification" if kind == "adapter" else
              "from transformers import AutoModelForSequenceClassification")
    load = (["config = AutoConfig.from_pretrained(path)  # the run's labels and problem type (config.json)",
             "model = AutoPeftModelForSequenceClassification.from_pretrained(",
             "    path, id2label=config.id2label, label2id=config.label2id, problem_type=config.problem_type).eval()"]
            if kind == "adapter" else ["model = AutoModelForSequenceClassification.from_pretrained(path).eval()"])
    return [
        "With lightune: `lightune predict RUN`, `lightune serve`, or `lightune export RUN OUT` for a model that "
        "needs neither lightune nor peft. With " + ("stock peft:" if kind == "adapter" else "transformers:"), "",
        CODE, "import re", "", "import torch", loader, "from transformers import AutoConfig, AutoTokenizer", "",
        'path = "."  # this folder', *load,
        *(["from lightune.heads import use_mean_pooling  # the head reads the mean of the token states, not [CLS]",
           "use_mean_pooling(model)"] if mean else []),
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        *(['tokenizer.truncation_side = "left"  # the run keeps the last tokens of a longer text']
          if truncation == "tail" else []),
        *(["# head_tail: no tokenizer setting keeps head and tail; texts longer than max_length come out otherwise"]
          if truncation == "head_tail" else []),
        f"texts = {EXAMPLE_TEXTS}",
        "texts = [re.sub(r\"\\s+\", \" \", re.sub(r\"(?i)<br\\s*/?>\", \" \", t)).strip() for t in texts]  # as lightune cleans",
        f"batch = tokenizer(texts, truncation=True, max_length={length}, padding=True, return_tensors=\"pt\")",
        "with torch.no_grad():",
        f"    probabilities = model(**batch).logits.{'sigmoid()' if multi else 'softmax(-1)'}",
        "```",
    ]


def transformers_snippet(mean: bool, multi: bool) -> list[str]:
    remote = ", trust_remote_code=True" if mean else ""
    return [
        "With transformers alone (no lightune, no peft)"
        + (": the masked mean pooling ships as model code (modeling_lightune.py), hence `trust_remote_code=True`."
           if mean else ":"), "",
        CODE, "from transformers import pipeline", "",
        f'classifier = pipeline("text-classification", model=".", truncation=True{remote})  # this folder',
        f"texts = {EXAMPLE_TEXTS}",
        "scores = classifier(texts, top_k=None)  # every label with its probability, for each text",
        *(["thresholds = classifier.model.config.label_thresholds",
           'labels = [[s["label"] for s in row if s["score"] >= thresholds[s["label"]]] for row in scores]']
          if multi else []),
        "```",
    ]


def onnx_snippet() -> list[str]:
    return [
        "With ONNX Runtime and tokenizers alone (no torch, transformers, lightune or peft); the graph holds the "
        "pooling, the head and the probabilities, and tokenizer.json cleans, cuts and pads as the run did:", "",
        CODE, "import numpy as np", "import onnxruntime", "from tokenizers import Tokenizer", "",
        'path = "."  # this folder',
        'tokenizer = Tokenizer.from_file(f"{path}/tokenizer.json")',
        'session = onnxruntime.InferenceSession(f"{path}/model.onnx", providers=["CPUExecutionProvider"])',
        f"texts = {EXAMPLE_TEXTS}",
        "encodings = tokenizer.encode_batch(texts)",
        'fields = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}',
        "feeds = {i.name: np.array([getattr(e, fields[i.name]) for e in encodings], dtype=np.int64)",
        "         for i in session.get_inputs()}",
        "logits, probabilities = session.run(None, feeds)  # labels: id2label in config.json",
        "```",
    ]
