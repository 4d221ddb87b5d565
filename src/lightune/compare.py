"""`lightune compare`: train every cell of a plan (compare_plan) that is not finished yet, each in a fresh process
by default, then write the results (compare_report).

Every cell is an ordinary run directory written by `training.run_training` under `<output_dir>/<name>/runs/`,
named after its grid values (`rank=4_method=qlora_seed=1`). Finished cells are reused on a re-run, so an
interrupted comparison resumes; a cell that fails is recorded with its error and the others go on.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
import traceback
from typing import Callable

from .compare_plan import Cell, ComparePlan, load_plan, plan_from_dict
from .compare_report import CompareResult, cell_row, summary_text, tabulate_cells, write_outputs
from .config import TrainConfig
from .errors import ConfigError, LightuneError
from .logs import quiet_libraries, silence_library_output
from .runs import is_complete_run, read_given_config, read_run, saved_config, write_text
from .training import run_training


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, LightuneError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _comparable(cfg_dict: dict) -> dict:
    out = json.loads(json.dumps(cfg_dict, default=str))
    for key in ("output_dir", "run_name", "resolved", "report_to"):  # resolved: what the other settings imply; report_to: where it logs
        out.pop(key, None)
    return out


def check_existing(plan: ComparePlan) -> None:
    """A finished cell is reused only if it was trained with the same configuration (an older run's saved
    configuration read in today's terms); else ConfigError up front."""
    for cell in plan.cells:
        run_dir = plan.runs_dir / cell.name
        if not is_complete_run(run_dir):
            continue
        saved_raw = read_given_config(run_dir)
        saved, wanted = _comparable(saved_config(saved_raw)), _comparable(cell.cfg.to_dict())
        # settings left to the objective: a run trained as they resolved (older runs: cross-entropy, their metric)
        for key, older in (("objective", "cross_entropy"), ("metric_for_best", saved.get("metric_for_best"))):
            if wanted.get(key) in ("auto", None):
                wanted[key] = saved[key] = saved_raw.get("resolved", {}).get(key, older)
        if saved != wanted:
            diff = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
            raise ConfigError(f"{run_dir} was trained with a different configuration ({', '.join(diff)}); remove it "
                              f"or choose another [compare] name")


def _cell_worker(cfg: TrainConfig, progress: bool, conn, report: bool = False) -> None:  # runs in a child process
    try:
        quiet_libraries()
        silence_library_output()  # as `lightune train` does: no "tokenizing" bars of datasets in a cell
        result = run_training(cfg, progress=progress, on_evaluation=_evaluation_messenger(conn) if report else None)
        conn.send(("ok", str(result.run_dir)))
    except KeyboardInterrupt:
        conn.send(("interrupted", ""))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which records the cell as failed
        conn.send(("error", _one_line(exc), "".join(traceback.format_exception(exc))))
    finally:
        conn.close()


class CellStopped(Exception):
    """Raised in a cell's process when the parent's on_evaluation stopped it (e.g. a pruned search trial)."""


def _evaluation_messenger(conn) -> Callable[[int, dict], None]:
    """The child's on_evaluation: each evaluation goes to the parent, which answers go on or stop. A parent that
    is gone (EOFError) ends the cell too, at its next evaluation."""

    def on_evaluation(step: int, validation: dict) -> None:
        conn.send(("evaluation", step, validation))
        if conn.recv() != "go":
            raise CellStopped(f"stopped by the parent at step {step}")

    return on_evaluation


def _answer_evaluations(conn, on_evaluation) -> tuple[tuple | None, Exception | None]:
    """Receive the child's messages, answering each evaluation with on_evaluation's verdict, until its last one;
    returns (that message or None when the child died, the exception on_evaluation raised)."""
    stopped = None
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return None, stopped
        if message[0] != "evaluation":
            return message, stopped
        try:
            on_evaluation(message[1], message[2])
        except Exception as exc:  # noqa: BLE001 - e.g. optuna.TrialPruned: stop the child, raise it once it ended
            stopped = exc
        with contextlib.suppress(OSError):
            conn.send("go" if stopped is None else "stop")


def _run_isolated(cfg: TrainConfig, progress: bool, on_evaluation: Callable[[int, dict], None] | None = None) -> dict:
    """Train one cell in a fresh Python process (so its peak memory is its own); metrics from metrics.json. With
    on_evaluation, each evaluation is passed to it here, in the parent (see run_training)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=on_evaluation is not None)
    proc = ctx.Process(target=_cell_worker, args=(cfg, progress, child, on_evaluation is not None))
    proc.start()
    child.close()
    stopped = None
    try:
        if on_evaluation is None:
            try:
                message = parent.recv()
            except EOFError:
                message = None
        else:
            message, stopped = _answer_evaluations(parent, on_evaluation)
    except KeyboardInterrupt:
        proc.join(10)  # the child got the Ctrl-C too: let it move its staging directory aside
        if proc.is_alive():
            proc.terminate()
        raise
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
            proc.join()
    if stopped is not None:
        raise stopped
    if message is None:
        raise RuntimeError(f"the training process died (exit code {proc.exitcode})")
    if message[0] == "interrupted":
        raise KeyboardInterrupt
    if message[0] == "error":
        raise CellError(message[1], message[2])
    return read_run(message[1]).metrics


class CellError(Exception):
    """A cell's failure in a child process: the one-line message and the child's traceback."""

    def __init__(self, message: str, trace: str = ""):
        super().__init__(message)
        self.trace = trace


def _run_in_process(cfg: TrainConfig, progress: bool, on_evaluation: Callable[[int, dict], None] | None = None
                    ) -> dict:
    # run_training resets the GPU's peak-memory counters itself
    return run_training(cfg, progress=progress, on_evaluation=on_evaluation).metrics


def train_cell(cfg: TrainConfig, isolate: bool, progress: bool,
               on_evaluation: Callable[[int, dict], None] | None = None) -> dict:
    """Train one configuration into an ordinary run directory and return its metrics: the one place a cell of
    `compare` and a trial of `tune` are trained. isolate: in a fresh process (peak memory its own); on_evaluation:
    see run_training (with isolate it runs here, in this process)."""
    return _run_isolated(cfg, progress, on_evaluation) if isolate else _run_in_process(cfg, progress, on_evaluation)


def run_compare(plan: ComparePlan, progress: bool = True, log: Callable[[str], None] | None = None,
                isolate: bool | None = None) -> CompareResult:
    """Train every cell not finished yet (sequentially), then write results.csv/.md, cells.csv, plots and report.html.

    A failing cell is recorded and the rest go on; Ctrl-C (KeyboardInterrupt) stops the comparison, and a re-run
    resumes it. `isolate` (default: the plan's) trains each cell in a fresh process.
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    isolate = plan.isolate if isolate is None else isolate
    check_existing(plan)
    plan.runs_dir.mkdir(parents=True, exist_ok=True)
    write_text(plan.root / "comparison.json", json.dumps(plan.spec, indent=2, default=str) + "\n")
    start, rows, n = time.perf_counter(), [], len(plan.cells)
    for i, cell in enumerate(plan.cells, 1):
        run_dir = plan.runs_dir / cell.name
        if is_complete_run(run_dir):
            log(f"[{i}/{n}] {cell.name}: finished earlier, reused")
            rows.append(cell_row(plan, cell, "reused", read_run(run_dir).metrics))
            continue
        log(f"[{i}/{n}] {cell.name}: training")
        cell_start = time.perf_counter()
        try:
            metrics = train_cell(cell.cfg, isolate, progress)
        except Exception as exc:  # noqa: BLE001 - a failed cell is recorded; KeyboardInterrupt still stops us
            message = _one_line(exc)
            log(f"[{i}/{n}] {cell.name}: FAILED: {message}")
            rows.append(cell_row(plan, cell, "failed", error=message, seconds=time.perf_counter() - cell_start))
            continue
        seconds = time.perf_counter() - cell_start
        stale = plan.runs_dir / f"{cell.name}.incomplete"  # left by an earlier failed attempt of this cell
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        log(f"[{i}/{n}] {cell.name}: accuracy {metrics['test']['accuracy']:.4f}, F1 {metrics['test']['f1']:.4f} "
            f"({seconds:.0f} s)")
        rows.append(cell_row(plan, cell, "trained", metrics, seconds=seconds))
    seconds = time.perf_counter() - start
    cells, table = tabulate_cells(plan, rows)
    files = write_outputs(plan, cells, table, seconds)
    return CompareResult(plan, cells, table, files, seconds)


__all__ = ["Cell", "ComparePlan", "CompareResult", "load_plan", "plan_from_dict", "run_compare", "summary_text"]
