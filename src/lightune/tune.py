"""`lightune tune`: an Optuna study over a search plan (tune_plan), its trials trained like `compare` cells, then
the results written (tune_report).

Each trial is an ordinary run directory `<output_dir>/<name>/runs/trial-<n>`, trained by compare.train_cell; its
objective values are read from the run's metrics: the validation metric of its best evaluation (never test), its
training seconds, its peak memory. TPE (seeded) samples the settings; with one objective a pruner watches the
validation metric at each evaluation point (run_training's on_evaluation) and stops trials that lag.

The study lives in a storage that outlasts the process, so an interrupted search resumes: finished trials are kept
and not re-run, a trial whose process died is marked failed and never counted as done. By default it is a SQLite
file in the study's directory (study.db); `--workers K` starts a new study in an Optuna journal file instead
(study.journal: Optuna's recommendation for several processes on one machine, where it advises against SQLite);
`--storage URL` (PostgreSQL, MySQL) shares one study between workers on several machines, with Optuna's heartbeat
failing the trials of a worker that died.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from .compare import _one_line, train_cell
from .errors import ConfigError
from .logs import quiet_libraries, silence_library_output
from .runs import keep_incomplete, run_lock, write_text
from .tune_plan import VALIDATION_OBJECTIVES, TunePlan, load_plan, plan_from_dict
from .tune_report import TuneResult, describe_values, summary_text, write_outputs

HEARTBEAT_S, GRACE_S = 60, 300  # --storage: a trial without a heartbeat for GRACE_S seconds is failed
DONE_STATES = ("COMPLETE", "PRUNED")  # trials that count towards --trials (a failed trial does not)


@dataclass(frozen=True)
class StorageRef:
    """Where the study lives, in a form worker processes can open again."""

    kind: str  # rdb (an SQLAlchemy URL) or journal (an Optuna journal file)
    target: str
    local: bool  # the default storage in the study's directory: only searches on this machine use it

    def open(self):
        import optuna

        if self.kind == "journal":
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(self.target))
        options = {} if self.local else {"heartbeat_interval": HEARTBEAT_S, "grace_period": GRACE_S}
        try:
            return optuna.storages.RDBStorage(self.target, **options)
        except ImportError as exc:
            raise ConfigError(f"the study storage {self} needs a database driver that is not installed "
                              f"({_one_line(exc.__cause__ or exc)})") from None
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy's connection errors: one line
            raise ConfigError(f"cannot open the study storage {self}: {_one_line(exc)}") from None

    def __str__(self) -> str:
        if self.kind == "journal" or self.local:
            return self.target.removeprefix("sqlite:///")
        from sqlalchemy.engine import make_url

        return make_url(self.target).render_as_string(hide_password=True)


def storage_ref(plan: TunePlan, url: str | None) -> StorageRef:
    """--storage URL, else the study directory's own: the file it already has, else study.journal for several
    workers and study.db for one."""
    if url:
        return StorageRef("rdb", url, local=False)
    journal, db = plan.root / "study.journal", plan.root / "study.db"
    if db.exists() and not journal.exists() and plan.workers > 1:
        raise ConfigError(f"{db} is a SQLite study, which Optuna advises against for several processes: resume it "
                          f"with --workers 1 (a search started with --workers K keeps its study in a journal file)")
    if journal.exists() or plan.workers > 1:
        return StorageRef("journal", str(journal), local=True)
    return StorageRef("rdb", f"sqlite:///{db}", local=True)


class _AskLock:
    """Held by a worker of this machine from counting the study's trials until its new trial is running, so that
    workers never start more than --trials between them."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.held = False

    def acquire(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        if self.held:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.held = False


def _comparable(spec: dict) -> dict:
    """What a resumed study must share with this plan: the base, the search space and the objectives."""
    return json.loads(json.dumps({"base": spec["base"], "search": spec["search"],
                                  "objectives": spec["tune"]["objectives"]}, default=str))


def _differences(saved: dict, wanted: dict) -> list[str]:
    out = []
    for part, value in wanted.items():
        before = saved.get(part)
        if isinstance(value, dict) and isinstance(before, dict):
            out += [f"{part}.{key}" for key in sorted(set(value) | set(before)) if value.get(key) != before.get(key)]
        elif value != before:
            out.append(part)
    return out


def open_study(plan: TunePlan, ref: StorageRef):
    """The plan's study in the storage: created, or loaded when it was started earlier with the same search."""
    import optuna

    storage = ref.open()
    wanted = _comparable(plan.spec)
    try:
        study = optuna.load_study(study_name=plan.name, storage=storage)
    except KeyError:
        if plan.runs_dir.is_dir() and any(plan.runs_dir.iterdir()):
            raise ConfigError(f"{plan.runs_dir} holds the runs of a search whose study is not in {ref}; remove "
                              f"{plan.root} or choose another [tune] name") from None
        study = optuna.create_study(study_name=plan.name, storage=storage, directions=plan.directions,
                                    load_if_exists=True)
        study.set_user_attr("search", wanted)
        return study
    saved = study.user_attrs.get("search", {})
    if saved != wanted:
        diff = _differences(saved, wanted)
        raise ConfigError(f"the study {plan.name!r} in {ref} was started with a different search "
                          f"({', '.join(diff) or 'its settings'}); remove {plan.root} or choose another [tune] name")
    return study


def fail_interrupted(plan: TunePlan, study, log: Callable[[str], None]) -> int:
    """Mark the trials left running by a search that died (this machine's: the study directory is locked) as
    failed: they are never counted as done, and their staged runs become `trial-N.incomplete`."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING))
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        log(f"trial {trial.number}: its process ended before it finished; marked failed")
        for work in plan.runs_dir.glob(f".trial-{trial.number}.*.partial"):
            with contextlib.suppress(ConfigError), run_lock(work):  # in use: a training that has not noticed yet
                keep_incomplete(work, plan.runs_dir / f"trial-{trial.number}",
                                RuntimeError("the search ended while this trial trained"))
    return len(stale)


def count(study, states=DONE_STATES) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=tuple(TrialState[s] for s in states)))


def objective_values(metrics: dict, objectives: list[str]) -> list[float]:
    """A finished run's objective values: the validation metrics of its best evaluation (the weights it kept), its
    training seconds, its peak memory in bytes."""
    best_step = metrics["best"]["step"]
    best = next(e for e in reversed(metrics["history"]) if e["step"] == best_step)
    values = []
    for name in objectives:
        if name in VALIDATION_OBJECTIVES:
            values.append(float(best["validation"][name]))
        elif name == "seconds":
            values.append(float(metrics["training"]["seconds"]))
        else:
            values.append(float(metrics["memory"]["peak_bytes"]))
    return values


def _reporter(trial, plan: TunePlan) -> Callable[[int, dict], None]:
    """run_training's on_evaluation for a trial: the validation metric to the pruner (one objective: Optuna prunes
    single-objective studies only), TrialPruned when it says stop."""
    import optuna

    def on_evaluation(step: int, validation: dict) -> None:
        if len(plan.objectives) == 1:
            value = validation[plan.metric]
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (validation {plan.metric} {value:.4f})")

    return on_evaluation


def _objective(trial, plan: TunePlan, worker: int, progress: bool, log: Callable[[str], None],
               started: Callable[[], None]):
    import optuna

    started()
    trial.set_user_attr("worker", worker)
    params = {key: dim.suggest(trial) for key, dim in plan.search.items()}
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    try:
        cfg = plan.trial_config(params, trial.number)
        trial.set_user_attr("run_dir", str(plan.runs_dir / cfg.run_name))
        log(f"trial {trial.number}: {shown}")
        metrics = train_cell(cfg, plan.isolate, progress, _reporter(trial, plan))
    except optuna.TrialPruned as exc:
        log(f"trial {trial.number}: {exc}")
        raise
    except Exception as exc:
        message = _one_line(exc)
        trial.set_user_attr("error", message)
        log(f"trial {trial.number}: FAILED: {message}")
        raise
    values = objective_values(metrics, plan.objectives)
    log(f"trial {trial.number}: {describe_values(plan.objectives, values)}")
    return values[0] if len(values) == 1 else values


def _sampler(plan: TunePlan, worker: int, trials_before: int):
    """TPE, seeded by the plan's seed, the worker and the trials already in the study (a resumed or parallel search
    does not repeat the random draws of another); constant liar keeps parallel workers apart."""
    import numpy as np
    import optuna

    seed = int(np.random.SeedSequence([plan.seed, worker, trials_before]).generate_state(1)[0])
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=plan.startup_trials, constant_liar=True)


def _pruner(plan: TunePlan):
    import optuna

    if plan.pruner == "median":
        return optuna.pruners.MedianPruner()
    if plan.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def work(plan: TunePlan, ref: StorageRef, worker: int, progress: bool, log: Callable[[str], None]) -> None:
    """One worker: trials until the study has --trials finished or running (at most --trials tries here)."""
    import optuna

    study = optuna.load_study(study_name=plan.name, storage=ref.open(), pruner=_pruner(plan))
    study.sampler = _sampler(plan, worker, len(study.get_trials(deepcopy=False)))
    lock = _AskLock(plan.root / ".ask.lock")
    objective = partial(_objective, plan=plan, worker=worker, progress=progress, log=log, started=lock.release)
    for _ in range(plan.trials):
        lock.acquire()
        try:
            optuna.storages.fail_stale_trials(study)  # --storage: the trials of workers that died elsewhere
            if count(study, DONE_STATES + ("RUNNING", "WAITING")) >= plan.trials:
                return
            study.optimize(objective, n_trials=1, catch=(Exception,))
        finally:
            lock.release()


def _worker_main(plan: TunePlan, ref: StorageRef, worker: int) -> None:  # a spawned worker process
    quiet_libraries()
    silence_library_output()
    _end_with_parent(os.getppid())
    log = partial(_log, prefix=f"[worker {worker}] ")
    try:
        work(plan, ref, worker, False, log)
    except KeyboardInterrupt:
        sys.exit(130)
    except ConfigError as exc:
        log(f"error: {exc}")
        sys.exit(2)


def _end_with_parent(parent: int) -> None:
    """A worker ends when the `lightune tune` that started it is gone (SIGKILL): no trial runs unwatched."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _log(message: str, prefix: str = "") -> None:
    print(prefix + message, file=sys.stderr, flush=True)


def _run_workers(plan: TunePlan, ref: StorageRef, progress: bool, log: Callable[[str], None]) -> None:
    """This process is worker 0; workers 1..K-1 are fresh processes on the same study."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    others = [ctx.Process(target=_worker_main, args=(plan, ref, i)) for i in range(1, plan.workers)]
    for proc in others:
        proc.start()
    try:
        work(plan, ref, 0, progress and not others, log)
    finally:
        for i, proc in enumerate(others, 1):
            proc.join()
            if proc.exitcode not in (0, None):
                log(f"worker {i} ended with exit code {proc.exitcode}")


def run_tune(plan: TunePlan, storage: str | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None) -> TuneResult:
    """Run the search until the study has plan.trials finished (or pruned) trials, then write the trials table,
    the plots, report.html and best.toml under plan.root. KeyboardInterrupt stops it; the same call resumes it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the trials are logged here, failures in one line
    log = log or _log
    plan.root.mkdir(parents=True, exist_ok=True)
    with run_lock(plan.root, "another `lightune tune` of this search (give it --workers instead)"):
        ref = storage_ref(plan, storage)
        study = open_study(plan, ref)
        if ref.local:
            fail_interrupted(plan, study, log)
        write_text(plan.root / "search.json", json.dumps(plan.spec, indent=2, default=str) + "\n")
        done = count(study)
        log(f"study {plan.name!r} in {ref}: {done} of {plan.trials} trials done earlier"
            + (f"; {plan.workers} workers" if plan.workers > 1 and done < plan.trials else ""))
        start = time.perf_counter()
        if done < plan.trials:
            _run_workers(plan, ref, progress, log)
        seconds = time.perf_counter() - start
        study = optuna.load_study(study_name=plan.name, storage=ref.open())
        return write_outputs(plan, study, seconds, str(ref))


__all__ = ["TunePlan", "TuneResult", "load_plan", "plan_from_dict", "run_tune", "summary_text", "objective_values"]
