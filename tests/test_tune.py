"""`lightune tune`: the search file's validation, the study (best trial = its run's validation metric, pruning,
Pareto front), resume after a killed search, two workers, best.toml and the report."""

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

optuna = pytest.importorskip("optuna", reason="the tune extra: pip install -e '.[tune]'")

import lightune.tune as tune  # noqa: E402
from lightune.cli import main  # noqa: E402
from lightune.config import load_config  # noqa: E402
from lightune.errors import ConfigError  # noqa: E402
from lightune.runs import read_run  # noqa: E402
from lightune.tune import run_tune  # noqa: E402
from lightune.tune_plan import load_plan, plan_from_dict  # noqa: E402
from lightune.tune_report import toml_value  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEARCH = {"learning_rate": {"low": 1e-3, "high": 3e-2, "log": True}, "rank": {"choices": [2, 4]}}


@pytest.fixture
def spec(tiny_model_dir, reviews_csv, tmp_path):
    """Factory: a search on the tiny model, 4 steps per trial with an evaluation every 2, trained in-process."""

    def make(search=None, **meta):
        values = dict(model=str(tiny_model_dir), data=str(reviews_csv), max_length=32, max_steps=4, eval_steps=2,
                      batch_size=16, head_init="random")
        return {"tune": {"name": "search", "output_dir": str(tmp_path / "out"), "trials": 3, "isolate": False,
                         **meta},
                "base": values, "search": copy.deepcopy(SEARCH) if search is None else search}

    return make


def write_search(path, raw) -> str:
    lines = []
    for table, values in raw.items():
        lines.append(f"[{table}]")
        for key, value in values.items():
            if isinstance(value, dict):
                inner = ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items())
                lines.append(f"{key} = {{{inner}}}")
            else:
                lines.append(f"{key} = {toml_value(value)}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def count_trainings(monkeypatch):
    calls = []
    real = tune.train_cell

    def wrapped(cfg, isolate, progress, on_evaluation=None):
        calls.append(cfg.run_name)
        return real(cfg, isolate, progress, on_evaluation)

    monkeypatch.setattr(tune, "train_cell", wrapped)
    return calls


def quiet(_message):
    pass


def validation_at_best(metrics, metric="accuracy"):
    step = metrics["best"]["step"]
    return [e for e in metrics["history"] if e["step"] == step][-1]["validation"][metric]


def study_of(plan, file="study.db"):
    path = plan.root / file
    if file.endswith(".journal"):
        from optuna.storages.journal import JournalFileBackend

        storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    else:
        storage = f"sqlite:///{path}"
    return optuna.load_study(study_name=plan.name, storage=storage)


def test_search_best_trial_is_its_runs_validation_metric_and_best_toml_trains(spec, monkeypatch):
    calls = count_trainings(monkeypatch)
    plan = plan_from_dict(spec())
    result = run_tune(plan, progress=False, log=quiet)
    assert calls == ["trial-0", "trial-1", "trial-2"] and result.counts == {"complete": 3, "pruned": 0, "fail": 0}

    study = study_of(plan)
    for trial in study.trials:
        metrics = read_run(plan.runs_dir / f"trial-{trial.number}").metrics
        assert trial.value == validation_at_best(metrics)  # validation, not test
        # the pruner saw every evaluation's validation accuracy
        assert trial.intermediate_values == {e["step"]: e["validation"]["accuracy"] for e in metrics["history"]}
        assert metrics["config"]["rank"] == trial.params["rank"]
        assert metrics["config"]["learning_rate"] == trial.params["learning_rate"]
    best = max(study.trials, key=lambda t: (t.value, -t.number))
    assert result.best["number"] == best.number and result.best["values"] == [best.value]
    best_run = read_run(plan.runs_dir / f"trial-{best.number}")
    assert result.best["test"] == best_run.metrics["test"]

    # best.toml is a `lightune train --config` file with the best trial's configuration
    cfg = load_config(plan.root / "best.toml")
    trained = {k: v for k, v in best_run.config.items() if k not in ("output_dir", "run_name", "resolved")}
    wanted = {k: v for k, v in cfg.to_dict().items() if k not in ("output_dir", "run_name", "resolved")}
    assert wanted == trained

    table = pd.read_csv(plan.root / "trials.csv")
    assert list(table["trial"]) == [0, 1, 2] and set(table["state"]) == {"complete"}
    assert list(table["accuracy"]) == [t.value for t in study.trials]
    assert "| trial | state | accuracy | learning_rate | rank |" in (plan.root / "trials.md").read_text()
    for name in ("history", "importances", "intermediate"):
        assert (plan.root / "plots" / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE, name
    report = (plan.root / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 3 and f"Best trial: {best.number}" in report

    # run again: nothing is trained; with more trials only the new ones are
    assert run_tune(plan_from_dict(spec()), progress=False, log=quiet).counts["complete"] == 3
    assert len(calls) == 3
    run_tune(plan_from_dict(spec(trials=4)), progress=False, log=quiet)
    assert calls[3:] == ["trial-3"]
    # a different search is not mixed into this study
    with pytest.raises(ConfigError, match=r"was started with a different search \(search.rank\)"):
        run_tune(plan_from_dict(spec({**SEARCH, "rank": [2, 8]})), progress=False, log=quiet)


def test_pruned_trial_in_a_fresh_process(spec, monkeypatch):
    """The pruner's verdict reaches a trial trained in its own process; the trial is pruned, its run unfinished."""
    monkeypatch.setattr(tune, "_pruner", lambda plan: optuna.pruners.ThresholdPruner(lower=1.01))
    plan = plan_from_dict(spec(trials=1, isolate=True))
    result = run_tune(plan, progress=False, log=quiet)
    assert result.counts == {"complete": 0, "pruned": 1, "fail": 0} and result.best is None
    trial = study_of(plan).trials[0]
    assert list(trial.intermediate_values) == [2]  # stopped at its first evaluation
    assert not (plan.runs_dir / "trial-0").exists() and (plan.runs_dir / "trial-0.incomplete").is_dir()
    assert not (plan.root / "best.toml").exists()


def test_killed_search_resumes_without_rerunning_finished_trials(spec, tmp_path, monkeypatch):
    raw = spec()
    path = write_search(tmp_path / "search.toml", raw)
    plan = load_plan(path)
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lightune", "tune", path, "--quiet"], stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
    deadline = time.time() + 240
    while not list(plan.runs_dir.glob(".trial-1.*.partial")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-trial: trial 0 finished, trial 1 training
    proc.wait()
    assert "trial 1: " in log.read_text(), log.read_text()
    states = {t.number: t.state.name for t in study_of(plan).trials}
    assert states == {0: "COMPLETE", 1: "RUNNING"}
    finished = (plan.runs_dir / "trial-0" / "metrics.json").stat().st_mtime_ns

    calls = count_trainings(monkeypatch)
    messages = []
    result = run_tune(plan, progress=False, log=messages.append)
    assert "trial 1: its process ended before it finished; marked failed" in messages
    assert calls == ["trial-2", "trial-3"]  # trial 0 kept, not re-run; the killed trial not counted as done
    states = {t.number: t.state.name for t in study_of(plan).trials}
    assert states == {0: "COMPLETE", 1: "FAIL", 2: "COMPLETE", 3: "COMPLETE"}
    assert (plan.runs_dir / "trial-0" / "metrics.json").stat().st_mtime_ns == finished
    assert not (plan.runs_dir / "trial-1").exists()  # the killed trial's staged run is kept as unfinished
    error = (plan.runs_dir / "trial-1.incomplete" / "error.txt").read_text()
    assert "the search ended while this trial trained" in error
    assert not list(plan.runs_dir.glob(".trial-*"))
    table = pd.read_csv(plan.root / "trials.csv").set_index("trial")
    assert table.loc[1, "state"] == "fail" and table.loc[1, "error"] == "its process ended before the trial finished"
    assert result.counts == {"complete": 3, "pruned": 0, "fail": 1}


def test_two_workers_run_every_trial_once(spec, monkeypatch):
    plan = plan_from_dict(spec(trials=3, workers=2))
    real = tune.train_cell

    def wait_for_worker_1(cfg, isolate, progress, on_evaluation=None):
        """Worker 0 (this process) starts training only once worker 1 (a fresh process) runs a trial too."""
        deadline = time.time() + 240
        while time.time() < deadline and not any(
                t.user_attrs.get("worker") == 1 for t in study_of(plan, "study.journal").trials):
            time.sleep(0.2)
        return real(cfg, isolate, progress, on_evaluation)

    monkeypatch.setattr(tune, "train_cell", wait_for_worker_1)
    result = run_tune(plan, progress=False, log=quiet)
    assert (plan.root / "study.journal").is_file() and not (plan.root / "study.db").exists()
    trials = study_of(plan, "study.journal").trials
    assert [t.number for t in trials] == [0, 1, 2] and {t.state.name for t in trials} == {"COMPLETE"}
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}
    assert sorted(p.name for p in plan.runs_dir.iterdir()) == ["trial-0", "trial-1", "trial-2"]
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 3  # the workers sample apart
    assert result.counts["complete"] == 3


def test_two_objectives_give_the_pareto_front(spec):
    plan = plan_from_dict(spec(objectives="accuracy,seconds"))
    result = run_tune(plan, progress=False, log=quiet)
    trials = study_of(plan).trials
    for trial in trials:
        metrics = read_run(plan.runs_dir / f"trial-{trial.number}").metrics
        assert trial.values == [validation_at_best(metrics), metrics["training"]["seconds"]]

    def dominated(t):
        return any(o.values[0] >= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values
                   for o in trials)

    assert result.pareto == sorted(t.number for t in trials if not dominated(t)) and result.pareto
    front = [t for t in trials if t.number in result.pareto]
    assert result.best["number"] == max(front, key=lambda t: (t.values[0], -t.number)).number
    assert (plan.root / "plots" / "pareto_front.png").read_bytes()[:8] == PNG_SIGNATURE
    for number in result.pareto:
        assert load_config(plan.root / "pareto" / f"trial-{number}.toml").rank == trials[number].params["rank"]
    assert "Pareto front" in (plan.root / "report.html").read_text()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["search"].update(rnak=[2, 4]), "unknown [search] key(s): rnak"),
        (lambda s: s["base"].update(lr=1e-3), "unknown [base] key(s): lr"),
        (lambda s: s["tune"].update(trails=3), "unknown [tune] key(s): trails"),
        (lambda s: s.update(grid={}), "unknown table(s) in search file: grid"),
        (lambda s: s["search"].update(learning_rate={"low": 1e-2, "high": 1e-4}),
         "[search] learning_rate: the range is reversed: low 0.01 > high 0.0001"),
        (lambda s: s["search"].update(dropout={"low": 0.1, "high": 0.1}),
         "[search] dropout: the range is empty: low = high = 0.1"),
        (lambda s: s["search"].update(rank={"choices": []}), "[search] rank: choices must be a non-empty list"),
        (lambda s: s["search"].update(rank={"choices": [4, 0]}),
         "[search] rank: choice 0 is refused: rank must be >= 1; got 0"),
        (lambda s: s["search"].update(method=["lora", "prefix"]), "[search] method: choice 'prefix' is refused"),
        (lambda s: s["search"].update(dropout={"low": 0.0, "high": 1.0}),
         "[search] dropout: bound 1.0 is refused: dropout must be < 1"),
        (lambda s: s["search"].update(learning_rate={"low": 0.0, "high": 1e-2, "log": True}),
         "[search] learning_rate: a log range needs low > 0"),
        (lambda s: s["search"].update(rank={"low": 2, "high": 9, "step": 2}), "must be a multiple of step 2"),
        (lambda s: s["search"].update(rank={"lo": 2, "high": 8}), "[search] rank: unknown key(s) lo"),
        (lambda s: s["search"].update(train_size={"low": 100, "high": 200}), "[search] cannot vary train_size"),
        (lambda s: s.update(search={}), "[search] is empty"),
        (lambda s: s["tune"].update(objectives="acc"), "unknown objective(s) acc"),
        (lambda s: s["tune"].update(objectives="seconds,memory"), "have no validation metric"),
        (lambda s: s["tune"].update(objectives="accuracy,accuracy"), "objectives name one twice"),
        (lambda s: s["tune"].update(objectives=""), "objectives must name one or more"),
        (lambda s: s["tune"].update(objectives="accuracy,memory"), "the memory objective needs isolated trials"),
        (lambda s: s["tune"].update(trials=0), "trials must be an integer >= 1; got 0"),
        (lambda s: s["tune"].update(pruner="asha"), "[tune] pruner must be one of median, hyperband, none"),
    ],
)
def test_bad_search_fails_in_one_line_before_training(spec, monkeypatch, change, message):
    calls = count_trainings(monkeypatch)
    raw = spec()
    change(raw)
    with pytest.raises(ConfigError) as info:
        run_tune(plan_from_dict(raw), progress=False, log=quiet)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert calls == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--objectives", "accuracy,flops"], "lightune: error: unknown objective(s) flops"),
        (["--trials", "many"], "lightune: error: trials must be an integer >= 1; got 'many'"),
        (["--workers", "0"], "lightune: error: workers must be an integer >= 1; got 0"),
        (["--storage", "not a url"], "lightune: error: --storage must be a database URL"),
    ],
)
def test_cli_bad_flags_exit_2_with_one_line(spec, tmp_path, capsys, flags, message):
    path = write_search(tmp_path / "search.toml", spec())
    assert main(["tune", path, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_sqlite_study_is_not_shared_by_several_workers(spec):
    plan = plan_from_dict(spec(workers=2))
    plan.root.mkdir(parents=True)
    (plan.root / "study.db").touch()
    with pytest.raises(ConfigError, match="study.db is a SQLite study, which Optuna advises against for several"):
        run_tune(plan, progress=False, log=quiet)


def test_storage_url_holds_the_study_with_a_heartbeat(spec, tmp_path):
    """--storage: the study lives in the given database (here SQLite by URL, standing in for PostgreSQL), with
    Optuna's heartbeat on; the study directory gets the runs and the results, no study file of its own."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    plan = plan_from_dict(spec(trials=1, search={"rank": [2, 4]}))
    result = run_tune(plan, storage=url, progress=False, log=quiet)
    assert result.counts["complete"] == 1 and result.storage == url
    assert not (plan.root / "study.db").exists() and not (plan.root / "study.journal").exists()
    study = optuna.load_study(study_name=plan.name, storage=url)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    assert tune.StorageRef("rdb", url, local=False).open().get_heartbeat_interval() == tune.HEARTBEAT_S
    with pytest.raises(ConfigError, match=r"cannot open the study storage mysql\+nosuchdriver://u:\*\*\*@host/db: "):
        tune.StorageRef("rdb", "mysql+nosuchdriver://u:secret@host/db", local=False).open()  # password hidden


@pytest.mark.parametrize("terminal", [False, True])
def test_cli_draws_progress_bars_only_on_a_terminal(spec, tmp_path, capsys, monkeypatch, terminal):
    """Piped or redirected (a log), `lightune tune` passes progress=False to the search, as train and compare do:
    otherwise every trial's bars would leave carriage returns and `[A` lines in the log."""
    asked = []

    def record(plan, storage=None, progress=True, **kwargs):
        asked.append(progress)
        raise ConfigError("stopped before training")

    monkeypatch.setattr(tune, "run_tune", record)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    assert main(["tune", write_search(tmp_path / "search.toml", spec())]) == 2
    assert asked == [terminal]
    assert capsys.readouterr().err.strip().endswith("lightune: error: stopped before training")
