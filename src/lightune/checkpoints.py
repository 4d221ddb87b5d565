"""Checkpoints inside a staged run (--save-every) and resuming a run that did not finish (train --resume).

A checkpoint is `checkpoint-<step>/` in the run directory: accelerate's save_state (optimizer, scheduler, the
random states of every process) with the trainable weights only (the frozen base is rebuilt from the config),
the best evaluation's weights and trainer_state.json (data position, history, best evaluation, and the size and
sha256 of every other file of the checkpoint). It is written as a hidden `.checkpoint-<step>.tmp` and renamed when
complete, and older checkpoints are removed after that, so a kill at any moment leaves the previous checkpoint
usable. A checkpoint is checked (checkpoint_check) before a run is resumed from it: a damaged one is refused in one
line, before anything is loaded, copied or removed.

TrainerState is trainer_state.json, field for field, and the state a run trains with; BestCheckpoint holds the best
evaluation's weights (best.safetensors) and decides early stopping; resumed_run_dir is the one check of a run to
resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoint_check
from .checkpoint_check import CHECKSUMS_KEY, DamagedCheckpoint
from .config import TrainConfig, expand_method, from_dict, read_toml
from .errors import ConfigError, ModelError

CHECKPOINT = re.compile(r"checkpoint-(\d+)")
STATE_FILE = "trainer_state.json"  # written last: a checkpoint without it is not complete
TRAINABLE_FILE = "trainable.safetensors"
BEST_FILE = "best.safetensors"
# what every checkpoint holds besides its state: the weights, and accelerate's optimizer and scheduler states
REQUIRED_FILES = (TRAINABLE_FILE, BEST_FILE, "optimizer.bin", "scheduler.bin")
# a failed run kept by lightune (<name>.incomplete[-N]) or a staged one whose process was killed
# (.<name>.<random>.partial)
KEPT_RUN = re.compile(r"(?P<name>[^.].*)\.incomplete(-\d+)?|\.(?P<staged>.+)\.[a-z0-9_]+\.partial")
RESUME_MAY_CHANGE = {"save_every", "report_to"}  # settings a resumed run may change: they do not change the weights


@dataclass
class TrainerState:
    """Where a run stands: all that a checkpoint's trainer_state.json holds (its keys are these fields, and the
    checksums of the checkpoint's files: checkpoint_check.CHECKSUMS_KEY), and what a resumed run starts from.
    While training, pending holds the losses as device tensors (read at the evaluation points); the file holds
    their values."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch in progress (from 1; 0 before training)
    batches_in_epoch: int = 0  # batches done in the epoch in progress
    examples: int = 0  # training examples seen, all processes together
    train_seconds: float = 0.0  # time spent training, evaluations apart
    stopped_early: bool = False
    base: dict | None = None  # the base model's evaluation on test
    history: list[dict] = field(default_factory=list)  # the validation evaluations
    step_losses: list[float] = field(default_factory=list)  # each step's loss, up to the last evaluation
    pending: list[tuple] = field(default_factory=list)  # (loss, epoch, step in the epoch) since the last evaluation
    best_index: int | None = None  # the best evaluation's entry in history
    stale: int = 0  # evaluations in a row without improvement since the best one

    @property
    def best(self) -> dict | None:
        """The history entry of the best evaluation (None before the first)."""
        return None if self.best_index is None else self.history[self.best_index]


# evaluations on a validation split of fewer texts than this choose nothing: the latest one is kept. On a few-shot
# run's 8 validation labels one review decides between the tuned model and its probe start, and the tuned model
# measured 5 to 10 points better on test (IMDb, 32 labels; README, "Few-shot"). No temperature is fitted below it
# either (calibration.MIN_FIT_ROWS)
MIN_SELECTION_ROWS = 20


class BestCheckpoint:
    """The best validation evaluation so far (by metric_for_best) with a copy of the trainable weights at it,
    and early stopping: stop after `patience` evaluations in a row without improvement. Which evaluation is the
    best and how many followed it are kept in the run's TrainerState (best_index, stale), the weights here.
    selects=False (a validation split under MIN_SELECTION_ROWS texts): the latest evaluation is always the best."""

    def __init__(self, metric: str, patience: int | None, ties_to_later: bool = False, selects: bool = True):
        self.metric, self.patience, self.selects = metric, patience, selects
        # a tie goes to the later evaluation (the contrastive objective's tuned model against its probe start: on
        # the few validation labels of a few-shot run, --validation-labels given, ties are common)
        self.ties_to_later = ties_to_later
        self.weights: dict = {}  # name -> tensor of the trainable parameters at the best evaluation

    def improves(self, best: dict | None, validation: dict) -> bool:
        if best is None or not self.selects:
            return True
        new, old = validation[self.metric], best["validation"][self.metric]
        if self.ties_to_later and new == old:
            return True
        return new < old if self.metric == "loss" else new > old

    def update(self, model, state: TrainerState) -> bool:
        """Record the state's latest evaluation (copying the weights when it is the best); True when training
        should stop."""
        if self.improves(state.best, state.history[-1]["validation"]):
            state.best_index, state.stale = len(state.history) - 1, 0
            self.weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        else:
            state.stale += 1
        return self.patience is not None and state.stale >= self.patience

    def restore(self, model) -> None:
        """Put the best evaluation's weights back into model."""
        import torch

        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, weight in self.weights.items():
                params[name].copy_(weight)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the most steps in run_dir, or None."""
    found = [(int(m.group(1)), path) for path in Path(run_dir).glob("checkpoint-*")
             if (m := CHECKPOINT.fullmatch(path.name)) and (path / STATE_FILE).is_file()]
    return max(found)[1] if found else None


def finished_name(run_dir: Path) -> str | None:
    """The name the run would have had when finished (None when run_dir is not a kept or staged run's name)."""
    match = KEPT_RUN.fullmatch(Path(run_dir).name)
    return match and (match.group("name") or match.group("staged"))


def resumed_run_dir(run_dir: str | Path) -> Path:
    """Where the resumed run of run_dir will live: the name the run it continues would have had. The one check
    of a run to resume: ConfigError (one line) when run_dir is not a lightune run that did not finish, has no
    checkpoint, or its finished name is taken."""
    run = Path(run_dir)
    if not run.is_dir():
        raise ConfigError(f"--resume {run_dir}: no such run directory")
    name = finished_name(run)
    if name is None or not (run / "config.json").is_file():
        raise ConfigError(f"--resume {run_dir} is not a lightune run that did not finish (<name>.incomplete with "
                          f"a config.json)")
    if latest_checkpoint(run) is None:
        raise ConfigError(f"--resume {run_dir}: the run has no checkpoint (train with --save-every N to write them)")
    checked_checkpoint(run)
    if (run.parent / name).exists():
        raise ConfigError(f"--resume {run_dir}: run directory {run.parent / name} already exists")
    return run.parent / name


def checked_checkpoint(run_dir: str | Path) -> tuple[Path, TrainerState]:
    """The latest checkpoint of run_dir and its state, checked (checkpoint_check): its trainer_state.json field by
    field, every file of it present with the size and sha256 recorded when it was saved. ConfigError (one line)
    naming the damaged file."""
    checkpoint = latest_checkpoint(Path(run_dir))
    if checkpoint is None:
        raise ConfigError(f"--resume {run_dir}: the run has no checkpoint (train with --save-every N to write them)")
    where = f"{checkpoint.name}/{STATE_FILE}"
    try:
        try:
            raw = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DamagedCheckpoint(f"{where} is damaged: not valid JSON ({str(exc).splitlines()[0]})") from None
        fields = checkpoint_check.state_fields(raw, [f.name for f in dataclasses.fields(TrainerState)], where)
        checkpoint_check.check_files(checkpoint, raw.get(CHECKSUMS_KEY), REQUIRED_FILES)
    except DamagedCheckpoint as exc:
        raise ConfigError(f"--resume {run_dir}: {exc}") from None
    return checkpoint, TrainerState(**fields)


def check_schedule(run_dir: Path, checkpoint: Path, state: TrainerState, n_steps: int, steps_per_epoch: int) -> None:
    """ConfigError (one line) unless the checkpoint's position lies within the resumed run's schedule."""
    try:
        checkpoint_check.check_position(state, n_steps, steps_per_epoch, f"{checkpoint.name}/{STATE_FILE}")
    except DamagedCheckpoint as exc:
        raise ConfigError(f"--resume {run_dir}: {exc}") from None


def resume_config(run_dir: str, config_file: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """The saved configuration of a run to resume; ConfigError (one line) when run_dir is not a lightune run that
    did not finish, has no checkpoint, its finished name is taken (resumed_run_dir), a training still writes it, or
    the settings given contradict its own."""
    resumed_run_dir(run_dir)
    run = Path(run_dir)
    from .runs import read_given_config, run_lock, saved_config

    try:
        with run_lock(run):
            pass
    except ConfigError:
        raise ConfigError(f"--resume {run_dir}: a training is still writing this run") from None
    try:
        saved = saved_config(read_given_config(run))
    except (ModelError, ConfigError) as exc:
        raise ConfigError(f"--resume {run_dir}: cannot read its config.json ({exc})") from None
    saved.pop("method")
    saved.pop("resolved", None)
    # the resumed run is written beside the run it continues: that is where it must be able to write
    cfg = from_dict({**saved, "output_dir": str(run.absolute().parent)})
    raw = read_toml(config_file) if config_file else {}
    given = {**expand_method(raw.get("train", raw)), **expand_method(overrides)}
    for key, value in sorted(given.items()):
        own = saved.get(key) if key == "output_dir" else getattr(cfg, key)
        if key not in RESUME_MAY_CHANGE and own != value:
            raise ConfigError(f"--resume {run_dir}: {key} {value!r} conflicts with the run's {own!r}; "
                              f"a resumed run keeps its settings")
    return from_dict({k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}, base=cfg)


def register_trainable_hooks(accelerator) -> None:
    """Make accelerate's save_state/load_state store the trainable parameters only (TRAINABLE_FILE), not the
    frozen base (as diffusers does for LoRA)."""
    from safetensors.torch import load_file, save_file

    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            save_file(trainable_weights(accelerator.unwrap_model(models[0])), Path(output_dir) / TRAINABLE_FILE)
        weights.clear()

    def load(models, input_dir):
        model = accelerator.unwrap_model(models.pop())
        model.load_state_dict(load_file(Path(input_dir) / TRAINABLE_FILE, device=str(accelerator.device)),
                              strict=False)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def trainable_weights(model) -> dict:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def shared_path(path: Path, accelerator) -> Path:
    """The main process's path on every process (the checkpoints of all processes go into the main's run)."""
    if accelerator.num_processes == 1:
        return path
    from accelerate.utils import broadcast_object_list

    return Path(broadcast_object_list([str(path)])[0])


def save_checkpoint(accelerator, work: Path, state: TrainerState, best_weights: dict) -> Path:
    """Write checkpoint-<step> atomically into work (called on every process; work is the main process's run)."""
    from safetensors.torch import save_file

    from .runs import write_json

    final, tmp = work / f"checkpoint-{state.step}", work / f".checkpoint-{state.step}.tmp"
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's random states are written
    if accelerator.is_main_process:
        save_file({n: w.contiguous() for n, w in best_weights.items()}, tmp / BEST_FILE)
        checksums = checkpoint_check.file_checksums(tmp, skip=STATE_FILE)  # checked before a resume
        write_json(tmp / STATE_FILE, {**dataclasses.asdict(state), CHECKSUMS_KEY: checksums})
        os.rename(tmp, final)
        remove_checkpoints(work, keep=final)
    accelerator.wait_for_everyone()
    return final


def remove_checkpoints(run_dir: Path, keep: Path | None = None) -> None:
    """Remove the checkpoints in run_dir but keep; each is renamed to a hidden name first, so one half-removed by
    a kill is never taken for a checkpoint."""
    for path in Path(run_dir).glob("checkpoint-*"):
        if path != keep and CHECKPOINT.fullmatch(path.name):
            hidden = path.with_name(f".{path.name}.old")
            os.rename(path, hidden)
            shutil.rmtree(hidden)


def load_checkpoint(accelerator, run_dir: Path, checkpoint: Path) -> dict:
    """Restore the prepared model's trainable weights, optimizer, scheduler and random states from checkpoint (one
    that checked_checkpoint accepted); return the best evaluation's weights. ConfigError (one line) when a file
    cannot be loaded all the same."""
    from safetensors.torch import load_file

    try:
        accelerator.load_state(str(checkpoint))
        return load_file(checkpoint / BEST_FILE, device=str(accelerator.device))
    except Exception as exc:  # the libraries raise many types for a file they cannot read
        first = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--resume {run_dir}: cannot load {checkpoint.name} ({type(exc).__name__}: {first})") \
            from None


class StopRequest:
    """While training, SIGINT and SIGTERM ask to stop after the step in progress (so a checkpoint can be written);
    a second signal acts at once. `act` then does what the first signal would have done without this."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None  # the first signal received
        self.stopping = False  # set by requested: every process stops after this step
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for signum in self.SIGNALS:
            previous = signal.getsignal(signum)
            if previous in (signal.SIG_IGN, None):
                continue
            try:
                signal.signal(signum, self._handler)
            except ValueError:  # not the main thread: signals stay as they are
                return self
            self.previous[signum] = previous
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        self.previous = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:
            self.act(signum)
        self.signum = signum

    def requested(self, accelerator) -> bool:
        """True when a process got a signal (all processes agree, so they stop at the same step)."""
        if accelerator.num_processes == 1:
            self.stopping = self.signum is not None
            return self.stopping
        import torch

        flag = torch.tensor([0 if self.signum is None else self.signum], device=accelerator.device)
        signum = int(accelerator.gather(flag).max())  # 0: none
        self.signum = self.signum or signum or None
        self.stopping = bool(signum)
        return self.stopping

    def act(self, signum: int | None = None) -> None:
        """Restore the handlers and run the previous one for the signal (Ctrl-C: KeyboardInterrupt); SystemExit
        when it was the default action."""
        signum = signum or self.signum
        previous = self.previous.get(signum)
        self.__exit__()
        if callable(previous):
            previous(signum, None)
        raise SystemExit(128 + signum)
