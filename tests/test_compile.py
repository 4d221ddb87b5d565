"""--compile (compiling.py): eager logits and LoRA gradients from the inductor-compiled model on the CPU; the eager
fallback in one logged line; the CUDA options, warm-up shapes and shape limit (tested on the CPU with a stand-in
for torch.compile)."""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")

from lightune import compiling  # noqa: E402

# inductor compiles its CPU kernels with a C++ compiler
needs_cxx = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                               reason="torch.compile's inductor backend needs a C++ compiler (g++) on the CPU")


def tiny_lora(tiny_model_dir):
    from lightune import models
    from lightune.config import from_dict

    cfg = from_dict({"model": str(tiny_model_dir), "dropout": 0.0})  # no random masks: eager and compiled agree
    torch.manual_seed(0)
    return models.prepare_for_training(models.load_base_model(cfg.model, ["neg", "pos"]), cfg)


def padded_batch(lengths: list[int], width: int) -> dict:
    torch.manual_seed(1)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(5, 40, (n,))
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1] * (len(lengths) // 2))}


def logits_and_grads(forward, model, batch: dict):
    """The logits of `forward` (the model or its compiled self) and the gradients it leaves on the model's own
    trainable parameters, by their names in the model."""
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = forward(**inputs).logits
    torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return logits.detach(), grads


@needs_cxx
def test_compiled_training_step_gives_eager_logits_and_lora_gradients(tiny_model_dir):
    from accelerate import Accelerator
    from torch._dynamo.utils import counters

    from lightune.steps import backward_in_chunks

    counters.clear()
    model = tiny_lora(tiny_model_dir).train()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    lines: list[str] = []
    compiled = compiling.compile_model(model, torch.device("cpu"), lines.append)
    assert compiled.max_shapes is None  # CPU widths vary: dynamic shapes, no limit
    batch = padded_batch([12, 12, 11, 9, 7, 7, 5, 3], 12)
    eager_logits, eager_grads = logits_and_grads(model, model, batch)
    compiled_logits, compiled_grads = logits_and_grads(compiled, model, batch)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-5, atol=1e-5)
    assert any("lora_A" in name for name in trainable) and compiled_grads.keys() == eager_grads.keys() == trainable
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    # the training step's own path: chunks of 2 rows trimmed to their longest text (widths 12, 11, 7, 5: dynamic
    # shapes, the graph compiled above)
    model.zero_grad(set_to_none=True)
    eager_loss = backward_in_chunks(model, dict(batch), Accelerator(cpu=True), 30)
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    compiled_loss = backward_in_chunks(compiled, dict(batch), Accelerator(cpu=True), 30)
    assert compiled_loss.item() == pytest.approx(eager_loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, eager[name], rtol=1e-5, atol=1e-5, msg=name)
    assert lines == [] and compiled.failed is None  # compiled throughout, no fallback
    assert counters["stats"]["unique_graphs"] == graphs  # the other widths and column slices compiled nothing new
    assert {key[2][1] for key in compiled.compile_seconds} == {(8, 12), (2, 12), (2, 11), (2, 7), (2, 5)}


class Raising:
    """Stands in for torch.compile's module where it cannot run (e.g. a method peft cannot trace)."""

    def __init__(self, model, **options):
        self.options = options

    def __call__(self, **inputs):
        raise RuntimeError("cannot trace this method\nsecond line")


class Counting:
    """Stands in for torch.compile's module: the model itself, counting its calls and remembering the options."""

    def __init__(self, model, **options):
        self.model, self.options, self.calls = model, options, 0

    def __call__(self, **inputs):
        self.calls += 1
        return self.model(**inputs)


def test_compile_options_per_device():
    assert compiling.compile_options("cuda") == {"mode": "reduce-overhead", "dynamic": False}
    assert compiling.compile_options("cpu") == {"backend": "inductor", "dynamic": True}


def test_a_model_that_cannot_compile_runs_eagerly_after_one_logged_line(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch, "compile", Raising)
    model = tiny_lora(tiny_model_dir).eval()
    lines: list[str] = []
    compiled = compiling.compile_model(model, torch.device("cpu"), lines.append)
    batch = {k: v for k, v in padded_batch([5, 3], 5).items() if k != "labels"}
    with torch.no_grad():
        expected = model(**batch).logits
        first = compiled(**batch).logits
        again = compiled(**batch).logits
    assert torch.equal(first, expected) and torch.equal(again, expected)
    assert lines == ["--compile: the compiled model cannot run here (RuntimeError: cannot trace this method); "
                     "continuing eagerly"]
    assert compiled.failed == "RuntimeError: cannot trace this method"


def test_cuda_keeps_graphs_for_a_limited_number_of_shapes(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch, "compile", Counting)
    model = tiny_lora(tiny_model_dir).eval()
    lines: list[str] = []
    compiled = compiling.CompiledModel(model, "cpu", lines.append, max_shapes=2)
    assert compiled.compiled.options == {"backend": "inductor", "dynamic": True}
    with torch.no_grad():
        for lengths, width in (([4, 4], 4), ([8, 8], 8), ([4, 4], 4), ([6, 6], 12), ([3, 3], 16), ([8, 8], 8)):
            batch = {k: v for k, v in padded_batch(lengths, width).items() if k != "labels"}
            torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits)
    assert compiled.compiled.calls == 4  # widths 4, 8, 4, 8; widths 12 and 16 ran eagerly
    assert lines == ["--compile: more than 2 input shapes; batches of other shapes run eagerly"]
    assert sorted(key[2][1] for key in compiled.compile_seconds) == [(2, 4), (2, 8)]  # (no grad, ids, mask)


def test_cuda_compiles_with_cuda_graphs_and_room_for_its_shapes(monkeypatch):
    import torch._dynamo.config as dynamo_config

    monkeypatch.setattr(torch, "compile", Counting)
    monkeypatch.setattr(dynamo_config, "recompile_limit", 8)
    compiled = compiling.compile_model(torch.nn.Linear(2, 2), torch.device("cuda"), print)
    assert compiled.compiled.options == {"mode": "reduce-overhead", "dynamic": False}
    assert compiled.max_shapes == compiling.MAX_CUDA_SHAPES == 64
    assert dynamo_config.recompile_limit == 128  # a forward per shape, in training and evaluation mode


def test_warm_up_shapes_are_the_fixed_widths_with_a_full_chunk_of_rows():
    assert compiling.warm_up_shapes(512, None, 16, 2048) == []  # CPU: no fixed widths
    assert compiling.warm_up_shapes(256, 64, 16, None) == [(16, 64), (16, 128), (16, 192), (16, 256)]
    # a token budget of 4,096 takes all 16 rows up to width 256, then 4096 // width
    assert compiling.warm_up_shapes(512, 64, 16, 4096) == [(16, 64), (16, 128), (16, 192), (16, 256), (12, 320),
                                                           (10, 384), (9, 448), (8, 512)]


def test_warm_up_runs_each_shape_once_and_leaves_no_gradients_or_changed_randomness(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch, "compile", Counting)
    model = tiny_lora(tiny_model_dir)
    lines: list[str] = []
    compiled = compiling.CompiledModel(model, "cpu", lines.append)
    rng = torch.random.get_rng_state()
    seconds = compiling.warm_up(compiled, [(2, 8), (3, 16)], ["input_ids", "token_type_ids", "attention_mask"],
                                torch.device("cpu"))
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert compiled.compiled.calls == 2 and model.training and seconds > 0
    assert [line.split(" compiled in ")[0] for line in lines] == [
        "--compile: training step at width 8 (2 rows)", "--compile: training step at width 16 (3 rows)"]
    assert {key[1:] for key in compiled.compile_seconds} == {
        (("attention_mask", (2, 8)), ("input_ids", (2, 8)), ("token_type_ids", (2, 8))),
        (("attention_mask", (3, 16)), ("input_ids", (3, 16)), ("token_type_ids", (3, 16)))}


def test_warm_up_of_a_model_that_cannot_compile_falls_back_once(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch, "compile", Raising)
    model = tiny_lora(tiny_model_dir)
    lines: list[str] = []
    compiled = compiling.CompiledModel(model, "cpu", lines.append)
    compiling.warm_up(compiled, [(2, 8), (2, 16)], ["input_ids", "attention_mask"], torch.device("cpu"))
    # the first shape falls back (and runs eagerly); the others are not tried
    assert lines == ["--compile: the compiled model cannot run here (RuntimeError: cannot trace this method); "
                     "continuing eagerly"]
    assert all(p.grad is None for p in model.parameters())


def test_without_compile_training_runs_the_model_itself():
    from types import SimpleNamespace

    model = torch.nn.Linear(2, 2)
    assert compiling.training_model(model, SimpleNamespace(compile=False), torch.device("cpu"), [], [],
                                    None, print) is model


class RecordingRows(Counting):
    """Counting, also recording the rows of each batch the compiled module is given."""

    def __init__(self, model, **options):
        super().__init__(model, **options)
        self.rows: list[int] = []

    def __call__(self, **inputs):
        self.rows.append(inputs["input_ids"].shape[0])
        return super().__call__(**inputs)


def test_static_shapes_pad_an_inference_batch_to_a_power_of_two_rows_and_return_its_own(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch, "compile", RecordingRows)
    model = tiny_lora(tiny_model_dir).eval()
    compiled = compiling.CompiledModel(model, "cuda", print, max_shapes=32)  # static shapes, as on CUDA
    with torch.no_grad():
        for rows in (3, 5, 4, 1, 7):
            batch = {k: v for k, v in padded_batch([6] * rows, 8).items() if k != "labels"}
            torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits)
    assert compiled.compiled.rows == [4, 8, 4, 1, 8]  # rows padded up to a power of two (repeats of the first)
    assert sorted({key[1][1][0] for key in compiled.compile_seconds}) == [1, 4, 8]  # 3 graphs for 5 batch sizes
    # training (gradients on) keeps the batch as it is: its rows are fixed by the warm-up's shapes
    batch = {k: v for k, v in padded_batch([6, 6, 6], 8).items() if k != "labels"}
    assert compiled(**batch).logits.shape[0] == 3 and compiled.compiled.rows[-1] == 3


def test_static_rows_repeat_the_first_row_and_leave_full_batches_alone():
    ids = torch.arange(12).reshape(3, 4)
    padded, rows = compiling.static_rows({"input_ids": ids, "flag": True})
    assert rows == 3 and padded["flag"] is True
    assert torch.equal(padded["input_ids"], torch.cat([ids, ids[:1]]))
    full = {"input_ids": torch.zeros(8, 2, dtype=torch.long)}
    assert compiling.static_rows(full) == (full, 8)


@needs_cxx
def test_a_compiled_classifier_predicts_the_eager_probabilities(trained_tiny_run):
    from lightune.inference import Classifier

    texts = ["a fine film with a good cast", "dull and far too long", "ok", "the best thing I saw this year, truly"]
    eager = Classifier(trained_tiny_run.run_dir, device="cpu")
    lines: list[str] = []
    compiled = Classifier(trained_tiny_run.run_dir, device="cpu", compile=True, log=lines.append)
    assert isinstance(compiled.forward_model, compiling.CompiledModel) and compiled.model is not eager.model
    torch.testing.assert_close(compiled.logits(texts), eager.logits(texts), rtol=1e-4, atol=1e-5)
    assert [p["label"] for p in compiled.predict(texts)] == [p["label"] for p in eager.predict(texts)]
    assert compiled.forward_model.compile_seconds and compiled.forward_model.failed is None and lines == []
