"""The few-shot contrastive objective: its loss, when auto picks it, its settings, and training with it."""

from __future__ import annotations

import pytest
import torch

from lightune import objectives
from lightune.config import load_config
from lightune.errors import ConfigError
from lightune.evaluate_run import EvaluationOptions, run_evaluation
from lightune.inference import Classifier
from lightune.training import run_training, total_steps


def test_contrastive_loss_is_setfits_cosine_loss_over_every_pair():
    embeddings = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    unit = embeddings / embeddings.norm(dim=1, keepdim=True)
    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    expected = sum((float(unit[i] @ unit[j]) - float(labels[i] == labels[j])) ** 2 for i, j in pairs) / len(pairs)
    assert objectives.contrastive_loss(embeddings, labels).item() == pytest.approx(expected)
    # classes already apart (same class parallel, other class orthogonal): nothing to learn
    apart = torch.tensor([[1.0, 0.0], [5.0, 0.0], [0.0, 2.0], [0.0, 1.0]])
    assert objectives.contrastive_loss(apart, labels).item() == pytest.approx(0.0, abs=1e-7)


def config(**overrides):
    return load_config(overrides=dict(model="all-MiniLM-L6-v2", **overrides))


@pytest.mark.parametrize("overrides, n_train, pooling, expected", [
    ({}, 32, "mean", "contrastive"),
    ({}, objectives.FEW_SHOT_MAX_EXAMPLES, "mean", "contrastive"),
    ({}, objectives.FEW_SHOT_MAX_EXAMPLES + 1, "mean", "cross_entropy"),  # the default job: 2,500 examples
    ({}, 32, "cls", "cross_entropy"),
    ({"head_init": "random"}, 32, "mean", "cross_entropy"),
    ({"peft": "head"}, 32, "mean", "cross_entropy"),
    ({"problem": "multi_label", "label_columns": ["a", "b"]}, 32, "mean", "cross_entropy"),
    ({"objective": "cross_entropy"}, 32, "mean", "cross_entropy"),
    ({"objective": "contrastive"}, 5000, "mean", "contrastive"),
])
def test_auto_picks_the_contrastive_objective_for_few_shot_runs(overrides, n_train, pooling, expected):
    assert objectives.resolve_objective(config(**overrides), n_train, pooling) == expected


@pytest.mark.parametrize("overrides, pooling, message", [
    ({}, "cls", "objective contrastive needs mean pooling"),
    ({"head_init": "random"}, "mean", "objective contrastive needs --head-init probe"),
    ({"peft": "prompt"}, "mean", "objective contrastive needs a method that trains the encoder"),
])
def test_contrastive_is_refused_where_it_cannot_run(overrides, pooling, message):
    with pytest.raises(ConfigError, match=message):
        objectives.resolve_objective(config(objective="contrastive", **overrides), 32, pooling)


def test_the_objective_resolves_the_settings_left_to_it():
    few = objectives.resolved_settings(config(), "contrastive")
    assert few == {"objective": "contrastive", "metric_for_best": "accuracy", "learning_rate": pytest.approx(1e-3),
                   "group_by_length": False, "target_modules": ["all-linear"], "batch_size": 32}
    given = objectives.resolved_settings(config(learning_rate=2e-4, target_modules=["query"], metric_for_best="f1"),
                                         "contrastive")
    assert (given["learning_rate"], given["metric_for_best"], "target_modules" in given) == (2e-4, "f1", False)
    assert objectives.resolved_settings(config(peft="ia3"), "contrastive").get("target_modules") is None
    assert objectives.resolved_settings(config(), "cross_entropy") == {"objective": "cross_entropy",
                                                                       "metric_for_best": "loss"}
    def steps(cfg, steps_per_epoch):
        return total_steps(cfg, steps_per_epoch, objectives.least_steps("contrastive"))

    assert steps(config(), 1) == objectives.FEW_SHOT_MIN_STEPS  # 32 examples: 1 batch, raised to the minimum
    assert steps(config(epochs=100.0), 2) == 200 and steps(config(max_steps=7), 2) == 7
    assert total_steps(config(), 2, objectives.least_steps("cross_entropy")) == 2  # cross-entropy: as asked


def few_shot_config(tiny_config, reviews_csv, **overrides):
    """A few-shot run of the tiny model: 48 training examples, mean pooling, the default probe start."""
    values = dict(train_size=48, eval_size=64, pooling="mean", head_init="probe", learning_rate=None, max_steps=20)
    return tiny_config(**{**values, **overrides})


def test_a_few_shot_run_trains_contrastively_and_predicts_what_it_measured(tiny_config, reviews_csv, capsys):
    result = run_training(few_shot_config(tiny_config, reviews_csv), progress=False)
    m = result.metrics
    # auto said what it changed, and how to keep the given settings
    out = capsys.readouterr().out
    notice = [line for line in out.splitlines() if line.startswith("objective auto")]
    # 36 of the 48 given labels train: the other 12 are its validation split (--validation-labels auto)
    assert m["data"]["labelled"] == {"train": 36, "validation": 12, "total": 48, "validation_from": "given"}
    assert notice == ["objective auto chose contrastive for this few-shot run (36 training examples, at most 256): "
                      "20 steps, batch size 32, learning rate 0.001, targets all-linear, best by accuracy; to "
                      "keep the given settings add --objective cross_entropy"]
    assert m["training"]["objective"] == "contrastive" and m["training"]["steps"] == 20
    assert m["config"]["objective"] == "auto"  # as given; what it resolved to is saved beside it
    assert m["config"]["resolved"]["objective"] == "contrastive" and m["target_modules"] != ["query", "value"]
    assert m["config"]["resolved"]["target_modules"] == ["all-linear"]
    # the probe start is evaluated first; on 12 validation labels (under 20) nothing is chosen: the last is kept
    assert [h["step"] for h in m["history"]] == [0, 20] and m["best"]["step"] == 20
    assert "validation has 12 texts (under 20): too few to choose between evaluations; the last one is kept" in out
    assert m["test"]["accuracy"] > 0.75  # the sentiment words decide the label
    # the refitted head is saved with the adapters: a reload scores the test split as training did
    again = run_evaluation(EvaluationOptions(str(result.run_dir), device="cpu"), progress=False).result
    assert again["metrics"]["accuracy"] == m["test"]["accuracy"]
    assert again["metrics"]["loss"] == pytest.approx(m["calibration"]["test_nll_after"], abs=1e-5)  # at its T
    assert [p["label"] for p in Classifier(result.run_dir).predict(["great superb loved", "awful dull mess"])] == [
        "pos", "neg"]


def test_a_contrastive_run_worse_than_its_probe_start_keeps_the_start(tiny_config, reviews_csv):
    # a learning rate that wrecks the embeddings: the saved model is the probe start, adapters at zero (96 labels:
    # 24 validate, enough to choose)
    result = run_training(few_shot_config(tiny_config, reviews_csv, learning_rate=1.0, max_grad_norm=0.0,
                                          train_size=96, run_name="wrecked"), progress=False)
    m = result.metrics
    assert m["data"]["labelled"]["validation"] == 24
    assert m["best"]["step"] == 0 and m["history"][-1]["validation"]["accuracy"] < m["history"][0]["validation"][
        "accuracy"]
    assert m["test"]["accuracy"] == pytest.approx(m["base"]["accuracy"])
    from safetensors.torch import load_file

    saved = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    lora_b = [weight for name, weight in saved.items() if "lora_B" in name]
    assert lora_b and all(torch.count_nonzero(weight) == 0 for weight in lora_b)  # the adapters' start


def test_the_tuned_model_wins_a_tie_with_its_probe_start():
    from lightune.checkpoints import BestCheckpoint

    start = {"validation": {"accuracy": 0.75, "loss": 0.5}}
    contrastive, other = BestCheckpoint("accuracy", None, ties_to_later=True), BestCheckpoint("accuracy", None)
    assert contrastive.improves(start, {"accuracy": 0.75, "loss": 0.6})  # 6 of 8 both: the tuned model
    assert not other.improves(start, {"accuracy": 0.75, "loss": 0.6})
    assert not contrastive.improves(start, {"accuracy": 0.625, "loss": 0.4})


def test_a_handful_of_validation_texts_chooses_nothing():
    from lightune.checkpoints import BestCheckpoint

    start = {"validation": {"accuracy": 0.75, "loss": 0.5}}
    # 5 of 8 after 6 of 8: one review apart, so the latest is kept (selects=False: under 20 validation texts)
    assert BestCheckpoint("accuracy", None, True, selects=False).improves(start, {"accuracy": 0.625, "loss": 0.7})
    assert BestCheckpoint("loss", None, selects=False).improves(start, {"accuracy": 0.75, "loss": 0.9})


def test_cross_entropy_runs_record_their_objective(tiny_config):
    m = run_training(tiny_config(max_steps=2), progress=False).metrics
    assert m["training"]["objective"] == "cross_entropy" and m["best"]["metric"] == "loss"


def test_auto_notice_names_the_raised_steps_and_nothing_for_cross_entropy():
    given = load_config(overrides=dict(train_size=64, pooling="mean"))  # LoRA's 3e-3, a third of it contrastive
    resolved = load_config(overrides=dict(train_size=64, pooling="mean", **{
        k: v for k, v in objectives.resolved_settings(given, "contrastive").items() if k != "objective"}))
    notice = objectives.auto_notice(given, resolved, "contrastive", 64, 40)
    assert notice.startswith("objective auto chose contrastive for this few-shot run (64 training examples, at most "
                             "256): 40 steps (the given epochs/max_steps give 4), batch size 32, learning rate 0.001, ")
    assert notice.endswith("; to keep the given settings add --objective cross_entropy")
    assert objectives.auto_notice(given, given, "cross_entropy", 2500, 157) is None
    given_objective = load_config(overrides=dict(objective="contrastive", pooling="mean"))
    assert objectives.auto_notice(given_objective, resolved, "contrastive", 64, 40) is None


# -- the gradient-cached contrastive step (a batch over the token budget embedded in chunks) ------------------------

def contrastive_model(tiny_config, dropout: float):
    """The tiny model as a few-shot run trains it (mean pooling, LoRA on every linear layer), every dropout at
    `dropout` and in train mode, the LoRA B matrices moved off zero so that every adapter weight gets a gradient."""
    from lightune import heads, models

    cfg = tiny_config(pooling="mean", target_modules=["all-linear"], dropout=max(dropout, 0.1))
    model = models.load_base_model(cfg.model, ["neg", "pos"])
    heads.apply_pooling(model, "mean")
    model = models.prepare_for_training(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert len(dropouts) > 5  # embeddings, attention, hidden states, LoRA inputs, classifier
    for module in dropouts:
        module.p = dropout
    return model.train()


def contrastive_batch(tiny_model_dir, n: int = 10) -> dict:
    """n synthetic reviews of different lengths, padded to the longest, with their labels."""
    from conftest import synthetic_reviews

    from lightune.models import load_tokenizer

    rows = synthetic_reviews(n, seed=3)
    batch = dict(load_tokenizer(str(tiny_model_dir))([t for t, _ in rows], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([int(label == "pos") for _, label in rows])
    return batch


def row_chunks(batch: dict, rows: int) -> list[dict]:
    """The batch cut as training cuts it (steps.split_batch), `rows` texts per chunk."""
    from lightune.steps import split_batch

    return split_batch(batch, rows * batch["input_ids"].shape[1])


def gradients(model) -> dict:
    """Every trainable parameter's gradient (None where it got none), then cleared."""
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()
             if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_gradients(got: dict, expected: dict, atol: float = 1e-6) -> None:
    assert got.keys() == expected.keys()
    assert any("lora_A" in name for name, g in got.items() if g is not None)
    for name, grad in expected.items():
        if grad is None:
            assert got[name] is None, name
        else:
            assert torch.allclose(got[name], grad, rtol=1e-5, atol=atol), (name, (got[name] - grad).abs().max())


def contrastive_step(model, batch: dict, chunks: list[dict] | None, seed: int = 0) -> tuple[float, dict, torch.Tensor]:
    """backward_contrastive from the random state `seed`: (its loss, the gradients, the random state after it)."""
    from accelerate import Accelerator

    torch.manual_seed(seed)
    with objectives.PooledEmbeddings(model) as embeddings:
        loss = objectives.backward_contrastive(model, batch, Accelerator(cpu=True), embeddings, chunks)
    return loss.item(), gradients(model), torch.get_rng_state()


def graph_over_chunks(model, batch: dict, chunks: list[dict], seed: int = 0) -> tuple[float, dict, torch.Tensor]:
    """The one-pass step's gradients of the same forward passes: every chunk forward with a graph (drawing the
    same dropout masks as the chunked step's chunks do), the pair loss of them all, one backward."""
    torch.manual_seed(seed)
    with objectives.PooledEmbeddings(model) as embeddings:
        pooled = []
        for chunk in chunks:
            model(**{k: v for k, v in chunk.items() if k != "labels"})
            pooled.append(embeddings.value)
    loss = objectives.contrastive_loss(torch.cat(pooled), batch["labels"])
    loss.backward()
    return loss.item(), gradients(model), torch.get_rng_state()


@pytest.mark.parametrize("rows, sizes", [(1, [1] * 10), (3, [3, 3, 3, 1]), (4, [4, 4, 2]), (10, [10])])
def test_the_chunked_contrastive_step_has_the_one_pass_loss_and_gradients(tiny_config, tiny_model_dir, rows, sizes):
    model = contrastive_model(tiny_config, dropout=0.0)
    batch = contrastive_batch(tiny_model_dir)
    chunks = row_chunks(batch, rows)
    assert [len(chunk["labels"]) for chunk in chunks] == sizes  # the last chunk uneven; one chunk: one pass
    loss, grads, _ = contrastive_step(model, batch, chunks)
    one_pass_loss, one_pass, _ = contrastive_step(model, batch, None)
    assert loss == pytest.approx(one_pass_loss, rel=1e-6) and loss > 0.01
    assert_same_gradients(grads, one_pass)


@pytest.mark.parametrize("rows", [1, 3, 4])
def test_the_chunked_step_replays_each_chunks_dropout_masks(tiny_config, tiny_model_dir, rows):
    model = contrastive_model(tiny_config, dropout=0.3)
    batch = contrastive_batch(tiny_model_dir)
    chunks = row_chunks(batch, rows)
    loss, grads, state_after = contrastive_step(model, batch, chunks)
    expected_loss, expected, expected_state = graph_over_chunks(model, batch, chunks)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert_same_gradients(grads, expected)
    # each mask is drawn once: the step leaves the random state where the one pass over its chunks does
    assert torch.equal(state_after, expected_state)
    # and the dropout is live: other masks give another loss
    assert graph_over_chunks(model, batch, chunks, seed=1)[0] != pytest.approx(expected_loss, rel=1e-3)


def test_without_the_replayed_random_state_the_chunked_gradients_differ(tiny_config, tiny_model_dir, monkeypatch):
    # what the test above guards against: the second pass of each chunk drawing new dropout masks
    import contextlib

    model = contrastive_model(tiny_config, dropout=0.3)
    batch = contrastive_batch(tiny_model_dir)
    chunks = row_chunks(batch, 3)
    monkeypatch.setattr(objectives.ChunkRandomState, "replay", lambda self: contextlib.nullcontext())
    _, grads, _ = contrastive_step(model, batch, chunks)
    _, expected, _ = graph_over_chunks(model, batch, chunks)
    with pytest.raises(AssertionError):
        assert_same_gradients(grads, expected)


def test_a_few_shot_run_over_the_token_budget_trains_as_one_pass_does(tiny_config, reviews_csv):
    # dropout off (LoRA's; the tiny model has none): chunks of 64 tokens give the same run as whole batches
    runs = {tokens: run_training(few_shot_config(tiny_config, reviews_csv, max_steps=4, dropout=0.0, chunk_tokens=tokens,
                                                 run_name=f"chunks-{tokens}"), progress=False).metrics
            for tokens in (None, 64)}
    whole, chunked = runs[None], runs[64]
    assert chunked["history"][-1]["train_loss"] == pytest.approx(whole["history"][-1]["train_loss"], rel=1e-5)
    assert chunked["test"]["accuracy"] == whole["test"]["accuracy"]
