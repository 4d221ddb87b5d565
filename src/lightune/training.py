"""The training recipe: data -> model -> evaluate base -> train with accelerate -> evaluate -> save the run.

run_training reads as the recipe, one call a phase; TrainingRun holds what the phases share (the accelerator, the
data, the prepared model and optimizer) and the run's state (checkpoints.TrainerState: what a checkpoint saves).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from . import data as data_mod
from . import (calibration, checkpoints, compiling, forward, heads, hub, methods, model_card, models, objectives,
               self_training, steps)
from .tracking import RunTracker, check_report_to
from .config import TrainConfig, check_class_weight_count, validate
from .evaluation import choose_thresholds, evaluate_with_logits, predict_logits
from .reporting import base_start, below_base, write_run_outputs
from .runs import final_run_dir, run_lock, staged_run_dir, write_json
from .steps import (build_optimizer, chunk_budgets, make_eval_loader, make_train_loader,  # noqa: F401 (re-exported)
                    supported_max_length, total_steps)


@dataclass
class RunResult:
    """Where a finished run lives and what it measured."""

    run_dir: Path
    metrics: dict


def run_training(cfg: TrainConfig, progress: bool = True, resume: Path | None = None,
                 on_evaluation: Callable[[int, dict], None] | None = None) -> RunResult:
    """Train one configuration end to end and save a complete run directory; with resume (a run that did not
    finish, see checkpoints.resume_config for its config), continue from its latest checkpoint and remove it once
    the new run is complete. on_evaluation(step, validation metrics) is called at each evaluation point (a
    hyperparameter search reports them to its pruner); an exception it raises ends the run as a failed one."""
    run = TrainingRun(cfg, progress, Path(resume) if resume else None)
    run.on_evaluation = on_evaluation
    run.setup_data()
    run.setup_model()
    run.setup_training()
    with (output_dir_for(run.final, run.accelerator) as work,
          run_lock(resume if run.accelerator.is_main_process else None)):
        run.start(work)  # the resumed run's latest checkpoint, else the base model's evaluation
        run.train()
        if run.unlabeled is not None:  # pseudo-labelled rounds; the better model on validation is kept
            run.self_training = self_training.train_rounds(run)
        metrics = run.finish(work)
        checkpoints.remove_checkpoints(work)  # a finished run needs none
        write_run_outputs(work, metrics)
        run.tracker.finish(work, run.state.step)
    log(f"run saved to {run.final}", run.accelerator)
    if resume and run.accelerator.is_main_process:  # only now: the resumed run is complete
        shutil.rmtree(resume)
        log(f"removed {resume}, which this run continued", run.accelerator)
    return RunResult(run.final, metrics)


class TrainingRun:
    """One run of the recipe: its phases in the order run_training calls them, then their helpers."""

    on_evaluation: Callable[[int, dict], None] | None = None  # see run_training
    self_training: dict | None = None  # what the self-training rounds did (--unlabeled), for metrics.json

    def __init__(self, cfg: TrainConfig, progress: bool, resume: Path | None):
        validate(cfg)
        self.cfg, self.progress, self.resume = cfg, progress, resume
        device = forward.resolve_device(cfg.device)
        self.precision = forward.resolve_precision(cfg.precision, device)
        # trackers log into the staged run (tracking.RunTracker.start); accelerate wants a logging folder up front
        report_to = check_report_to(cfg.report_to)
        self.accelerator = Accelerator(mixed_precision=self.precision, cpu=device.type == "cpu", log_with=report_to,
                                       project_dir=cfg.output_dir if report_to else None,  # pinned batches (steps):
                                       dataloader_config=DataLoaderConfiguration(non_blocking=device.type == "cuda"))
        self.tracker = RunTracker(self.accelerator, report_to)
        self.device = self.accelerator.device  # this process's GPU under `accelerate launch`
        forward.reset_peak_memory(self.device)
        self.final = checkpoints.resumed_run_dir(resume) if resume else final_run_dir(cfg)
        hub.check_sources(cfg)  # a hub model or dataset without network: one line now, not a minute of retries
        self.model_config = models.load_model_config(cfg.model)  # fail fast on a bad model name, before the data work
        set_seed(cfg.seed)
        self.state = checkpoints.TrainerState()
        self.resumed: dict | None = None  # the run this one continues, and from which step
        self.warnings: list[str] = []  # what the run warned about (stderr, metrics.json and report.md)
        self.last_logits = self.best_logits = None  # (logits, labels) of the latest and the best evaluation

    def setup_data(self) -> None:
        """The splits (class weights checked against their labels before the model loads), tokenized."""
        cfg = self.cfg
        self.splits = data_mod.build_splits(cfg)
        check_class_weight_count(cfg.class_weights, self.splits.label_names)  # before the model loads
        for message in data_mod.split_warnings(self.splits):
            self.warn(message)
        log(data_mod.labelled_line(self.splits), self.accelerator)
        self.unlabeled = self_training.read_unlabeled(cfg, self.splits, self.accelerator) if cfg.unlabeled else None
        self.n_classes = len(self.splits.label_names)
        self.tokenizer = models.load_tokenizer(cfg.model)
        self.max_length = supported_max_length(cfg.max_length, self.tokenizer, self.model_config)
        if self.max_length < cfg.max_length:
            log(f"max_length {cfg.max_length} is more than {cfg.model} takes; using {self.max_length}",
                self.accelerator)
        self.tokenized = {name: data_mod.tokenize(getattr(self.splits, name), self.tokenizer, self.max_length,
                                                  cfg.truncation) for name in ("train", "validation", "test")}

    def setup_model(self) -> None:
        """The base model with its pooling, the objective and the settings it resolves, the head's start (a linear
        probe with --head-init probe) and the method's trainable parameters."""
        cfg, device = self.cfg, self.device
        model = models.load_base_model(cfg.model, self.splits.label_names, cfg.quantize, device, cfg.problem)
        self.pooling = heads.resolve_pooling(cfg.pooling, models.resolve_model_path(cfg.model), model)
        heads.apply_pooling(model, self.pooling)
        # from here on cfg holds the settings the objective resolves (the run saves the ones given, and these apart)
        self.objective = objectives.resolve_objective(cfg, len(self.splits.train), self.pooling)
        resolved = objectives.resolved_settings(cfg, self.objective)
        given = self.given_cfg = cfg
        cfg = self.cfg = dataclasses.replace(cfg, **resolved)
        self.saved_config = given.to_dict()
        self.saved_config["resolved"].update(resolved, learning_rate=cfg.lr, pooling=self.pooling)
        self.contrastive = self.objective == "contrastive"
        self.train_chunk, self.eval_chunk = chunk_budgets(cfg, device, self.model_config)
        self.class_weights = objectives.class_weight_tensor(cfg.class_weights, list(self.splits.train["label"]),
                                                            self.n_classes, device)
        self.pad = forward.pad_multiple(device.type, self.max_length)
        self.probe_loader = self.eval_loader("train") if cfg.head_init == "probe" else None
        if self.probe_loader is not None:
            heads.start_head_from_probe(model, self.probe_loader, self.n_classes, device, self.progress, self.class_weights)
        self.model = models.prepare_for_training(model, cfg)
        self.embeddings = objectives.PooledEmbeddings(self.model) if self.contrastive else None
        self.params = models.count_parameters(self.model)
        self.weights_bytes = models.weight_memory_bytes(self.model)
        log(f"{cfg.method} on {cfg.model} ({device.type}, precision {self.precision}): {self.params}",
            self.accelerator)

    def setup_training(self) -> None:
        """The loaders, the optimizer and the learning-rate schedule, prepared by accelerate; resuming, the latest
        checkpoint loaded into them, once it is checked against the run (before anything is written)."""
        cfg, accelerator = self.cfg, self.accelerator
        train_loader = make_train_loader(self.tokenized["train"], self.tokenizer, cfg.batch_size, cfg.group_by_length,
                                         cfg.seed, cfg.num_workers, self.pad, self.device.type)
        self.val_loader, self.test_loader = self.eval_loader("validation"), self.eval_loader("test")
        optimizer = build_optimizer(self.model, cfg, self.device)
        self.epoch_generator = train_loader.generator
        # the evaluation loaders are not prepared: evaluation shares their batches out itself (no padding rows)
        self.model, self.train_loader, self.optimizer = accelerator.prepare(self.model, train_loader, optimizer)
        # optimizer steps of this process (its shard of the data)
        self.n_steps = total_steps(cfg, len(self.train_loader), objectives.least_steps(self.objective))
        log(objectives.auto_notice(self.given_cfg, cfg, self.objective, len(self.splits.train), self.n_steps,
                                   accelerator.num_processes), accelerator)
        # a prepared scheduler steps once per process at each optimizer step
        scale = accelerator.num_processes
        self.scheduler = accelerator.prepare(get_linear_schedule_with_warmup(
            self.optimizer, int(cfg.warmup_ratio * self.n_steps) * scale, self.n_steps * scale))
        shapes = compiling.warm_up_shapes(self.max_length, self.pad, cfg.batch_size, self.train_chunk)
        self.forward_model = compiling.training_model(self.model, cfg, self.device, shapes,
                                                      self.tokenizer.model_input_names, accelerator.autocast,
                                                      lambda line: log(line, accelerator))
        self.best = checkpoints.BestCheckpoint(cfg.metric_for_best, cfg.early_stopping_patience, self.contrastive,
                                               selects=len(self.splits.validation) >= checkpoints.MIN_SELECTION_ROWS)
        if not self.best.selects:
            log(f"validation has {len(self.splits.validation)} texts (under {checkpoints.MIN_SELECTION_ROWS}): too few "
                "to choose between evaluations; the last one is kept", accelerator)
        checkpoints.register_trainable_hooks(accelerator)
        if self.resume:
            self.load_resumed()

    def load_resumed(self) -> None:
        """The model, optimizer, scheduler, random states and TrainerState of the resumed run's latest checkpoint,
        checked first: its files against their checksums, its step against this run's schedule (ConfigError)."""
        self.latest, saved = checkpoints.checked_checkpoint(self.resume)
        checkpoints.check_schedule(self.resume, self.latest, saved, self.n_steps, len(self.train_loader))
        self.best.weights = checkpoints.load_checkpoint(self.accelerator, self.resume, self.latest)
        self.state = dataclasses.replace(saved, pending=[(torch.tensor(v, device=self.device), e, s)
                                                         for v, e, s in saved.pending])

    def start(self, work: Path) -> None:
        """config.json into the staged run, then the state to train from: the resumed run's latest checkpoint, else
        the base model's evaluation on test (and, contrastive, the probe start's on validation)."""
        self.checkpoint_dir = checkpoints.shared_path(work, self.accelerator)
        write_json(work / "config.json", self.saved_config)
        self.tracker.start(work, self.final.name, self.saved_config, self.cfg.output_dir)
        if self.resume:
            self.resume_from(work)
        else:
            self.state.base = self.evaluate(self.test_loader, "base model on test")
            self.tracker.log("base", self.state.base, 0)
        base = self.state.base
        log(f"base model ({base_start(self.cfg.head_init)}, {self.pooling} pooling) on test: accuracy "
            f"{base['accuracy']:.4f}, F1 {base['f1']:.4f}", self.accelerator)
        # the probe start is a candidate: on a validation split large enough to choose (checkpoints.MIN_SELECTION_ROWS)
        # the saved model is never worse on it
        if self.contrastive and not self.resume:
            self.evaluate_probe_start()
        self.segment_start = time.perf_counter()

    def resume_from(self, work: Path) -> None:
        """Continue from the checkpoint load_resumed loaded: a copy of it in the new run, which is resumable from its
        first moment."""
        if self.accelerator.is_main_process:
            shutil.copytree(self.latest, work / self.latest.name)
        state = self.state
        self.resumed = {"run": self.resume.name, "step": state.step}
        log(f"resuming {self.resume} at step {state.step} (epoch {state.epoch}, batch {state.batches_in_epoch})",
            self.accelerator)

    def evaluate_probe_start(self) -> None:
        """The contrastive objective's first candidate: the probe-started model, evaluated on validation."""
        val = self.evaluate(self.val_loader, "validation, probe start")
        self.state.history.append({"epoch": 0.0, "step": 0, "train_loss": None, "validation": val})
        self.best.update(self.unwrapped(), self.state)
        self.keep_if_best()
        log(f"contrastive objective, {self.n_steps} steps of {self.cfg.batch_size} texts at learning rate "
            f"{self.cfg.lr:g}; probe start on validation: accuracy {val['accuracy']:.4f}, loss {val['loss']:.4f}",
            self.accelerator)

    def train(self) -> None:
        """Epochs until n_steps optimizer steps are done or early stopping; SIGINT and SIGTERM stop after the step
        in progress, with a checkpoint."""
        state = self.state
        with checkpoints.StopRequest() as stop, self.embeddings or contextlib.nullcontext():
            while state.step < self.n_steps and not state.stopped_early:
                self.train_epoch(stop)
            if stop.requested(self.accelerator):  # a signal in the last step: resuming gives the final evaluation
                self.save_checkpoint()
                stop.act()
        # from here on Ctrl-C and SIGTERM act at once again

    def train_epoch(self, stop: checkpoints.StopRequest) -> None:
        """The rest of the epoch in progress (or the next one), with the evaluations and checkpoints due in it."""
        state, cfg, n_batches = self.state, self.cfg, len(self.train_loader)
        if state.batches_in_epoch in (0, n_batches):  # else: resuming in the middle of epoch `epoch`
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        loader = self.epoch_loader()
        bar = tqdm(total=min(self.n_steps - state.step, n_batches - state.batches_in_epoch),
                   desc=f"epoch {state.epoch}", leave=False,
                   disable=not (self.progress and self.accelerator.is_local_main_process))
        evaluated = False
        batches = steps.train_steps(self.forward_model, loader, self.optimizer, self.scheduler, self.accelerator, cfg,
                                    self.train_chunk, self.class_weights, self.embeddings,
                                    trim=self.device.type == "cpu")  # fixed widths and no host sync on a GPU
        for batch, (loss, n_examples, learning_rate, grad_norm) in enumerate(batches, state.batches_in_epoch + 1):
            state.step, state.batches_in_epoch, state.examples = state.step + 1, batch, state.examples + n_examples
            state.pending.append((loss, state.epoch, batch))
            self.tracker.step(state.step, learning_rate, grad_norm)
            bar.update(1)
            if self.device.type == "cpu":  # reading a CPU tensor costs nothing; on a GPU it would be a sync
                bar.set_postfix(loss=f"{loss.item():.4f}")
            # the contrastive objective evaluates once, at the end (the head is refitted there)
            evaluated = state.step == self.n_steps or bool(
                cfg.eval_steps and state.step % cfg.eval_steps == 0 and not self.contrastive)
            if evaluated:
                state.stopped_early = self.evaluation_point()
            if state.step >= self.n_steps or state.stopped_early:
                break
            if batch < n_batches:  # else after the epoch's evaluation
                self.checkpoint_if_due(stop)
        bar.close()
        if not evaluated and not cfg.eval_steps and not self.contrastive:
            state.stopped_early = self.evaluation_point()
        if state.step < self.n_steps and not state.stopped_early:
            self.checkpoint_if_due(stop)

    def epoch_loader(self):
        """The batches of the epoch in progress not done yet."""
        epoch, done = self.state.epoch, self.state.batches_in_epoch
        # each epoch's order depends on the seed and the epoch only, so a resumed run sees the same batches
        self.epoch_generator.manual_seed(self.cfg.seed + epoch - 1)
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        return self.accelerator.skip_first_batches(self.train_loader, done) if done else self.train_loader

    def evaluation_point(self) -> bool:
        """Read the pending losses, evaluate on validation, keep the best weights; True: stop early."""
        state, cfg = self.state, self.cfg
        if self.contrastive:  # the head of the tuned embeddings: a probe refitted on them (part of training)
            heads.start_head_from_probe(self.unwrapped(), self.probe_loader, self.n_classes, self.device, self.progress,
                                  self.class_weights)
        losses = steps.finite_losses(state.pending)  # the host sync of the training loop
        state.train_seconds += time.perf_counter() - self.segment_start
        state.pending.clear()
        state.step_losses.extend(losses)
        where = f"step {state.step}" if cfg.eval_steps else f"epoch {state.epoch}"
        val = self.evaluate(self.val_loader, f"validation, {where}")
        steps.check_finite_loss(val, f"validation split after {where}")
        entry = {"epoch": round(state.step / len(self.train_loader), 3), "step": state.step,
                 "train_loss": sum(losses) / max(len(losses), 1), "validation": val}
        state.history.append(entry)
        self.tracker.log_steps(losses)
        self.tracker.log("validation", val, state.step)
        stop = self.best.update(self.unwrapped(), state)
        self.keep_if_best()
        log(f"{where}: train loss {entry['train_loss']:.4f}, validation accuracy {val['accuracy']:.4f}, "
            f"F1 {val['f1']:.4f}, loss {val['loss']:.4f}" + (" (best)" if state.best is entry else ""),
            self.accelerator)
        if self.on_evaluation is not None:
            self.on_evaluation(state.step, val)
        self.segment_start = time.perf_counter()
        return stop

    def checkpoint_if_due(self, stop: checkpoints.StopRequest) -> None:
        """A checkpoint now if due: every save_every steps, and before stopping for SIGINT or SIGTERM (then stop)."""
        every = self.cfg.save_every
        if stop.requested(self.accelerator) or bool(every and self.state.step % every == 0):
            self.save_checkpoint()
            if stop.stopping:
                stop.act()

    def save_checkpoint(self) -> None:
        """Checkpoint the run at this step, after its evaluation (see checkpoints): the state with its pending
        losses read, the training time up to now."""
        state = self.state
        seconds = state.train_seconds + time.perf_counter() - self.segment_start
        pending = [(v, e, s) for v, (_, e, s) in zip(steps.finite_losses(state.pending), state.pending)]
        saved = dataclasses.replace(state, train_seconds=seconds, pending=pending)
        path = checkpoints.save_checkpoint(self.accelerator, self.checkpoint_dir, saved, self.best.weights)
        log(f"checkpoint saved: {path.name}", self.accelerator)

    def finish(self, work: Path) -> dict:
        """The best evaluation's weights back, the thresholds (multi-label), the fine-tuned model's evaluation on
        test and the model saved into work; returns the run's metrics."""
        state, cfg = self.state, self.cfg
        if state.best is not state.history[-1]:
            self.best.restore(self.unwrapped())
            log(f"keeping the best evaluation's weights: step {state.best['step']} (validation "
                f"{cfg.metric_for_best} {state.best['validation'][cfg.metric_for_best]:.4f})", self.accelerator)
        thresholds = choose_thresholds(cfg, self.n_classes, self.forward_model, self.val_loader, self.accelerator,
                                       self.progress)
        test = self.evaluate(self.test_loader, "fine-tuned on test", thresholds)
        steps.check_finite_loss(test, "fine-tuned model on the test split")
        self.tracker.log("test", test, state.step)
        log(f"fine-tuned on test: accuracy {test['accuracy']:.4f}, F1 {test['f1']:.4f} "
            f"(base {state.base['accuracy']:.4f})", self.accelerator)
        calibrated = self.calibrate(self.last_logits)
        if test["accuracy"] < state.base["accuracy"]:
            self.warn(below_base(test, state.base, cfg.head_init))
        peak_bytes, peak_kind = forward.peak_memory(self.device)
        saved_as = save_model(self.unwrapped(), self.tokenizer, work, cfg)
        metrics = self.metrics(test, saved_as, peak_bytes, peak_kind)
        metrics.update(calibration=calibrated, warnings=self.warnings)
        if thresholds is not None:  # multi-label: what predict, serve and evaluate apply to the probabilities
            metrics["thresholds"] = dict(zip(self.splits.label_names, thresholds))
        model_card.write_card(work / saved_as, metrics, saved_as)  # labels, data, metrics, how to load
        return metrics

    def calibrate(self, test: tuple) -> dict:
        """The temperature fitted on the best evaluation's validation logits and the test split's calibration."""
        # a run resumed after its best evaluation evaluates the best weights on validation again
        validation = self.best_logits or predict_logits(self.forward_model, self.val_loader, self.accelerator,
                                                        "calibrating", self.progress)
        result = calibration.calibrate(validation, test)
        log(calibration.summary_line(result), self.accelerator)
        return result

    def keep_if_best(self) -> None:
        """Keep the latest evaluation's logits when it is the best one (the temperature is fitted on them)."""
        if self.state.best is self.state.history[-1]:
            self.best_logits = self.last_logits

    def warn(self, message: str) -> None:
        """One line on standard error (main process), kept for metrics.json and report.md."""
        self.warnings.append(message)
        log(f"warning: {message}", self.accelerator, file=sys.stderr)

    def metrics(self, test: dict, saved_as: str, peak_bytes: int, peak_kind: str) -> dict:
        """metrics.json of the run (thresholds apart)."""
        state, cfg, best = self.state, self.cfg, self.state.best
        adapter = getattr(self.unwrapped(), "peft_config", {}).get("default")
        adapter = adapter if hasattr(adapter, "target_modules") else None  # prompt tuning targets no layer
        return {
            "run_name": self.final.name,
            "config": self.saved_config,
            "device": self.device.type,
            "precision": self.precision,
            "saved": saved_as,
            "target_modules": sorted(adapter.target_modules) if adapter and not isinstance(adapter.target_modules, str)
            else ([adapter.target_modules] if adapter else None),
            "data": self.splits.info,
            "max_length": self.max_length,
            "pooling": self.pooling,
            "parameters": {"trainable": self.params.trainable, "total": self.params.total, "share": self.params.share},
            "memory": {"weights_bytes": self.weights_bytes, "peak_bytes": peak_bytes, "peak_kind": peak_kind},
            "training": {"steps": state.step, "examples": state.examples, "seconds": state.train_seconds,
                         "samples_per_s": state.examples / state.train_seconds if state.train_seconds else 0.0,
                         "step_losses": state.step_losses, "steps_per_epoch": len(self.train_loader),
                         "objective": self.objective, "stopped_early": state.stopped_early,
                         "resumed_from": self.resumed, "processes": self.accelerator.num_processes},
            "best": {"step": best["step"], "epoch": best["epoch"], "metric": cfg.metric_for_best,
                     "value": best["validation"][cfg.metric_for_best]},
            "base": state.base,
            "history": state.history,
            "self_training": self.self_training,
            "test": test,
        }

    def eval_loader(self, split: str) -> DataLoader:
        """Token-budget batches of a tokenized split, for evaluation (and the probe's features)."""
        cfg = self.cfg
        return make_eval_loader(self.tokenized[split], self.tokenizer, cfg.eval_batch_size, self.eval_chunk,
                                cfg.num_workers, self.pad)

    def evaluate(self, loader: DataLoader, desc: str, thresholds: list[float] | None = None) -> dict:
        """The metrics of the model being trained on one split (see evaluation.evaluate)."""
        metrics, logits, labels = evaluate_with_logits(self.forward_model, loader, self.n_classes, self.accelerator,
                                                       desc, self.progress, self.splits.label_names, thresholds)
        self.last_logits = (logits, labels)
        return metrics

    def unwrapped(self):
        """The model without accelerate's wrappers: the one whose weights are read and written."""
        return self.accelerator.unwrap_model(self.model)


def save_model(model, tokenizer, run_dir: Path, cfg: TrainConfig) -> str:
    """The method's folder (methods registry): a peft adapter + tokenizer in adapter/, or the whole model in model/.

    Portable (model_card): an adapter names its base by the hub id where it has one and carries the run's labels
    in a config.json beside it; the model card is written once the metrics are known (finish)."""
    folder = run_dir / methods.get(cfg.peft).saves
    model_card.name_base_by_hub_id(model, cfg.model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if folder.name == "adapter":
        model_card.save_label_config(model, folder, cfg.problem)
    return folder.name


def output_dir_for(final: Path, accelerator: Accelerator):
    """The staged run directory on the main process; a throw-away one on the other processes."""
    return staged_run_dir(final) if accelerator.is_main_process else _scratch_dir()


@contextlib.contextmanager
def _scratch_dir():
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def log(message: str | None, accelerator: Accelerator | None = None, file=None) -> None:
    """One line above the progress bars (main process); nothing for None."""
    if message is not None and (accelerator is None or accelerator.is_main_process):
        tqdm.write(message, file=file)
