"""runs.py: the one reader of a finished run. A damaged field is the same one-line error wherever a run is read
(predict, serve, evaluate), runs written by older versions read with the defaults of their day, and the probabilities
of one run are the same through evaluation, predict and serve (one forward path)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightune.cli import main
from lightune.errors import ModelError
from lightune.runs import OLD_CONFIG_DEFAULTS, OLD_RUN_DEFAULTS, read_run

TEXTS = ["great wonderful story", "awful boring mess", "the plot was dull and a waste", "loved it 12",
         "brilliant superb actors and moving scenes"]


def _damaged(run_dir: Path, dest: Path, field: str, value) -> Path:
    """A copy of a finished run whose metrics.json has `field` (a dotted path) set to value."""
    shutil.copytree(run_dir, dest)
    metrics = json.loads((dest / "metrics.json").read_text())
    *parents, key = field.split(".")
    node = metrics
    for parent in parents:
        node = node[parent]
    node[key] = value
    (dest / "metrics.json").write_text(json.dumps(metrics))
    return dest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _last_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return err[-1]


@pytest.mark.parametrize("field, value, message", [
    ("pooling", "max", "'pooling' is 'max', not one of cls, mean"),
    ("config.truncation", "middle", "'config.truncation' is 'middle', not one of head, tail, head_tail"),
    ("config.problem", "multi", "'config.problem' is 'multi', not one of single_label, multi_label"),
])
def test_a_damaged_field_is_the_same_one_line_error_in_predict_serve_and_evaluate(trained_tiny_run, tmp_path, capsys,
                                                                                 field, value, message):
    broken = _damaged(trained_tiny_run.run_dir, tmp_path / "broken", field, value)
    expected = f"lightune: error: {broken / 'metrics.json'} is damaged: {message}"
    commands = {"predict": ["predict", str(broken), "great film"],
                "serve": ["serve", str(broken), "--port", str(_free_port())],
                "evaluate": ["evaluate", str(broken)]}
    for name, args in commands.items():
        assert main(args) == 2, name
        assert _last_error(capsys) == expected, name


def test_an_unknown_pooling_is_never_read_as_cls():
    from transformers import BertConfig, BertForSequenceClassification

    from lightune.heads import apply_pooling

    model = BertForSequenceClassification(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=1, intermediate_size=8))
    with pytest.raises(ModelError, match="pooling must be 'cls' or 'mean'; got 'max'"):
        apply_pooling(model, "max")


def test_old_runs_read_with_the_defaults_of_their_day(trained_tiny_run, tmp_path):
    """A run from before pooling, truncation and the problem were recorded: [CLS], head, single-label."""
    old = tmp_path / "old"
    shutil.copytree(trained_tiny_run.run_dir, old)
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["pooling"]
    for key in ("truncation", "problem"):
        del metrics["config"][key]
    (old / "metrics.json").write_text(json.dumps(metrics))
    run = read_run(old)
    assert (run.pooling, run.truncation, run.problem, run.thresholds) == ("cls", "head", "single_label", None)
    assert (OLD_RUN_DEFAULTS["pooling"], OLD_CONFIG_DEFAULTS["truncation"]) == ("cls", "head")


def test_a_new_run_records_what_it_resolved(trained_tiny_run):
    """config.json keeps the settings as given (pooling auto) and, under "resolved", what they became."""
    run = read_run(trained_tiny_run.run_dir)
    given = json.loads((trained_tiny_run.run_dir / "config.json").read_text())
    assert given["pooling"] == "auto" and given["resolved"]["pooling"] == run.pooling
    assert run.pooling in ("cls", "mean") and run.saved_kind == "adapter" and run.saved.is_dir()


def test_pickled_weights_are_refused_by_every_reader(trained_tiny_run, tmp_path, capsys):
    run_dir = tmp_path / "pickled"
    shutil.copytree(trained_tiny_run.run_dir, run_dir)
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelError, match="adapter_model.bin, a pickle, which is never loaded here"):
        read_run(run_dir)
    assert main(["predict", str(run_dir), "great film"]) == 2
    assert "a pickle, which is never loaded here" in _last_error(capsys)


def test_evaluation_predict_and_serve_give_the_same_probabilities(trained_tiny_run):
    """The training-time evaluation loop, Classifier (predict and evaluate) and the served registry (one request and
    batched requests) all run forward.forward_logits: the same probabilities for the same texts."""
    from datasets import Dataset

    from lightune import data
    from lightune.evaluation import predict_logits
    from lightune.forward import CPU_CHUNK_TOKENS
    from lightune.inference import Classifier
    from lightune.serving import AdapterRegistry
    from lightune.training import make_eval_loader

    classifier = Classifier(trained_tiny_run.run_dir, device="cpu", merge=False)
    predicted = torch.softmax(classifier.logits(TEXTS), -1)

    rows = Dataset.from_dict({"text": TEXTS, "label": [0] * len(TEXTS)})
    tokenized = data.tokenize(rows, classifier.tokenizer, classifier.max_length, classifier.truncation)
    loader = make_eval_loader(tokenized, classifier.tokenizer, 64, CPU_CHUNK_TOKENS)
    logits, _ = predict_logits(classifier.model, loader, progress=False)
    order = sorted(range(len(TEXTS)), key=lambda i: (len(tokenized[i]["input_ids"]), i))
    evaluated = torch.empty_like(logits)
    evaluated[order] = logits  # the loader's batches are sorted by length
    evaluated = torch.softmax(evaluated, -1)

    registry = AdapterRegistry(device="cpu")
    registry.add("tiny", trained_tiny_run.run_dir)
    _, served = registry.logits(TEXTS, "tiny")
    batched = registry.forward_batch([registry.encode(TEXTS[:2], "tiny"), registry.encode(TEXTS[2:], "tiny")])

    for other in (evaluated, torch.softmax(served, -1), torch.softmax(torch.cat(batched), -1)):
        torch.testing.assert_close(other, predicted, atol=1e-6, rtol=0)
    merged = torch.softmax(Classifier(trained_tiny_run.run_dir, device="cpu").logits(TEXTS), -1)
    torch.testing.assert_close(merged, predicted, atol=1e-5, rtol=0)  # merging changes the arithmetic only


def test_importing_inference_loads_neither_datasets_nor_matplotlib():
    code = ("import sys, lightune.inference, lightune.runs, lightune.forward; "
            "print(sorted(m for m in ('datasets', 'matplotlib', 'sklearn', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("field, value, message", [
    ("r", "eight", "'r' is 'eight', not a positive integer"),
    ("lora_alpha", None, "'lora_alpha' is None, not a number"),
    ("lora_dropout", 2, "'lora_dropout' is 2, not a number from 0 to 1"),
    ("target_modules", [1, 2], "'target_modules' is [1, 2], not a module name, a list of them or null"),
    ("use_rslora", "yes", "'use_rslora' is 'yes', not true or false"),
    ("peft_type", None, "'peft_type' is None, not a peft method name such as 'LORA'"),
])
def test_a_damaged_adapter_config_is_the_same_one_line_error_in_read_run_and_every_command(
        trained_tiny_run, tmp_path, capsys, field, value, message):
    broken = tmp_path / "broken"
    shutil.copytree(trained_tiny_run.run_dir, broken)
    config_file = broken / "adapter" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), field: value}))
    expected = f"{config_file} is damaged: {message}"
    with pytest.raises(ModelError) as err:
        read_run(broken)
    assert str(err.value) == expected
    commands = {"predict": ["predict", str(broken), "great film"],
                "serve": ["serve", str(broken), "--port", str(_free_port())],
                "evaluate": ["evaluate", str(broken)]}
    for name, args in commands.items():
        assert main(args) == 2, name
        assert _last_error(capsys) == f"lightune: error: {expected}", name


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def test_a_new_run_follows_the_umask(tmp_path):
    """mkdtemp makes 0700 folders and safetensors 0600 files; a run is as readable as the umask says, finished or
    kept as .incomplete."""
    from safetensors.torch import save_file

    from lightune.runs import staged_run_dir

    previous = os.umask(0o027)
    try:
        with staged_run_dir(tmp_path / "done") as work:
            (work / "adapter").mkdir()
            save_file({"w": torch.zeros(2)}, work / "adapter" / "adapter_model.safetensors")
            (work / "metrics.json").write_text("{}")
        with pytest.raises(KeyboardInterrupt):
            with staged_run_dir(tmp_path / "cut") as work:
                save_file({"w": torch.zeros(2)}, work / "trainable.safetensors")
                raise KeyboardInterrupt
    finally:
        os.umask(previous)
    assert _modes(tmp_path / "done") == {".": 0o750, "adapter": 0o750, "adapter/adapter_model.safetensors": 0o640,
                                         "metrics.json": 0o640}
    assert _modes(tmp_path / "cut.incomplete") == {".": 0o750, "trainable.safetensors": 0o640, "error.txt": 0o640}


def test_a_trained_run_is_readable_as_the_umask_allows(trained_tiny_run):
    mask = os.umask(0)
    os.umask(mask)
    modes = _modes(trained_tiny_run.run_dir)
    assert modes["."] == 0o777 & ~mask and modes["adapter/adapter_model.safetensors"] == 0o666 & ~mask
    assert set(modes.values()) == {0o777 & ~mask, 0o666 & ~mask}
