"""`lightune export`: tiny runs exported to transformers and ONNX, loaded without lightune and peft, giving lightune's
probabilities; quantized, full, head-only, prompt-tuning and head_tail runs; bad requests; a calibration
temperature."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import NEGATIVE, POSITIVE
from test_model_card import code_after, run_snippet

# Longer than the runs' max_length (32): positive words first, negative last, so head and tail cuts disagree.
LONG = " ".join(POSITIVE * 3 + ["the", "movie"] * 4 + NEGATIVE * 3)
TEXTS = ["great wonderful film", "awful boring plot 7", "the   movie<br /><br />was a dull mess", LONG]

# Run in a fresh interpreter where lightune and peft cannot be imported: the export's own card snippet, as written.
NO_LIGHTUNE = r"""
import json, re, sys
sys.modules["lightune"] = None
sys.modules["peft"] = None
for name in ("lightune", "peft"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(name + " imported")
path, texts, code = json.loads(sys.stdin.read())
code = code.replace('model="."', "model=" + json.dumps(path))
code = re.sub(r"^texts = .*$", "texts = " + json.dumps(texts), code, count=1, flags=re.M)
namespace = {}
exec(code, namespace)
refused = None
from transformers import AutoModelForSequenceClassification
try:  # the stock way, without trust_remote_code
    AutoModelForSequenceClassification.from_pretrained(path)
except Exception as exc:
    refused = str(exc)
print("\nRESULT " + json.dumps({"scores": namespace["scores"], "labels": namespace.get("labels"), "refused": refused}))
"""


def without_lightune(out: Path, texts: list[str]) -> dict:
    """The export's card snippet run in a subprocess that cannot import lightune or peft."""
    code = code_after((out / "README.md").read_text(), "## How to load")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(out.parent / "hf-modules")  # trust_remote_code copies the model code here
    done = subprocess.run([sys.executable, "-c", NO_LIGHTUNE], input=json.dumps([str(out), texts, code]),
                          capture_output=True, text=True, env=env, cwd=out.parent, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("\nRESULT ")[-1])


def lightune_probabilities(run_dir: Path, texts: list[str], **classifier) -> list[dict]:
    from lightune.inference import Classifier

    return Classifier(run_dir, **classifier).predict(texts)


def uncalibrated_probabilities(run_dir: Path, texts: list[str]) -> list[list[float]]:
    """lightune's probabilities before the run's calibration temperature: what the run's own adapter/ or model/
    folder gives in stock peft or transformers (predict and exports apply the temperature)."""
    from lightune.inference import Classifier

    return torch.softmax(Classifier(run_dir, device="cpu").logits(texts), -1).tolist()


def exported_quietly(result: tuple[int, str]) -> bool:
    """Exit 0 with nothing on stderr but the note that the run's calibration temperature is folded into the head."""
    code, err = result
    return code == 0 and all(line.startswith("export: The final layer is divided by the run's calibration "
                                             "temperature") for line in err.splitlines())


def export(run_dir: Path, out: Path, *flags: str) -> tuple[int, str]:
    from lightune.cli import main

    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["export", str(run_dir), str(out), *flags])
    return code, err.getvalue()


def multi_label_csv(path: Path) -> Path:
    from test_multilabel import LABELS, columns_csv, toy_rows

    assert LABELS
    return columns_csv(path, toy_rows(300, seed=1))


SCENARIOS = {
    "mean pooling, tail cut": dict(pooling="mean"),
    "[CLS] pooling, head cut": dict(pooling="cls", truncation="head"),
    "multi-label, tuned thresholds": dict(pooling="mean", problem="multi_label", tune_thresholds=True, epochs=2,
                                          label_columns=["happy", "sad", "funny"]),
}


@pytest.fixture(scope="module")
def labels_csv(tmp_path_factory) -> Path:
    return multi_label_csv(tmp_path_factory.mktemp("multi-label") / "labels.csv")


@pytest.fixture
def scenario_run(shared_tiny_run, labels_csv):
    """Factory: the run of a scenario, trained once and shared by the transformers and ONNX tests (and the mean-pooled
    one by test_model_card); with its settings."""

    def get(scenario: str):
        overrides = {"epochs": 1, **SCENARIOS[scenario]}
        if "problem" in overrides:
            overrides["data"] = str(labels_csv)
        return shared_tiny_run(**overrides), overrides

    return get


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_transformers_export_gives_lightunes_probabilities_without_lightune_or_peft(scenario, scenario_run, tmp_path):
    run, overrides = scenario_run(scenario)
    out = tmp_path / "exported"
    assert export(run.run_dir, out)[0] == 0
    names = run.metrics["data"]["label_names"]
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(names)}
    assert config["label2id"] == {n: i for i, n in enumerate(names)}
    multi = scenario.startswith("multi")
    assert config["problem_type"] == ("multi_label_classification" if multi else "single_label_classification")
    assert config.get("label_thresholds") == run.metrics.get("thresholds")
    mean = overrides["pooling"] == "mean"
    assert ("auto_map" in config) == (out / "modeling_lightune.py").is_file() == mean
    assert (out / "model.safetensors").is_file() and not list(out.glob("adapter*"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left

    got = without_lightune(out, TEXTS)
    expected = lightune_probabilities(run.run_dir, TEXTS)
    for row, p in zip(got["scores"], expected):
        assert {s["label"]: s["score"] for s in row} == pytest.approx(p["probabilities"], abs=1e-5, rel=0)
    if multi:
        assert [sorted(labels) for labels in got["labels"]] == [sorted(p["labels"]) for p in expected]
    # a stock class would read [CLS]: without trust_remote_code a mean-pooled export is refused, never misread
    assert (got["refused"] is not None) == mean
    if mean:
        assert "trust_remote_code" in got["refused"]
    if not multi:  # the side of the cut decides the long text: the exported tokenizer cut it on the run's side
        other = {"tail": "head", "head": "tail"}[overrides.get("truncation", "tail")]
        assert lightune_probabilities(run.run_dir, [LONG], truncation=other)[0]["probabilities"] != \
            pytest.approx(expected[-1]["probabilities"], abs=1e-3)


@pytest.mark.parametrize("scenario", ["mean pooling, tail cut", "multi-label, tuned thresholds"])
def test_onnx_export_gives_lightunes_probabilities_in_onnx_runtime(scenario, scenario_run, tmp_path):
    pytest.importorskip("onnxruntime")
    run, _ = scenario_run(scenario)
    names = run.metrics["data"]["label_names"]
    out = tmp_path / "onnx"
    code, err = export(run.run_dir, out, "--format", "onnx")
    assert code == 0, err
    assert re.search(r"checked with ONNX Runtime on 3 texts: probabilities within \S+ of lightune's", err)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.onnx", "tokenizer.json",
                                                     "tokenizer_config.json"]
    snippet = code_after((out / "README.md").read_text(), "## How to load")
    for texts in (TEXTS, TEXTS[:1]):  # a batch, and one text alone
        namespace = run_snippet(snippet, f'path = "{out}"', 'path = "."', texts)
        expected = [list(p["probabilities"].values()) for p in lightune_probabilities(run.run_dir, texts)]
        assert namespace["probabilities"].shape == (len(texts), len(names))
        assert abs(namespace["probabilities"] - torch.tensor(expected).numpy()).max() <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(names)}
    assert config.get("label_thresholds") == run.metrics.get("thresholds")


@pytest.mark.parametrize("quantize, tolerance", [("nf4", 1e-5), ("int8", 0.05)])
def test_quantized_runs_export_dequantized_and_say_so(quantize, tolerance, tiny_config, tmp_path):
    from transformers import pipeline

    from lightune.export import export_run
    from lightune.training import run_training

    run = run_training(tiny_config(pooling="mean", quantize=quantize, epochs=1), progress=False)
    lines = []
    out = export_run(run.run_dir, tmp_path / "exported", log=lines.append)
    assert lines[0] == (f"export: The run's {quantize} base is dequantized to float32 and the adapter merged into it: "
                        "the export computes on plain weights, not on quantized ones" + (
                            " (lightune's int8 forward also rounds activations to 8 bits, so probabilities differ "
                            "slightly)." if quantize == "int8" else "."))
    # the calibration temperature fitted on validation, when there is one, is folded into the head and said so
    assert all(line.startswith("export: The final layer is divided by the run's calibration temperature")
               for line in lines[1:])
    assert lines[0].removeprefix("export: ") in (out / "README.md").read_text()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    classifier = pipeline("text-classification", model=str(out), truncation=True, trust_remote_code=True)
    got = [{s["label"]: s["score"] for s in row} for row in classifier(TEXTS, top_k=None)]
    for row, p in zip(got, lightune_probabilities(run.run_dir, TEXTS)):
        assert row == pytest.approx(p["probabilities"], abs=tolerance, rel=0)


@pytest.mark.parametrize("peft", ["full", "head"])
def test_full_and_head_runs_export_as_they_are(peft, tiny_config, tmp_path):
    from transformers import pipeline

    from lightune.training import run_training

    run = run_training(tiny_config(peft=peft, pooling="cls", max_steps=3, epochs=1), progress=False)
    out = tmp_path / "exported"
    assert exported_quietly(export(run.run_dir, out))
    classifier = pipeline("text-classification", model=str(out), truncation=True)
    got = [{s["label"]: s["score"] for s in row} for row in classifier(TEXTS, top_k=None)]
    expected = lightune_probabilities(run.run_dir, TEXTS)
    for row, p in zip(got, expected):
        assert row == pytest.approx(p["probabilities"], abs=1e-5, rel=0)
    # the run's own model/ folder: its card's transformers snippet, as written (before the temperature)
    saved = run.run_dir / "model"
    card = code_after((saved / "README.md").read_text(), "## How to load")
    namespace = run_snippet(card, f'path = "{saved}"', 'path = "."', TEXTS)
    torch.testing.assert_close(namespace["probabilities"], torch.tensor(uncalibrated_probabilities(run.run_dir, TEXTS)),
                               rtol=0, atol=1e-5)


def test_prompt_tuning_run_is_refused_with_the_reason(tiny_config, tmp_path):
    from lightune.training import run_training

    run = run_training(tiny_config(peft="prompt", max_steps=1, epochs=1, virtual_tokens=2), progress=False)
    code, err = export(run.run_dir, tmp_path / "exported")
    assert code == 2
    assert err == ("lightune: error: cannot export a prompt tuning run: its trained virtual tokens are put before "
                   "every input by peft and cannot be merged into the base weights; use lightune predict or serve\n")
    assert not (tmp_path / "exported").exists()


def test_head_tail_run_is_refused_unless_a_tokenizer_cut_is_chosen(tiny_config, tmp_path):
    from transformers import pipeline

    from lightune.training import run_training

    run = run_training(tiny_config(pooling="cls", truncation="head_tail", epochs=1), progress=False)
    out = tmp_path / "exported"
    code, err = export(run.run_dir, out)
    assert code == 2 and err.count("\n") == 1 and not out.exists()
    assert "keeps head and tail of long texts (head_tail), which no tokenizer can do; export with --truncation " \
           "tail or head" in err
    assert exported_quietly(export(run.run_dir, out, "--truncation", "tail"))
    assert json.loads((out / "config.json").read_text())["lightune"]["truncation"] == "tail"
    assert "Cut with truncation tail instead of the run's head_tail" in (out / "README.md").read_text()
    classifier = pipeline("text-classification", model=str(out), truncation=True)
    got = [{s["label"]: s["score"] for s in row} for row in classifier(TEXTS, top_k=None)]
    for row, p in zip(got, lightune_probabilities(run.run_dir, TEXTS, truncation="tail")):
        assert row == pytest.approx(p["probabilities"], abs=1e-5, rel=0)


def damaged(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    copy = shutil.copytree(run_dir, tmp_path / "damaged")
    (copy / "metrics.json").write_text("{")
    return copy


def unfinished(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    copy = shutil.copytree(run_dir, tmp_path / "unfinished")
    (copy / "metrics.json").unlink()
    return copy


@pytest.mark.parametrize("make_run, flags, message", [
    (None, ["--format", "tflite"], "--format must be one of transformers, onnx; got 'tflite'"),
    (None, ["--truncation", "head_tail"], "--truncation for an export must be one of head, tail"),
    (lambda run, tmp: tmp / "nowhere", [], "run directory not found"),
    (unfinished, [], "is not a finished lightune run (no metrics.json/config.json)"),
    (damaged, [], "metrics.json is damaged: not valid JSON"),
    (lambda run, tmp: run, ["INSIDE"], "is inside the run"),
])
def test_bad_requests_are_one_line_and_write_nothing(make_run, flags, message, trained_tiny_run, tmp_path):
    run_dir = make_run(trained_tiny_run.run_dir, tmp_path) if make_run else trained_tiny_run.run_dir
    out = tmp_path / "out" / "exported"
    if flags == ["INSIDE"]:  # an OUT inside the run: a finished run is never altered
        import shutil

        run_dir, flags = Path(shutil.copytree(run_dir, tmp_path / "run")), []
        out = run_dir / "out" / "exported"
        before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    code, err = export(run_dir, out, *flags)
    assert code == 2 and err.startswith("lightune: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not out.exists() and not (tmp_path / "out").exists() and not out.parent.exists()
    if message == "is inside the run":
        assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_an_existing_target_is_never_overwritten(trained_tiny_run, tmp_path):
    out = tmp_path / "exported"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code, err = export(trained_tiny_run.run_dir, out)
    assert (code, err) == (2, f"lightune: error: {out} already exists; an export never overwrites: choose a new "
                              "OUT\n")
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"


def test_a_failed_export_leaves_nothing_behind(trained_tiny_run, tmp_path, monkeypatch):
    from lightune import export as export_module

    def fail(model, tokenizer, run, work, truncation):
        (work / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(export_module, "save_transformers", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        export_module.export_run(trained_tiny_run.run_dir, tmp_path / "exported", log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_a_calibration_temperature_divides_the_final_layer(trained_tiny_run):
    from lightune.export import exported_model
    from lightune.inference import Classifier
    from lightune.runs import read_run

    run = read_run(trained_tiny_run.run_dir)
    classifier = Classifier(run, device="cpu")
    object.__setattr__(run, "temperature", 1.0)  # a run without calibration
    plain, notes = exported_model(run)
    assert notes == []
    object.__setattr__(run, "temperature", 2.0)
    scaled, notes = exported_model(run)
    assert notes == ["The final layer is divided by the run's calibration temperature 2."]
    classifier.model = scaled
    calibrated = classifier.logits(TEXTS)
    classifier.model = plain
    torch.testing.assert_close(calibrated, classifier.logits(TEXTS) / 2, rtol=0, atol=1e-5)


@pytest.mark.e2e
def test_a_default_run_of_the_real_model_leaves_lightune(tmp_path):
    """The issue's case: a mean-pooled, tail-cut run of the packaged MiniLM. Its export predicts without lightune
    and peft, in ONNX Runtime too, and the README's stock-peft snippet loads its adapter by the base's hub id (from
    a hub cache, as after a download), all giving lightune's probabilities."""
    pytest.importorskip("onnxruntime")
    from conftest import packaged_model_hub_cache
    from lightune.config import load_config
    from lightune.training import run_training

    run = run_training(load_config(overrides=dict(
        data="rotten_tomatoes", train_size=64, eval_size=32, max_steps=4, objective="cross_entropy",
        output_dir=str(tmp_path / "runs"), run_name="default")), progress=False)
    assert run.metrics["pooling"] == "mean" and run.metrics["config"]["truncation"] == "tail"
    texts = ["A wonderful, moving film.", "Dull and far too long.",
             "It starts well.<br /><br />" + "Then nothing happens for two hours and it is dull. " * 40]
    expected = lightune_probabilities(run.run_dir, texts)

    out = tmp_path / "exported"
    assert export(run.run_dir, out)[0] == 0
    got = without_lightune(out, texts)
    for row, p in zip(got["scores"], expected):
        assert {s["label"]: s["score"] for s in row} == pytest.approx(p["probabilities"], abs=1e-5, rel=0)

    code, err = export(run.run_dir, tmp_path / "onnx", "--format", "onnx")
    assert code == 0, err
    snippet = code_after((tmp_path / "onnx" / "README.md").read_text(), "## How to load")
    namespace = run_snippet(snippet, f'path = "{tmp_path / "onnx"}"', 'path = "."', texts)
    assert abs(namespace["probabilities"] - [list(p["probabilities"].values()) for p in expected]).max() <= 1e-4

    readme = code_after((Path(__file__).resolve().parents[1] / "README.md").read_text(), "The adapter is portable")
    script = readme.replace("runs/<run>/adapter", str(run.run_dir / "adapter"))
    script = re.sub(r"^texts = .*$", f"texts = {texts!r}", script, count=1, flags=re.M)
    script += "\nimport json\nprint('\\nRESULT ' + json.dumps(probabilities.tolist()))\n"
    env = {**os.environ, "HF_HUB_CACHE": str(packaged_model_hub_cache(tmp_path / "hub")), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stock = json.loads(done.stdout.split("\nRESULT ")[-1])
    assert abs(torch.tensor(stock) - torch.tensor(uncalibrated_probabilities(run.run_dir, texts))).max() <= 1e-5
