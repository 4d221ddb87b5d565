import json

import pytest

from lightune import reporting, runs
from conftest import write_csv
from lightune.errors import ConfigError, TrainingError
from lightune.training import run_training


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_lora_run_learns_and_writes_a_complete_run(trained_tiny_run):
    run, metrics = trained_tiny_run.run_dir, trained_tiny_run.metrics
    assert run.name == "lora" and runs.is_complete_run(run)
    assert metrics["test"]["accuracy"] >= 0.85 > metrics["base"]["accuracy"]
    assert metrics["test"]["f1"] > metrics["base"]["f1"]
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["test"]["accuracy"] == metrics["test"]["accuracy"]
    assert on_disk["config"]["method"] == "lora" and on_disk["config"]["resolved"]["lora_alpha"] == 16
    assert len(on_disk["history"]) == 5 and on_disk["history"][-1]["epoch"] == 5.0
    assert set(on_disk["test"]) >= {"accuracy", "f1", "precision", "recall", "loss", "confusion_matrix",
                                    "samples_per_s"}
    assert sum(map(sum, on_disk["test"]["confusion_matrix"])) == on_disk["data"]["sizes"]["test"]
    assert 0 < on_disk["parameters"]["share"] < 1
    assert on_disk["memory"]["weights_bytes"] > 0 and on_disk["memory"]["peak_bytes"] > 0
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "adapter" / "tokenizer.json").is_file()
    assert _is_png(run / "plots" / "before_after.png") and _is_png(run / "plots" / "history.png")
    report = (run / "report.md").read_text()
    assert "| fine-tuned |" in report and f"{metrics['test']['accuracy']:.4f}" in report


def test_same_seed_gives_the_same_result(tiny_config, trained_tiny_run):
    cfg = tiny_config(run_name="again", epochs=5)
    cfg.attention_dropout = None  # as the shared run
    again = run_training(cfg, progress=False)
    assert again.metrics["test"]["accuracy"] == pytest.approx(trained_tiny_run.metrics["test"]["accuracy"])
    assert again.metrics["history"][-1]["train_loss"] == pytest.approx(
        trained_tiny_run.metrics["history"][-1]["train_loss"], rel=1e-4)


def test_max_steps_and_fractional_epochs(tiny_config, capsys):
    result = run_training(tiny_config(max_steps=3), progress=False)
    assert "epoch 1" not in capsys.readouterr().err  # progress=False hides the epoch bar too
    assert result.metrics["training"]["steps"] == 3 and len(result.metrics["history"]) == 1
    half = run_training(tiny_config(run_name="half", epochs=0.5), progress=False)
    assert half.metrics["training"]["steps"] == 10  # 320 train texts / 16 per batch = 20 steps per epoch


def method_run(shared_tiny_run, method: str):
    """A finished 2-epoch run of the method, shared with test_evaluate's."""
    return shared_tiny_run(method=method, run_name=method, epochs=2, learning_rate=1e-3 if method == "full" else 1e-2)


@pytest.mark.parametrize("method", ["head", "full", "qlora", "int8"])
def test_other_methods_train_and_save(shared_tiny_run, method):
    result = method_run(shared_tiny_run, method)
    saved = result.run_dir / ("adapter" if method in ("qlora", "int8") else "model")
    assert saved.is_dir() and result.metrics["saved"] == saved.name
    assert result.metrics["test"]["accuracy"] > 0.6
    if method == "head":
        assert result.metrics["parameters"]["share"] < 0.2


def test_existing_run_is_never_overwritten(tiny_config):
    first = run_training(tiny_config(max_steps=1), progress=False)
    before = (first.run_dir / "metrics.json").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        run_training(tiny_config(max_steps=1), progress=False)
    assert (first.run_dir / "metrics.json").read_bytes() == before


def test_failed_run_leaves_an_incomplete_directory_only(tiny_config, monkeypatch):
    import lightune.steps as steps

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(steps, "train_steps", explode)
    cfg = tiny_config(run_name="boom")
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, progress=False)
    root = cfg.output_dir
    from pathlib import Path

    assert not (Path(root) / "boom").exists()
    failed = Path(root) / "boom.incomplete"
    assert failed.is_dir() and (failed / "error.txt").is_file()
    assert not runs.is_complete_run(failed)
    assert not list(Path(root).glob(".boom*"))


@pytest.mark.parametrize("max_steps", [None, 1])
def test_weights_that_become_nan_stop_the_run(tiny_config, monkeypatch, max_steps):
    """A NaN loss stops training at once; weights broken by the last step are caught by the evaluation after it."""
    import torch

    import lightune.training as training

    real_build = training.build_optimizer

    def poisoned(model, cfg, device):
        optimizer = real_build(model, cfg, device)
        step = optimizer.step

        def step_then_nan(*args, **kwargs):
            step(*args, **kwargs)
            with torch.no_grad():
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.fill_(float("nan"))
        optimizer.step = step_then_nan
        return optimizer

    monkeypatch.setattr(training, "build_optimizer", poisoned)
    cfg = tiny_config(run_name="nan", max_steps=max_steps)
    message = "training diverged: the loss is nan at step 2 of epoch 1" if max_steps is None else \
        "the loss of the validation split after epoch 1 is nan"
    with pytest.raises(TrainingError, match=message):
        run_training(cfg, progress=False)
    from pathlib import Path

    root = Path(cfg.output_dir)
    assert not (root / "nan").exists() and (root / "nan.incomplete" / "error.txt").is_file()
    assert not (root / "nan.incomplete" / "metrics.json").exists()


def test_max_length_is_capped_at_the_model_positions(tiny_config, tmp_path, capsys):
    from conftest import NEGATIVE, POSITIVE

    rows = [(" ".join([POSITIVE[i % 8] if i % 2 else NEGATIVE[i % 8]] * 90) + f" {i}", "pos" if i % 2 else "neg")
            for i in range(60)]
    data = write_csv(tmp_path / "long.csv", rows)
    result = run_training(tiny_config(data=str(data), max_length=100, max_steps=2), progress=False)
    assert result.metrics["max_length"] == 64  # the tiny model has 64 positions
    out = capsys.readouterr().out
    assert f"max_length 100 is more than {tiny_config().model} takes; using 64" in out


def test_staged_dir_publishes_only_on_success(tmp_path):
    final = tmp_path / "run"
    with runs.staged_run_dir(final) as work:
        (work / "file.txt").write_text("x")
        assert not final.exists()
    assert (final / "file.txt").read_text() == "x"


def test_a_failed_run_never_removes_an_existing_directory(tmp_path):
    final = tmp_path / "victim"
    earlier = tmp_path / "victim.incomplete"
    earlier.mkdir()
    (earlier / "metrics.json").write_text('{"kept": true}')
    for attempt in (2, 3):
        with pytest.raises(RuntimeError), runs.staged_run_dir(final) as work:
            (work / "config.json").write_text("{}")
            raise RuntimeError(f"attempt {attempt}")
        kept = tmp_path / f"victim.incomplete-{attempt}"
        assert f"RuntimeError: attempt {attempt}" in (kept / "error.txt").read_text()
    assert (earlier / "metrics.json").read_text() == '{"kept": true}' and not final.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.incomplete", "victim.incomplete-2",
                                                           "victim.incomplete-3"]


def test_failure_names_the_kept_directory_on_the_exception(tmp_path):
    with pytest.raises(KeyboardInterrupt) as err, runs.staged_run_dir(tmp_path / "run"):
        raise KeyboardInterrupt
    assert err.value.incomplete_run_dir == tmp_path / "run.incomplete"


def test_a_run_that_appears_while_training_is_kept_not_replaced(tmp_path):
    final = tmp_path / "run"
    with pytest.raises(ConfigError, match="appeared while training; this run is kept in .*run.incomplete"):
        with runs.staged_run_dir(final) as work:
            (work / "metrics.json").write_text("new")
            final.mkdir()  # another process finished a run of the same name meanwhile
            (final / "metrics.json").write_text("other")
    assert (final / "metrics.json").read_text() == "other"
    assert (tmp_path / "run.incomplete" / "metrics.json").read_text() == "new"


def test_metrics_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError, match="not JSON compliant"):
        runs.write_json(tmp_path / "metrics.json", {"loss": float("nan")})
    assert not list(tmp_path.iterdir())  # neither the file nor a temporary one


def test_chunked_backward_gives_the_same_gradient_as_one_batch(tiny_model_dir):
    import torch
    from accelerate import Accelerator

    from lightune import models
    from lightune.config import from_dict
    from lightune.steps import backward_in_chunks, split_batch

    cfg = from_dict({"model": str(tiny_model_dir), "dropout": 0.0})
    model = models.prepare_for_training(models.load_base_model(cfg.model, ["neg", "pos"]), cfg).eval()
    torch.manual_seed(0)
    lengths = [12, 12, 11, 9, 7, 7, 5, 3]
    ids = torch.zeros(8, 12, dtype=torch.long)
    mask = torch.zeros(8, 12, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(5, 40, (n,))
        mask[row, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1] * 4)}

    def grads(max_tokens):
        model.zero_grad()
        loss = backward_in_chunks(model, dict(batch), Accelerator(cpu=True), max_tokens)
        return loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    whole_loss, whole = grads(None)
    chunk_loss, chunked = grads(30)  # 2 rows of width 12 per chunk; later chunks trimmed to their longest text
    assert len(split_batch(batch, 30)) == 4 and split_batch(batch, 30)[3]["input_ids"].shape == (2, 5)
    assert chunk_loss == pytest.approx(whole_loss, rel=1e-5)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # on a GPU chunks keep the batch's fixed width (no mask read, no host sync): the same gradient
    assert [c["input_ids"].shape for c in split_batch(batch, 30, trim=False)] == [(2, 12)] * 4
    model.zero_grad()
    untrimmed_loss = backward_in_chunks(model, dict(batch), Accelerator(cpu=True), 30, trim=False)
    assert untrimmed_loss == pytest.approx(whole_loss, rel=1e-5)
    for a, p in zip(whole, [p for p in model.parameters() if p.requires_grad]):
        torch.testing.assert_close(p.grad, a, rtol=1e-4, atol=1e-6)


def test_gpu_micro_batches_are_chosen_by_a_token_budget_for_the_device_memory():
    from types import SimpleNamespace

    import torch

    from lightune.config import from_dict
    from lightune.steps import chunk_budgets, gpu_train_tokens

    minilm = SimpleNamespace(hidden_size=384, num_hidden_layers=6)  # 64 bytes x 384 x 6 = 147,456 bytes a token
    gib = 2 ** 30
    assert gpu_train_tokens(80 * gib, minilm) == 145635  # a quarter of 80 GiB
    assert gpu_train_tokens(141 * gib, minilm) == 256682
    assert gpu_train_tokens(16 * gib, minilm) == 29127
    assert gpu_train_tokens(gib, minilm) == 8192  # the least
    assert gpu_train_tokens(80 * gib) == 36408  # BERT-base's sizes without a config: 64 x 768 x 12 bytes a token
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert chunk_budgets(from_dict({}), cuda, minilm, total_memory=80 * gib) == (145635, 65536)
    assert chunk_budgets(from_dict({"chunk_tokens": 1000}), cuda, minilm, total_memory=80 * gib) == (1000, 1000)
    assert chunk_budgets(from_dict({}), cpu, minilm) == (2048, 2048)
    # the contrastive objective (adapters on every linear layer) trains in chunks of half the budget on CPU
    assert chunk_budgets(from_dict({"objective": "contrastive"}), cpu, minilm) == (1024, 2048)
    assert chunk_budgets(from_dict({"objective": "contrastive", "chunk_tokens": 4096}), cpu, minilm) == (4096, 4096)
    # --batch-size stays the optimizer's batch: 512 texts of 512 tokens run in two chunks of 284 and 228 rows
    budget = gpu_train_tokens(80 * gib, minilm)
    assert budget // 512 == 284


def test_training_batches_are_pinned_and_prefetched_on_cuda():
    import datasets

    from lightune.steps import loader_options, make_train_loader

    assert loader_options("cuda", 0) == {"num_workers": 0, "pin_memory": True}
    assert loader_options("cuda", 2) == {"num_workers": 2, "pin_memory": True, "prefetch_factor": 4}
    assert loader_options("cpu", 2) == {"num_workers": 2, "pin_memory": False}
    ds = datasets.Dataset.from_dict({"input_ids": [[2, 5, 3], [2, 6, 7, 3]], "attention_mask": [[1] * 3, [1] * 4],
                                     "labels": [0, 1], "length": [3, 4]})
    loader = make_train_loader(ds, None, 2, True, 0, 2, 64, "cuda")
    assert (loader.pin_memory, loader.num_workers, loader.prefetch_factor) == (True, 2, 4)
    assert not loader.persistent_workers  # each epoch's workers are seeded from the reseeded generator
    assert make_train_loader(ds, None, 2, False, 0, 0, None, "cpu").pin_memory is False


def test_token_budget_batches_cover_every_index_once():
    from lightune.forward import token_budget_batches

    lengths = [50, 3, 500, 20, 20, 7, 250, 1]
    batches = token_budget_batches(lengths, max_tokens=512, max_batch=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 512)
    assert [lengths[i] for b in batches for i in b] == sorted(lengths)


def test_optimizer_decays_the_same_parameters_as_the_trainer(tiny_model_dir, tmp_path):
    import torch
    from transformers import Trainer, TrainingArguments

    from lightune import models
    from lightune.config import from_dict
    from lightune.training import build_optimizer

    cfg = from_dict({"model": str(tiny_model_dir), "weight_decay": 0.05})
    model = models.prepare_for_training(models.load_base_model(cfg.model, ["neg", "pos"]), cfg)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    not_decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | not_decayed == trainable and not decayed & not_decayed
    assert any("lora_A" in n for n in decayed) and any(n.endswith("bias") for n in not_decayed)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    assert decayed == set(trainer.get_decay_parameter_names(model)) & trainable


def test_weighted_loss_equals_hand_computed_weighted_cross_entropy():
    import math

    import torch

    from lightune.objectives import weighted_cross_entropy

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [0.0, 0.0, 4.0], [1.0, -2.0, 0.5]])
    labels = torch.tensor([0, 2, 1, 2, 1])
    weights = torch.tensor([1.0, 2.0, 0.5])
    by_hand_terms, by_hand_weight = 0.0, 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        log_softmax = row[label] - math.log(sum(math.exp(v) for v in row))
        by_hand_terms += -weights[label].item() * log_softmax
        by_hand_weight += weights[label].item()
    total_weight = weights[labels].sum()
    whole = weighted_cross_entropy(logits, labels, weights, total_weight)
    assert whole.item() == pytest.approx(by_hand_terms / by_hand_weight, rel=1e-6)
    assert whole.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels, weight=weights).item())
    chunks = weighted_cross_entropy(logits[:2], labels[:2], weights, total_weight) + weighted_cross_entropy(
        logits[2:], labels[2:], weights, total_weight)
    assert chunks.item() == pytest.approx(whole.item(), rel=1e-6)  # chunks of a batch add up to the batch's loss
    unweighted = weighted_cross_entropy(logits, labels, None, len(labels))
    assert unweighted.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())


def test_balanced_class_weights_are_n_over_classes_times_count():
    import torch

    from lightune.objectives import class_weight_tensor

    weights = class_weight_tensor("balanced", [0, 0, 0, 1, 2, 2], 4, torch.device("cpu"))  # class 3 has no rows
    assert weights.tolist() == pytest.approx([6 / (3 * 3), 6 / (3 * 1), 6 / (3 * 2), 1.0])
    assert class_weight_tensor("none", [0, 1], 2, torch.device("cpu")) is None
    assert class_weight_tensor([1.0, 3.0], [0, 1], 2, torch.device("cpu")).tolist() == [1.0, 3.0]


def test_binary_metrics_per_class_balanced_accuracy_and_aucs():
    import numpy as np

    from lightune.evaluation import classification_metrics

    labels = np.array([0, 0, 0, 1])
    probabilities = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    metrics = classification_metrics(labels, probabilities.argmax(1), 2, probabilities, ["neg", "pos"])
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["per_class"]["neg"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": 0.8, "support": 3}
    assert metrics["per_class"]["pos"]["precision"] == 0.5 and metrics["per_class"]["pos"]["support"] == 1
    assert metrics["roc_auc"] == 1.0 and metrics["pr_auc"] == 1.0  # the one positive has the highest score
    one_class = classification_metrics(np.array([0, 0]), np.array([0, 1]), 2, probabilities[:2], ["neg", "pos"])
    assert one_class["roc_auc"] is None and one_class["pr_auc"] is None
    three = classification_metrics(np.array([0, 1, 2]), np.array([0, 1, 1]), 3, np.eye(3))
    assert "roc_auc" not in three and set(three["per_class"]) == {"0", "1", "2"}


def test_class_weights_train_and_are_checked_before_the_model_loads(tiny_config, monkeypatch):
    from lightune import models

    run = run_training(tiny_config(class_weights="balanced", epochs=1, run_name="balanced"), progress=False)
    test = run.metrics["test"]
    assert set(test["per_class"]) == {"neg", "pos"} and 0 <= test["roc_auc"] <= 1 and 0 <= test["pr_auc"] <= 1
    assert run.metrics["config"]["class_weights"] == "balanced"
    report = (run.run_dir / "report.md").read_text()
    assert "Balanced accuracy" in report and "| pos |" in report

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_base_model", refuse)
    with pytest.raises(ConfigError, match=r"class_weights gives 3 weight\(s\) for 2 labels \(neg, pos\)"):
        run_training(tiny_config(class_weights=[1.0, 2.0, 3.0], run_name="three"), progress=False)
    with pytest.raises(ConfigError, match="class_weights must be > 0"):
        tiny_config(class_weights=[1.0, 0.0])


def test_eval_steps_keep_the_best_checkpoint_and_stop_early(tiny_config, monkeypatch):
    """Evaluations every 4 steps; from the third on they are reported worse, so the best is an early one: the
    saved run gives that evaluation's validation loss (not the last one's), and patience 2 stops training."""
    import torch

    import lightune.training as training
    from lightune.data import build_splits
    from lightune.inference import Classifier

    real_evaluate, true_losses = training.evaluate_with_logits, []

    def evaluate(model, loader, n_classes, accelerator, desc, *args, **kwargs):
        metrics, logits, labels = real_evaluate(model, loader, n_classes, accelerator, desc, *args, **kwargs)
        if desc.startswith("validation"):
            true_losses.append(metrics["loss"])
            if len(true_losses) > 2:
                metrics = {**metrics, "loss": metrics["loss"] + 10}
        return metrics, logits, labels

    monkeypatch.setattr(training, "evaluate_with_logits", evaluate)
    cfg = tiny_config(run_name="best", eval_steps=4, early_stopping_patience=2, epochs=3)
    result = run_training(cfg, progress=False)
    metrics = result.metrics
    history, best = metrics["history"], metrics["best"]
    assert [h["step"] for h in history] == [4, 8, 12, 16] and metrics["training"]["steps"] == 16
    assert metrics["training"]["stopped_early"] and best["metric"] == "loss" and best["step"] in (4, 8)
    assert best["value"] == min(h["validation"]["loss"] for h in history)
    on_disk = json.loads((result.run_dir / "metrics.json").read_text())
    assert on_disk["best"] == best
    splits = build_splits(cfg)
    logits = Classifier(result.run_dir, merge=False).logits(list(splits.validation["text"]))
    saved_loss = torch.nn.functional.cross_entropy(logits, torch.tensor(splits.validation["label"])).item()
    assert saved_loss == pytest.approx(true_losses[best["step"] // 4 - 1], abs=1e-5)
    assert saved_loss != pytest.approx(true_losses[-1], abs=1e-4)
    assert _is_png(result.run_dir / "plots" / "history.png")


def test_bad_evaluation_options_fail_before_loading(tiny_config):
    with pytest.raises(ConfigError, match="metric_for_best must be one of loss, accuracy, f1"):
        tiny_config(metric_for_best="precision")
    with pytest.raises(ConfigError, match="eval_steps must be >= 1"):
        tiny_config(eval_steps=0)
    with pytest.raises(ConfigError, match="early_stopping_patience must be >= 1"):
        tiny_config(early_stopping_patience=0)


def test_fixed_padded_widths_give_the_logits_and_gradients_of_dynamic_padding(tiny_model_dir):
    """GPU batches are padded to a few fixed widths (forward.pad_multiple): the extra padding changes nothing."""
    import torch
    from accelerate import Accelerator
    from transformers import DataCollatorWithPadding

    from lightune import forward, heads, models
    from lightune.config import from_dict
    from lightune.steps import backward_in_chunks

    assert forward.pad_multiple("cpu", 256) is None
    assert [forward.pad_multiple("cuda", n) for n in (64, 128, 256, 512, 1024, 200, 100)] == [8, 16, 32, 64, 64, 8, 4]
    tokenizer = models.load_tokenizer(str(tiny_model_dir))
    texts = ["a wonderful film", "dull and far too long, with a plot that goes nowhere", "fine"]
    features = [dict(tokenizer(t), labels=i % 2) for i, t in enumerate(texts)]
    dynamic = DataCollatorWithPadding(tokenizer)(features)
    fixed = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=forward.pad_multiple("cuda", 512))(features)
    assert dynamic["input_ids"].shape[1] < 64 and fixed["input_ids"].shape[1] == 64
    for pooling in ("cls", "mean"):
        cfg = from_dict({"model": str(tiny_model_dir), "dropout": 0.0})
        torch.manual_seed(0)
        base = models.load_base_model(cfg.model, ["neg", "pos"])
        heads.apply_pooling(base, pooling)
        model = models.prepare_for_training(base, cfg).eval()

        def logits_and_grads(batch):
            model.zero_grad()
            backward_in_chunks(model, dict(batch), Accelerator(cpu=True), None)
            with torch.no_grad():
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            return logits, [p.grad.clone() for p in model.parameters() if p.requires_grad]

        (logits_a, grads_a), (logits_b, grads_b) = logits_and_grads(dynamic), logits_and_grads(fixed)
        torch.testing.assert_close(logits_a, logits_b, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_run_below_its_base_is_warned_about(tiny_config, monkeypatch, capsys):
    import lightune.training as training

    real = training.TrainingRun.evaluate

    def evaluate(self, loader, desc, thresholds=None):
        metrics = real(self, loader, desc, thresholds)
        return {**metrics, "accuracy": 1.0} if desc == "base model on test" else metrics  # a base nothing beats

    monkeypatch.setattr(training.TrainingRun, "evaluate", evaluate)
    m = run_training(tiny_config(max_steps=1, run_name="below"), progress=False).metrics
    assert m["test"]["accuracy"] < 1.0
    expected = (f"the fine-tuned model is below its base on test (accuracy {m['test']['accuracy']:.4f} vs 1.0000, "
                "untrained head/adapters); more data, more steps or another learning rate may help")
    assert f"warning: {expected}" in capsys.readouterr().err.splitlines()
    assert expected in m["warnings"]


def test_report_names_the_base_models_head_start_as_the_log_does(trained_tiny_run):
    metrics = trained_tiny_run.metrics
    assert "| base (untrained head/adapters) |" in reporting.report_markdown(metrics)  # --head-init random
    probe = {**metrics, "config": {**metrics["config"], "head_init": "probe"}}
    assert "| base (linear probe head) |" in reporting.report_markdown(probe)
    assert reporting.base_start("probe") == "linear probe head"
