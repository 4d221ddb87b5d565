"""Self-training on unlabelled texts (--unlabeled): after the run's own training, the tuned model pseudo-labels a
fresh share of the unlabelled texts in each round; the most confident of them, as many for each label, join the
labelled examples for one epoch of cross-entropy; and the round's model replaces the best so far only when it is
at least as good on validation, by the run's metric and by the loss (round_is_kept). Validation and test are
labelled data only, so a run with --unlabeled never ends below the same run without it on validation: that run's
model is the first candidate.

Why this way on a CPU: pseudo-labelling reads each unlabelled text once (a no-grad forward through
forward.forward_logits, at most SELF_TRAINING_MAX_LENGTH tokens), and training on the selected texts is one epoch
of cross-entropy, the cheapest step lightune has. Before that epoch the head is refitted as a linear probe on the
pooled features of the labelled and the selected texts (read in the same forward pass), so the epoch starts from
a head that agrees with the pseudo-labels instead of from one fitted on a few dozen texts. The share selected
grows from round to round (round r of R keeps r / (R + 1) of the texts it scored), as the model that labels them
gets better. A round scores at most ROUND_TEXTS texts, so the time of a run grows with the rounds, not with
--unlabeled-size.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data as data_mod
from . import forward, heads, steps
from .config import PACKAGED_UNLABELED
from .errors import ConfigError, DataError, TrainingError
from .texts import check_text_file, clean_text, is_blank

# pseudo-labelling and the rounds' training read at most this many tokens of a text (the run's max_length if
# lower): IMDb reviews run about twice as fast at 128 as at 256 tokens; validation and test keep the run's own
SELF_TRAINING_MAX_LENGTH = 128
# the most unlabelled texts a round pseudo-labels (a fresh share of those read each round): 3 rounds score 12,000
# of IMDb's 20,000 and train on 6,000 of them, which keeps a 32-label run with --unlabeled packaged near 15
# minutes on a 2-core CPU (pseudo-labelling and training are most of it)
ROUND_TEXTS = 4000
TEXT_FILE = ".txt"  # one text a line; other files are read by sources.read_file


@dataclass
class UnlabeledTexts:
    """The unlabelled texts a run uses, in the seeded order the rounds take them in, and how they were read."""

    source: str
    texts: list[str]
    labels: list[int] | None  # the packaged source's own labels: only to report how often pseudo-labels agree
    counts: dict  # read, blank, dropped (in the test, validation or train split, repeated), used


def read_unlabeled(cfg, splits: data_mod.SplitData, accelerator=None) -> UnlabeledTexts:
    """The unlabelled texts of cfg.unlabeled, cleaned, without repeats and without any text of the run's splits
    (test, validation, train: dropped and counted, in one log line), in a seeded order, at most cfg.unlabeled_size
    of them. DataError (one line) for a missing, unreadable, empty or non-text source or one left without texts;
    ConfigError under several processes."""
    if accelerator is not None and accelerator.num_processes > 1:
        raise ConfigError("--unlabeled (self-training) runs in one process; train without accelerate launch")
    if cfg.unlabeled == PACKAGED_UNLABELED:
        raw, labels = list(splits.unused["text"]), list(splits.unused["label"])
        where = f"packaged ({cfg.data} texts outside the run's splits)"
    else:
        raw, labels = read_text_source(Path(cfg.unlabeled), cfg.unlabeled_column or cfg.text_column), None
        where = cfg.unlabeled
    texts, kept_labels, counts = drop_known_texts(raw, labels, splits)
    if not texts:
        if counts["read"] == counts["blank"]:
            raise DataError(f"{where} holds no texts")
        raise DataError(f"--unlabeled {where}: none of its {counts['read']:,} texts is left once the texts of the "
                        f"run's splits and repeats are dropped ({dropped_summary(counts)}); give texts the run "
                        "does not use")
    order = np.random.default_rng(cfg.split_seed).permutation(len(texts))[:cfg.unlabeled_size or len(texts)]
    counts["used"] = len(order)
    say(f"unlabelled texts: read {counts['read']:,} from {where}; dropped {dropped_summary(counts)}; using "
        f"{counts['used']:,}" + (" (--unlabeled-size)" if counts["used"] < len(texts) else ""), accelerator)
    return UnlabeledTexts(cfg.unlabeled, [texts[i] for i in order],
                          None if kept_labels is None else [kept_labels[i] for i in order], counts)


def read_text_source(path: Path, column: str) -> list:
    """The texts of a file: the lines of a .txt file, else the column of a data file (sources.read_file); None or
    blank entries stay (drop_known_texts counts them). DataError for a missing or unreadable file, a missing column
    or one that does not hold texts."""
    if not path.is_file():
        raise DataError(f"unlabelled texts not found: {str(path)!r} is neither a file nor {PACKAGED_UNLABELED!r}")
    if path.suffix.lower() == TEXT_FILE:
        check_text_file(path)  # names the place of a bad byte or NUL: a binary file is no text
        return path.read_text(encoding="utf-8").removeprefix("\ufeff").split("\n")
    from .sources import FILE_FORMATS, read_file

    if path.suffix.lower() not in FILE_FORMATS:
        raise DataError(f"unsupported unlabelled file type {path.suffix!r} for {path} (use .txt, one text a line, "
                        "or .csv, .tsv, .jsonl, .json, .parquet with a text column)")
    ds = read_file(path)
    if column not in ds.column_names:
        raise DataError(f"{path} has no column {column!r} (columns: {', '.join(ds.column_names)}); set "
                        "--unlabeled-column")
    values = ds[column]
    for i, value in enumerate(values):
        if value is not None and not isinstance(value, str):
            raise DataError(f"{path}: the column {column!r} holds {type(value).__name__} values, not texts (row "
                            f"{i + 1}: {value!r}); set --unlabeled-column")
    return values


def drop_known_texts(raw: list, labels: list[int] | None, splits: data_mod.SplitData
                     ) -> tuple[list[str], list[int] | None, dict]:
    """The cleaned texts of raw that are not blank, not in the test, validation or train split and not repeats,
    with their labels (when known), and the counts of each."""
    known = {name: set(getattr(splits, name)["text"]) for name in ("test", "validation", "train")}
    counts = {"read": len(raw), "blank": 0, "test": 0, "validation": 0, "train": 0, "repeated": 0}
    texts, kept_labels, taken = [], [], set()
    for i, text in enumerate(raw):
        if text is None or is_blank(text):
            counts["blank"] += 1
            continue
        text = clean_text(text)
        split = next((name for name, split_texts in known.items() if text in split_texts), None)
        if split is not None or text in taken:
            counts[split or "repeated"] += 1
            continue
        taken.add(text)
        texts.append(text)
        if labels is not None:
            kept_labels.append(labels[i])
    return texts, (kept_labels if labels is not None else None), counts


def dropped_summary(counts: dict) -> str:
    return (f"{counts['test']:,} in the test split, {counts['validation']:,} in validation, {counts['train']:,} in "
            f"train, {counts['repeated']:,} repeated, {counts['blank']:,} blank")


def say(message: str, accelerator=None) -> None:
    """One line above the progress bars (main process)."""
    if accelerator is None or accelerator.is_main_process:
        tqdm.write(message)


def round_max_length(run) -> int:
    return min(run.max_length, SELF_TRAINING_MAX_LENGTH)


def per_label_counts(n_scored: int, round_no: int, rounds: int, n_labels: int) -> int:
    """How many pseudo-labels of each label round round_no (from 1) of rounds keeps of n_scored texts: the share
    r / (rounds + 1) of them, spread evenly over the labels."""
    return int(n_scored * round_no / (rounds + 1) / n_labels)


def select_balanced(probabilities: torch.Tensor, per_label: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, pseudo-labels) of the most confident texts, as many for each label: for each label the texts
    predicted as it, most probable first, per_label of them but no more than the least predicted label has."""
    confidence, predicted = probabilities.max(dim=-1)
    n_labels = probabilities.shape[1]
    least = min(int((predicted == label).sum()) for label in range(n_labels))
    k = min(per_label, least)
    chosen = []
    for label in range(n_labels):
        rows = (predicted == label).nonzero().flatten()
        chosen.append(rows[confidence[rows].argsort(descending=True, stable=True)[:k]])
    indices = torch.cat(chosen)
    return indices.numpy(), predicted[indices].numpy()


@torch.no_grad()
def score_texts(run, texts: list[str], desc: str) -> tuple[torch.Tensor, np.ndarray]:
    """Probabilities and pooled features (the head's input) of texts under the model being trained: the one
    forward pass (forward.forward_logits) over length-sorted token-budget batches, at round_max_length tokens."""
    model = run.unwrapped()  # eager (not torch.compile's): the hook below sees every batch
    layer = heads.final_linear(model)
    encoded = forward.encode_texts(run.tokenizer, texts, round_max_length(run), run.cfg.truncation)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    probabilities = torch.empty(len(texts), run.n_classes)
    features = torch.empty(len(texts), layer.in_features)
    captured = []
    handle = layer.register_forward_hook(lambda module, args, output: captured.append(args[0].float().cpu()))
    model.eval()
    try:
        batches = forward.token_budget_batches(lengths, run.eval_chunk, run.cfg.eval_batch_size)
        for idx in tqdm(batches, desc=desc, leave=False, disable=not run.progress):
            rows = [{key: encoded[key][i] for key in encoded.keys()} for i in idx]
            batch = run.tokenizer.pad(rows, return_tensors="pt", pad_to_multiple_of=run.pad)
            probabilities[idx] = torch.softmax(forward.forward_logits(model, batch, run.device,
                                                                      run.accelerator.autocast), dim=-1)
            features[idx] = captured.pop()
    finally:
        handle.remove()
    return probabilities, features.numpy()


def train_rounds(run) -> dict:
    """The self-training rounds after the run's own training (see the module's docstring); returns what they did
    for metrics.json ("self_training"). The run's TrainerState gets each round's steps, losses and validation
    evaluation (history entries with "self_training_round"), and its best evaluation the round kept, if any."""
    pool, cfg, state = run.unlabeled, run.cfg, run.state
    metric = cfg.metric_for_best
    rounds = cfg.self_training_rounds
    share = min(math.ceil(len(pool.texts) / rounds), ROUND_TEXTS)
    before = state.best["validation"][metric]
    record = {"source": pool.source, "read": pool.counts["read"], "blank": pool.counts["blank"],
              "dropped": {k: pool.counts[k] for k in ("test", "validation", "train", "repeated")},
              "used": pool.counts["used"], "max_length": round_max_length(run), "metric": metric,
              "validation_before": before, "rounds": [], "kept_round": 0}
    for round_no in range(1, rounds + 1):
        texts = pool.texts[(round_no - 1) * share:round_no * share]
        labels = None if pool.labels is None else pool.labels[(round_no - 1) * share:round_no * share]
        if not texts:
            break
        entry = one_round(run, round_no, texts, labels)
        record["rounds"].append(entry)
        if entry.get("kept"):
            record["kept_round"] = round_no
        if entry.get("stopped"):
            break
    kept = record["kept_round"]  # the run's finish puts the best evaluation's weights back
    say("self-training kept " + (f"round {kept}" if kept else "the model before it") +
        f": validation {metric} {state.best['validation'][metric]:.4f} (without the unlabelled texts "
        f"{before:.4f})", run.accelerator)
    return record


def one_round(run, round_no: int, texts: list[str], true_labels: list[int] | None) -> dict:
    """Pseudo-label texts with the best model so far, refit its head on the labelled and the selected texts,
    train one epoch of cross-entropy on them and evaluate on validation; returns the round's record."""
    state, names = run.state, run.splits.label_names
    if state.best is not state.history[-1]:  # the teacher is the best model so far
        run.best.restore(run.unwrapped())
    started = time.perf_counter()
    probabilities, features = score_texts(run, texts, f"pseudo-labelling, round {round_no}")
    per_label = per_label_counts(len(texts), round_no, run.cfg.self_training_rounds, run.n_classes)
    chosen, pseudo = select_balanced(probabilities, per_label)
    entry = {"round": round_no, "scored": len(texts),
             "pseudo_labels": {name: int((pseudo == i).sum()) for i, name in enumerate(names)}}
    if true_labels is not None:  # the packaged source's labels: a diagnosis, never used to train or choose
        truth = np.asarray(true_labels)
        entry["agreement"] = {"scored": float((probabilities.argmax(-1).numpy() == truth).mean()),
                              "selected": float((pseudo == truth[chosen]).mean()) if len(chosen) else None}
    if not len(chosen):
        say(f"self-training round {round_no}: the model predicts no text of some label; no pseudo-labels, "
            "stopping here", run.accelerator)
        return {**entry, "stopped": True}
    labelled_texts, labelled = list(run.splits.train["text"]), np.asarray(run.splits.train["label"])
    _, labelled_features = score_texts(run, labelled_texts, "labelled features")
    weights = None if run.class_weights is None else dict(enumerate(run.class_weights.tolist()))
    probe = heads.fit_probe(np.concatenate([labelled_features, features[chosen]]),
                            np.concatenate([labelled, pseudo]), run.n_classes, weights)
    heads.set_head_from_probe(run.unwrapped(), probe)
    entry["seconds_scoring"] = time.perf_counter() - started
    started = time.perf_counter()
    try:
        losses = train_epoch(run, round_no, labelled_texts + [texts[i] for i in chosen],
                             labelled.tolist() + pseudo.tolist())
    except TrainingError as exc:  # a diverged round is a worse candidate, not a failed run
        say(f"self-training round {round_no}: {exc}; keeping the best model so far", run.accelerator)
        return {**entry, "diverged": True, "stopped": True}
    entry.update(seconds_training=time.perf_counter() - started, train_examples=len(labelled) + len(chosen),
                 steps=len(losses), train_loss=sum(losses) / max(len(losses), 1))
    return {**entry, **evaluate_round(run, round_no, entry)}


def train_epoch(run, round_no: int, texts: list[str], labels: list[int]) -> list[float]:
    """One epoch of cross-entropy on texts at round_max_length tokens: the given batch size, the method's own
    learning rate (set for one epoch of cross-entropy), a fresh optimizer and linear schedule with the run's
    warm-up; the steps and their losses are the run's (TrainerState). TrainingError when a loss is not finite."""
    from datasets import Dataset
    from transformers import get_linear_schedule_with_warmup

    cfg, state, accelerator = run.cfg, run.state, run.accelerator
    round_cfg = dataclasses.replace(cfg, learning_rate=run.given_cfg.lr, batch_size=run.given_cfg.batch_size)
    tokenized = data_mod.tokenize(Dataset.from_dict({"text": texts, "label": labels}), run.tokenizer,
                                  round_max_length(run), cfg.truncation)
    loader = steps.make_train_loader(tokenized, run.tokenizer, round_cfg.batch_size, True, cfg.seed + round_no,
                                     cfg.num_workers, run.pad)
    optimizer = steps.build_optimizer(run.unwrapped(), round_cfg, run.device)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * len(loader)), len(loader))
    loader, optimizer, scheduler = accelerator.prepare(loader, optimizer, scheduler)
    pending, started = [], time.perf_counter()
    bar = tqdm(total=len(loader), desc=f"self-training round {round_no}", leave=False,
               disable=not (run.progress and accelerator.is_local_main_process))
    for loss, n_examples, learning_rate, grad_norm in steps.train_steps(
            run.forward_model, loader, optimizer, scheduler, accelerator, round_cfg, run.train_chunk,
            run.class_weights):
        state.step, state.examples = state.step + 1, state.examples + n_examples
        pending.append((loss, round_no, len(pending) + 1))
        run.tracker.step(state.step, learning_rate, grad_norm)
        bar.update(1)
    bar.close()
    losses = steps.finite_losses(pending)
    state.train_seconds += time.perf_counter() - started
    state.step_losses.extend(losses)
    run.tracker.log_steps(losses)
    return losses


def round_is_kept(validation: dict, best: dict, metric: str) -> bool:
    """Whether a round's validation evaluation replaces the best so far: at least as good by metric (a tie goes to
    the round: it learnt from more texts) and, for another metric than the loss, no higher validation loss. The
    loss guards against the failure of self-training, a student more confident in the teacher's mistakes: on IMDb
    with 32 labels (seed 42, 2026-12-01) round 3 scored 7 of 8 validation reviews against 5 of 8 while the
    validation loss rose from 0.74 to 1.06, and test accuracy stayed 0.65 while the test ECE went to 0.31."""
    if not math.isfinite(validation["loss"]):
        return False
    if metric == "loss":
        return validation["loss"] <= best["loss"]
    return validation[metric] >= best[metric] and validation["loss"] <= best["loss"]


def evaluate_round(run, round_no: int, entry: dict) -> dict:
    """The round's model on validation, in the run's history; it becomes the best when round_is_kept says so."""
    state, metric = run.state, run.cfg.metric_for_best
    val = run.evaluate(run.val_loader, f"validation, self-training round {round_no}")
    state.history.append({"epoch": round(state.step / len(run.train_loader), 3), "step": state.step,
                          "train_loss": entry["train_loss"], "validation": val, "self_training_round": round_no})
    run.tracker.log("validation", val, state.step)
    best = state.best["validation"][metric]
    kept = round_is_kept(val, state.best["validation"], metric)
    if kept:
        state.best_index, state.stale = len(state.history) - 1, 0
        run.best.weights = {n: p.detach().clone() for n, p in run.unwrapped().named_parameters() if p.requires_grad}
        run.keep_if_best()
    else:
        state.stale += 1
    shown = ", ".join(f"{name} {n:,}" for name, n in entry["pseudo_labels"].items())
    say(f"self-training round {round_no}: {sum(entry['pseudo_labels'].values()):,} pseudo-labels of "
        f"{entry['scored']:,} texts ({shown}), {entry['steps']} steps, train loss {entry['train_loss']:.4f}; "
        f"validation {metric} {val[metric]:.4f} (best so far {best:.4f})" + (" (kept)" if kept else ""),
        run.accelerator)
    if run.on_evaluation is not None:
        run.on_evaluation(state.step, val)
    return {"validation": {key: val[key] for key in ("accuracy", "f1", "loss")}, "kept": kept}
