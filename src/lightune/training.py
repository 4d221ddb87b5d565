"""The training recipe: data -> model -> evaluate base -> train with accelerate -> evaluate -> save the run."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from . import data as data_mod
from . import checkpoints, forward, heads, methods, models, objectives, steps
from .config import TrainConfig, check_class_weight_count, validate
from .evaluation import evaluate
from .reporting import final_run_dir, run_lock, staged_run_dir, write_json, write_run_outputs
from .steps import build_optimizer, chunk_budgets, make_eval_loader, make_train_loader


@dataclass
class RunResult:
    """Where a finished run lives and what it measured."""

    run_dir: Path
    metrics: dict


def start_head_from_probe(model, loader, n_classes: int, device: torch.device, progress: bool,
                          class_weights: torch.Tensor | None = None) -> None:
    """Fit a logistic regression on the frozen pooled training features (weighting the classes as the training
    loss does) and start the classifier from it."""
    if getattr(model, "hf_quantizer", None) is None:
        model.to(device)  # quantized models were loaded onto their device
    features, labels = heads.head_features(model, loader, progress)
    weights = None if class_weights is None else dict(enumerate(class_weights.tolist()))
    heads.set_head_from_probe(model, heads.fit_probe(features, labels, n_classes, weights))


def supported_max_length(requested: int, tokenizer, model_config) -> int:
    """requested, capped at what the tokenizer and the model's position embeddings take."""
    limits = (tokenizer.model_max_length, getattr(model_config, "max_position_embeddings", None))
    return min([requested] + [n for n in limits if isinstance(n, int) and n > 0])


def total_steps(cfg: TrainConfig, steps_per_epoch: int, least: int = 1) -> int:
    """Optimizer steps of a run: max_steps, else the epochs asked for, raised to at least `least`."""
    return cfg.max_steps or max(least, math.ceil(cfg.epochs * steps_per_epoch))


def reset_peak_memory(device: torch.device) -> None:
    """Start the GPU's peak-memory counters afresh, so that a run's peak is its own and not an earlier run's in the
    same process (compare, tests); the CPU's figure, the process's peak resident set, cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory so far: GPU memory allocated on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "GPU allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "process RSS"


class BestCheckpoint:
    """The best validation evaluation so far (by metric_for_best) with a copy of the trainable weights at it,
    and early stopping: stop after `patience` evaluations in a row without improvement."""

    def __init__(self, metric: str, patience: int | None):
        self.metric, self.patience = metric, patience
        self.entry: dict | None = None  # the history entry of the best evaluation
        self.weights: dict[str, torch.Tensor] = {}
        self.stale = 0

    def improves(self, validation: dict) -> bool:
        if self.entry is None:
            return True
        new, best = validation[self.metric], self.entry["validation"][self.metric]
        return new < best if self.metric == "loss" else new > best

    def update(self, model, entry: dict) -> bool:
        """Record one evaluation (copying the weights when it is the best); True when training should stop."""
        if self.improves(entry["validation"]):
            self.entry, self.stale = entry, 0
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        else:
            self.stale += 1
        return self.patience is not None and self.stale >= self.patience

    @torch.no_grad()
    def restore(self, model) -> None:
        """Put the best evaluation's weights back into model."""
        params = dict(model.named_parameters())
        for name, weight in self.weights.items():
            params[name].copy_(weight)


def choose_thresholds(cfg: TrainConfig, n_labels: int, model, val_loader, accelerator,
                      progress: bool) -> list[float] | None:
    """Multi-label: each label's threshold, tuned on the validation split with tune_thresholds (the threshold
    that maximises the label's F1 there), else 0.5; None for single-label runs."""
    if cfg.problem != "multi_label":
        return None
    from .evaluation import DEFAULT_THRESHOLD, predict_logits, tune_thresholds

    if not cfg.tune_thresholds:
        return [DEFAULT_THRESHOLD] * n_labels
    logits, labels = predict_logits(model, val_loader, accelerator, "tuning thresholds", progress)
    return tune_thresholds(torch.sigmoid(logits).numpy(), labels.numpy())


def save_model(model, tokenizer, run_dir: Path, cfg: TrainConfig) -> str:
    """The method's folder (methods registry): a peft adapter + tokenizer in adapter/, or the whole model in model/."""
    folder = run_dir / methods.get(cfg.peft).saves
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder.name


def output_dir_for(final: Path, accelerator: Accelerator):
    """The staged run directory on the main process; a throw-away one on the other processes."""
    return staged_run_dir(final) if accelerator.is_main_process else _scratch_dir()


@contextlib.contextmanager
def _scratch_dir():
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def log(message: str, accelerator: Accelerator | None = None) -> None:
    if accelerator is None or accelerator.is_main_process:
        tqdm.write(message)


def shared_path(path: Path, accelerator: Accelerator) -> Path:
    """The main process's path on every process (the checkpoints of all processes go into the main's run)."""
    return Path(broadcast_object_list([str(path)])[0]) if accelerator.num_processes > 1 else path


def run_training(cfg: TrainConfig, progress: bool = True, resume: Path | None = None) -> RunResult:
    """Train one configuration end to end and save a complete run directory; with resume (a run that did not
    finish, see checkpoints.resume_config for its config), continue from its latest checkpoint and remove it once
    the new run is complete."""
    validate(cfg)
    device = forward.resolve_device(cfg.device)
    precision = forward.resolve_precision(cfg.precision, device)
    accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    device = accelerator.device  # this process's GPU under `accelerate launch`
    reset_peak_memory(device)
    final = checkpoints.resumed_run_dir(resume) if resume else final_run_dir(cfg)
    model_config = models.load_model_config(cfg.model)  # fail fast on a bad model name, before the data work
    set_seed(cfg.seed)

    splits = data_mod.build_splits(cfg)
    check_class_weight_count(cfg.class_weights, splits.label_names)  # before the model loads
    tokenizer = models.load_tokenizer(cfg.model)
    max_length = supported_max_length(cfg.max_length, tokenizer, model_config)
    if max_length < cfg.max_length:
        log(f"max_length {cfg.max_length} is more than {cfg.model} takes; using {max_length}", accelerator)
    tokenized = {name: data_mod.tokenize(getattr(splits, name), tokenizer, max_length, cfg.truncation)
                 for name in ("train", "validation", "test")}

    model = models.load_base_model(cfg.model, splits.label_names, cfg.quantize, device, cfg.problem)
    pooling = heads.resolve_pooling(cfg.pooling, models.resolve_model_path(cfg.model), model)
    heads.apply_pooling(model, pooling)
    # from here on cfg holds the settings the objective resolves (the run saves the ones given, and these apart)
    objective = objectives.resolve_objective(cfg, len(splits.train), pooling)
    resolved = objectives.resolved_settings(cfg, objective)
    given, cfg = cfg, dataclasses.replace(cfg, **resolved)
    saved_config = given.to_dict()
    saved_config["resolved"].update(resolved, learning_rate=cfg.lr)
    contrastive = objective == "contrastive"
    train_chunk, eval_chunk = chunk_budgets(cfg, device)
    n_classes = len(splits.label_names)
    class_weights = objectives.class_weight_tensor(cfg.class_weights, list(splits.train["label"]), n_classes, device)
    pad = forward.pad_multiple(device.type, max_length)
    if cfg.head_init == "probe":
        probe_loader = make_eval_loader(tokenized["train"], tokenizer, cfg.eval_batch_size, eval_chunk, cfg.num_workers,
                                        pad)
        start_head_from_probe(model, probe_loader, n_classes, device, progress, class_weights)
    model = models.prepare_for_training(model, cfg)
    embeddings = objectives.PooledEmbeddings(model) if contrastive else None
    params = models.count_parameters(model)
    weights_bytes = models.weight_memory_bytes(model)

    log(f"{cfg.method} on {cfg.model} ({device.type}, precision {precision}): {params}", accelerator)
    train_loader = make_train_loader(tokenized["train"], tokenizer, cfg.batch_size, cfg.group_by_length, cfg.seed,
                                     cfg.num_workers, pad)
    val_loader, test_loader = (make_eval_loader(tokenized[name], tokenizer, cfg.eval_batch_size, eval_chunk,
                                                cfg.num_workers, pad) for name in ("validation", "test"))
    optimizer = build_optimizer(model, cfg, device)
    epoch_generator = train_loader.generator
    # the evaluation loaders are not prepared: evaluation shares their batches out itself (no padding rows)
    model, train_loader, optimizer = accelerator.prepare(model, train_loader, optimizer)
    # optimizer steps of this process (its shard of the data)
    n_steps = total_steps(cfg, len(train_loader), objectives.least_steps(objective))
    # a prepared scheduler steps once per process at each optimizer step
    scale = accelerator.num_processes
    scheduler = accelerator.prepare(
        get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * n_steps) * scale, n_steps * scale))
    forward_model = torch.compile(model) if cfg.compile else model
    checkpoints.register_trainable_hooks(accelerator)

    with (output_dir_for(final, accelerator) as work, run_lock(resume if accelerator.is_main_process else None),
          contextlib.ExitStack() as signals):
        checkpoint_dir = shared_path(work, accelerator)
        write_json(work / "config.json", saved_config)
        history, step_losses, seen, train_seconds, epoch, done = [], [], 0, 0.0, 0, 0
        pending: list[tuple[torch.Tensor, int, int]] = []  # (loss, epoch, step in the epoch) since the last evaluation
        best = BestCheckpoint(cfg.metric_for_best, cfg.early_stopping_patience)
        in_epoch, stopped_early, resumed = 0, False, None  # batches done in the epoch in progress
        if resume:
            latest = checkpoints.latest_checkpoint(Path(resume))
            if accelerator.is_main_process:  # the new run is resumable from its first moment
                shutil.copytree(latest, work / latest.name)
            state, best.weights = checkpoints.load_checkpoint(accelerator, latest)
            base, history, step_losses = state["base"], state["history"], state["step_losses"]
            done, epoch, in_epoch, seen = state["step"], state["epoch"], state["batches_in_epoch"], state["examples"]
            train_seconds, stopped_early, best.stale = state["train_seconds"], state["stopped_early"], state["stale"]
            best.entry = history[state["best_index"]] if state["best_index"] is not None else None
            pending = [(torch.tensor(v, device=device), e, s) for v, e, s in state["pending"]]
            resumed = {"run": Path(resume).name, "step": done}
            log(f"resuming {resume} at step {done} (epoch {epoch}, batch {in_epoch})", accelerator)
        else:
            base = evaluate(forward_model, test_loader, n_classes, accelerator, "base model on test", progress,
                            splits.label_names)
        start = "linear probe head" if cfg.head_init == "probe" else "untrained adapters/head"
        log(f"base model ({start}, {pooling} pooling) on test: accuracy {base['accuracy']:.4f}, "
            f"F1 {base['f1']:.4f}", accelerator)
        if contrastive and not resume:  # the probe start is a candidate: the saved model is never worse on validation
            val = evaluate(forward_model, val_loader, n_classes, accelerator, "validation, probe start", progress,
                           splits.label_names)
            history.append({"epoch": 0.0, "step": 0, "train_loss": None, "validation": val})
            best.update(accelerator.unwrap_model(model), history[-1])
            log(f"contrastive objective, {n_steps} steps of {cfg.batch_size} texts at learning rate {cfg.lr:g}; probe "
                f"start on validation: accuracy {val['accuracy']:.4f}, loss {val['loss']:.4f}", accelerator)
        segment_start = time.perf_counter()

        def evaluation_point() -> bool:
            """Read the pending losses, evaluate on validation, keep the best weights; True: stop early."""
            nonlocal train_seconds, segment_start
            if contrastive:  # the head of the tuned embeddings: a probe refitted on them (part of training)
                start_head_from_probe(accelerator.unwrap_model(model), probe_loader, n_classes, device, progress,
                                      class_weights)
            losses = steps.finite_losses(pending)  # the host sync of the training loop
            train_seconds += time.perf_counter() - segment_start
            pending.clear()
            step_losses.extend(losses)
            where = f"step {done}" if cfg.eval_steps else f"epoch {epoch}"
            val = evaluate(forward_model, val_loader, n_classes, accelerator, f"validation, {where}", progress,
                           splits.label_names)
            steps.check_finite_loss(val, f"validation split after {where}")
            entry = {"epoch": round(done / len(train_loader), 3), "step": done,
                     "train_loss": sum(losses) / max(len(losses), 1), "validation": val}
            history.append(entry)
            stop = best.update(accelerator.unwrap_model(model), entry)
            log(f"{where}: train loss {entry['train_loss']:.4f}, validation accuracy {val['accuracy']:.4f}, "
                f"F1 {val['f1']:.4f}, loss {val['loss']:.4f}" + (" (best)" if best.entry is entry else ""),
                accelerator)
            segment_start = time.perf_counter()
            return stop

        def save_checkpoint() -> None:
            """Checkpoint the run at this step, after its evaluation (see checkpoints)."""
            state = {"step": done, "epoch": epoch, "batches_in_epoch": in_epoch, "examples": seen,
                     "train_seconds": train_seconds + time.perf_counter() - segment_start,
                     "stopped_early": stopped_early, "base": base, "history": history, "step_losses": step_losses,
                     "pending": [(v, e, s) for v, (_, e, s) in zip(steps.finite_losses(pending), pending)],
                     "best_index": history.index(best.entry) if best.entry is not None else None, "stale": best.stale}
            saved = checkpoints.save_checkpoint(accelerator, checkpoint_dir, done, state, best.weights)
            log(f"checkpoint saved: {saved.name}", accelerator)

        def checkpoint_due(stop: checkpoints.StopRequest) -> bool:
            """A checkpoint now: every save_every steps, and before stopping for SIGINT or SIGTERM."""
            return stop.requested(accelerator) or bool(cfg.save_every and done % cfg.save_every == 0)

        stop = signals.enter_context(checkpoints.StopRequest())  # until signals.close()
        if embeddings is not None:
            signals.enter_context(embeddings)
        while done < n_steps and not stopped_early:
            if in_epoch in (0, len(train_loader)):  # else: resuming in the middle of epoch `epoch`
                epoch, in_epoch = epoch + 1, 0
            # each epoch's order depends on the seed and the epoch only, so a resumed run sees the same batches
            epoch_generator.manual_seed(cfg.seed + epoch - 1)
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(epoch)
            loader = accelerator.skip_first_batches(train_loader, in_epoch) if in_epoch else train_loader
            bar = tqdm(total=min(n_steps - done, len(train_loader) - in_epoch), desc=f"epoch {epoch}", leave=False,
                       disable=not (progress and accelerator.is_local_main_process))
            evaluated = False
            for in_epoch, (loss, n_examples) in enumerate(
                    steps.train_steps(forward_model, loader, optimizer, scheduler, accelerator, cfg, train_chunk,
                                class_weights, embeddings), in_epoch + 1):
                done, seen = done + 1, seen + n_examples
                pending.append((loss, epoch, in_epoch))
                bar.update(1)
                if device.type == "cpu":  # reading a CPU tensor costs nothing; on a GPU it would be a sync
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                # the contrastive objective evaluates once, at the end (the head is refitted there)
                evaluated = done == n_steps or bool(cfg.eval_steps and done % cfg.eval_steps == 0 and not contrastive)
                if evaluated:
                    stopped_early = evaluation_point()
                if done >= n_steps or stopped_early:
                    break
                if in_epoch < len(train_loader) and checkpoint_due(stop):  # else after the epoch's evaluation
                    save_checkpoint()
                    if stop.stopping:
                        stop.act()
            bar.close()
            if not evaluated and not cfg.eval_steps and not contrastive:
                stopped_early = evaluation_point()
            if done < n_steps and not stopped_early and checkpoint_due(stop):
                save_checkpoint()
                if stop.stopping:
                    stop.act()
        if stop.requested(accelerator):  # a signal in the last step: resuming gives the final evaluation
            save_checkpoint()
            stop.act()
        signals.close()  # from here on Ctrl-C and SIGTERM act at once again
        if best.entry is not history[-1]:
            best.restore(accelerator.unwrap_model(model))
            log(f"keeping the best evaluation's weights: step {best.entry['step']} (validation "
                f"{cfg.metric_for_best} {best.entry['validation'][cfg.metric_for_best]:.4f})", accelerator)
        thresholds = choose_thresholds(cfg, n_classes, forward_model, val_loader, accelerator, progress)
        test = evaluate(forward_model, test_loader, n_classes, accelerator, "fine-tuned on test", progress,
                        splits.label_names, thresholds)
        steps.check_finite_loss(test, "fine-tuned model on the test split")
        log(f"fine-tuned on test: accuracy {test['accuracy']:.4f}, F1 {test['f1']:.4f} "
            f"(base {base['accuracy']:.4f})", accelerator)
        peak_bytes, peak_kind = peak_memory(device)
        saved_as = save_model(accelerator.unwrap_model(model), tokenizer, work, cfg)
        adapter = getattr(accelerator.unwrap_model(model), "peft_config", {}).get("default")
        adapter = adapter if hasattr(adapter, "target_modules") else None  # prompt tuning targets no layer
        metrics = {
            "run_name": final.name,
            "config": saved_config,
            "device": device.type,
            "precision": precision,
            "saved": saved_as,
            "target_modules": sorted(adapter.target_modules) if adapter and not isinstance(adapter.target_modules, str)
            else ([adapter.target_modules] if adapter else None),
            "data": splits.info,
            "max_length": max_length,
            "pooling": pooling,
            "parameters": {"trainable": params.trainable, "total": params.total, "share": params.share},
            "memory": {"weights_bytes": weights_bytes, "peak_bytes": peak_bytes, "peak_kind": peak_kind},
            "training": {"steps": done, "examples": seen, "seconds": train_seconds,
                         "samples_per_s": seen / train_seconds if train_seconds else 0.0,
                         "step_losses": step_losses, "steps_per_epoch": len(train_loader), "objective": objective,
                         "stopped_early": stopped_early, "resumed_from": resumed,
                         "processes": accelerator.num_processes},
            "best": {"step": best.entry["step"], "epoch": best.entry["epoch"], "metric": cfg.metric_for_best,
                     "value": best.entry["validation"][cfg.metric_for_best]},
            "base": base,
            "history": history,
            "test": test,
        }
        if thresholds is not None:  # multi-label: what predict, serve and evaluate apply to the probabilities
            metrics["thresholds"] = dict(zip(splits.label_names, thresholds))
        checkpoints.remove_checkpoints(work)  # a finished run needs none
        write_run_outputs(work, metrics)
    log(f"run saved to {final}", accelerator)
    if resume and accelerator.is_main_process:  # only now: the resumed run is complete
        shutil.rmtree(resume)
        log(f"removed {resume}, which this run continued", accelerator)
    return RunResult(final, metrics)
