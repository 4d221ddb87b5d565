"""`lightune compare`: grid validation, the results table, resume, failed cells, plots and the HTML report."""

import json
import math
import shutil
import subprocess
import sys

import pandas as pd
import pytest

import lightune.compare as compare
from lightune.cli import main
from lightune.compare import load_plan, plan_from_dict, run_compare
from lightune.errors import ConfigError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def spec(tiny_model_dir, reviews_csv, tmp_path):
    """Factory: a comparison spec on the tiny model, a few steps per cell, run in-process."""

    def make(grid, **base):
        values = dict(model=str(tiny_model_dir), data=str(reviews_csv), train_size=None, eval_size=None,
                      max_length=32, max_steps=8, batch_size=16, learning_rate=1e-2)
        values.update(base)
        return {"compare": {"name": "grid", "output_dir": str(tmp_path / "out"), "isolate": False},
                "base": values, "grid": grid}

    return make


def count_calls(monkeypatch, fail_for: dict | None = None):
    """Wrap run_training to count calls (and raise for chosen run names)."""
    calls = []
    real = compare.run_training

    def wrapped(cfg, progress=True, **kwargs):
        calls.append(cfg.run_name)
        if fail_for and cfg.run_name in fail_for:
            raise fail_for[cfg.run_name]
        return real(cfg, progress=progress, **kwargs)

    monkeypatch.setattr(compare, "run_training", wrapped)
    return calls


def quiet(_message):
    pass


def test_grid_cells_names_and_target_presets(spec):
    plan = plan_from_dict(spec({"target_modules": ["query", "query,value", "all-linear"], "seed": [1, 2]}))
    assert len(plan.cells) == 6
    assert [c.name for c in plan.cells[:3]] == ["target_modules=query_seed=1", "target_modules=query_seed=2",
                                                "target_modules=query+value_seed=1"]
    assert plan.cells[2].cfg.target_modules == ["query", "value"]
    assert plan.cells[4].cfg.target_modules == ["all-linear"]
    assert plan.cells[2].config == "target_modules=query+value"
    assert all(c.cfg.output_dir == str(plan.root / "runs") and c.cfg.run_name == c.name for c in plan.cells)
    assert plan.config_keys == ["target_modules"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["grid"].update(rnak=[4, 8]), "unknown [grid] key(s): rnak"),
        (lambda s: s["base"].update(lr=1e-3), "unknown [base] key(s): lr"),
        (lambda s: s.update(extra={}), "unknown table(s) in comparison file: extra"),
        (lambda s: s["compare"].update(nmae="x"), "unknown [compare] key(s): nmae"),
        (lambda s: s["grid"].update(rank=[4, 0]), "grid cell rank=0_method=lora: rank must be >= 1; got 0"),
        (lambda s: s["grid"].update(method=["lora", "prefix"]), "method must be one of"),
        (lambda s: s["grid"].update(rank=4), "[grid] rank must be a non-empty list"),
        (lambda s: s["grid"].update(rank=[4, 4]), "[grid] rank lists a value twice"),
        (lambda s: s["grid"].update(train_size=[100, 200]), "[grid] cannot vary train_size"),
        (lambda s: s["base"].update(run_name="x"), "[base] cannot set run_name"),
    ],
)
def test_bad_grid_fails_in_one_line_before_training(spec, monkeypatch, change, message):
    calls = count_calls(monkeypatch)
    raw = spec({"rank": [2, 4], "method": ["lora"]})
    change(raw)
    with pytest.raises(ConfigError) as info:
        run_compare(plan_from_dict(raw), log=quiet)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert calls == []


def test_two_by_two_grid_table_plots_report_and_resume(spec, monkeypatch):
    calls = count_calls(monkeypatch)
    plan = plan_from_dict(spec({"method": ["lora", "head"], "seed": [1, 2]}))
    result = run_compare(plan, progress=False, log=quiet)
    assert len(calls) == 4 and result.failed == 0

    cells = pd.read_csv(plan.root / "cells.csv")
    assert len(cells) == 4 and set(cells["status"]) == {"trained"}
    assert list(cells["cell"]) == ["method=lora_seed=1", "method=lora_seed=2", "method=head_seed=1",
                                   "method=head_seed=2"]
    table = pd.read_csv(plan.root / "results.csv")
    assert list(table["config"]) == ["method=lora", "method=head"]
    for column in ("method", "seeds", "accuracy_mean", "accuracy_std", "f1_mean", "f1_std", "base_accuracy",
                   "trainable_params", "trainable_share", "weights_mb", "peak_mb", "train_seconds",
                   "train_samples_per_s", "eval_samples_per_s"):
        assert column in table.columns, column
    assert list(table["seeds"]) == [2, 2]
    lora = cells[cells["method"] == "lora"]
    assert table.loc[0, "accuracy_mean"] == pytest.approx(lora["accuracy"].mean())
    assert table.loc[0, "accuracy_std"] == pytest.approx(lora["accuracy"].std(ddof=1))
    metrics = json.loads((plan.runs_dir / "method=lora_seed=1" / "metrics.json").read_text())
    assert cells.loc[0, "accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert cells.loc[0, "weights_mb"] == pytest.approx(metrics["memory"]["weights_bytes"] / 2**20)
    assert metrics["training"]["steps"] == 8 and set(cells["train_steps"]) == {8}
    assert cells["test_fingerprint"].nunique() == 1  # same data and split for every cell
    head = table[table["method"] == "head"].iloc[0]
    assert head["trainable_params"] < table.loc[0, "trainable_params"]  # head-only trains fewer than LoRA + head
    assert 0 < head["trainable_share"] < 1

    md = (plan.root / "results.md").read_text()
    assert "| method | seeds | accuracy | F1 |" in md and md.count("\n| lora |") == 1 and " ± " in md
    for name in ("accuracy_vs_params", "accuracy_per_config", "memory_per_method"):
        data = (plan.root / "plots" / f"{name}.png").read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000, name
    report = (plan.root / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 3 and "<table>" in report
    assert "<td class=\"key\">head</td>" in report and 'src="plots/' not in report  # self-contained

    # a re-run trains nothing: every finished cell is reused and the table is the same
    again = run_compare(plan_from_dict(spec({"method": ["lora", "head"], "seed": [1, 2]})), log=quiet)
    assert len(calls) == 4
    assert set(again.cells["status"]) == {"reused"}
    pd.testing.assert_frame_equal(pd.read_csv(plan.root / "results.csv"), table)

    # an interrupted comparison resumes: only the missing cell is trained
    import shutil

    shutil.rmtree(plan.runs_dir / "method=head_seed=2")
    run_compare(plan, progress=False, log=quiet)
    assert calls[4:] == ["method=head_seed=2"]

    # a finished cell trained with another configuration is not silently reused
    with pytest.raises(ConfigError, match="trained with a different configuration \\(learning_rate"):
        run_compare(plan_from_dict(spec({"method": ["lora", "head"], "seed": [1, 2]}, learning_rate=5e-3)),
                    log=quiet)


def test_failed_cell_is_recorded_and_the_rest_go_on(spec, monkeypatch):
    calls = count_calls(monkeypatch, fail_for={"rank=4_target_modules=query": RuntimeError("boom\nsecond line")})
    raw = spec({"rank": [2, 4], "target_modules": ["query", "no_such_module"]})
    plan = plan_from_dict(raw)
    result = run_compare(plan, progress=False, log=quiet)
    assert len(calls) == 4 and result.failed == 3
    cells = pd.read_csv(plan.root / "cells.csv").set_index("cell")
    assert cells.loc["rank=4_target_modules=query", "error"] == "RuntimeError: boom"
    assert "cannot attach LoRA" in cells.loc["rank=2_target_modules=no_such_module", "error"]
    assert cells.loc["rank=2_target_modules=query", "status"] == "trained"
    assert not math.isnan(cells.loc["rank=2_target_modules=query", "accuracy"])
    table = pd.read_csv(plan.root / "results.csv").set_index("config")
    assert len(table) == 4
    assert table.loc["rank=4 target_modules=query", "failed"] == 1
    assert table.loc["rank=4 target_modules=query", "seeds"] == 0
    assert table.loc["rank=2 target_modules=query", "seeds"] == 1
    assert "Failed cells:" in (plan.root / "results.md").read_text()
    assert "RuntimeError: boom" in (plan.root / "report.html").read_text()
    for name in ("accuracy_vs_params", "accuracy_per_config", "memory_per_method"):
        assert (plan.root / "plots" / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE

    # a re-run retries only the failed cells; a crashed run's .incomplete directory does not block the retry
    (plan.runs_dir / "rank=4_target_modules=query.incomplete").mkdir(exist_ok=True)
    monkeypatch.undo()
    retried = count_calls(monkeypatch)
    run_compare(plan, progress=False, log=quiet)
    assert sorted(retried) == ["rank=2_target_modules=no_such_module", "rank=4_target_modules=no_such_module",
                               "rank=4_target_modules=query"]
    cells = pd.read_csv(plan.root / "cells.csv").set_index("cell")
    assert cells.loc["rank=4_target_modules=query", "status"] == "trained"
    assert cells.loc["rank=2_target_modules=query", "status"] == "reused"
    assert not (plan.runs_dir / "rank=4_target_modules=query.incomplete").exists()


def test_ctrl_c_stops_the_comparison(spec, monkeypatch):
    count_calls(monkeypatch, fail_for={"rank=2": KeyboardInterrupt()})
    with pytest.raises(KeyboardInterrupt):
        run_compare(plan_from_dict(spec({"rank": [2, 4]})), log=quiet)


def test_cells_in_fresh_processes(spec, capfd):
    """The default: each cell in its own process; a failure there is recorded like any other."""
    raw = spec({"target_modules": ["query", "no_such_module"]}, max_steps=2)
    raw["compare"]["isolate"] = True
    result = run_compare(plan_from_dict(raw), progress=False, log=quiet)
    assert "tokenizing" not in capfd.readouterr().err  # a cell shows the bars `lightune train` shows: none here
    status = dict(zip(result.cells["cell"], result.cells["status"]))
    assert status == {"target_modules=query": "trained", "target_modules=no_such_module": "failed"}
    assert "cannot attach LoRA" in result.cells.set_index("cell").loc["target_modules=no_such_module", "error"]


def test_yaml_and_toml_files(spec, tmp_path):
    raw = spec({"rank": [2, 4]})
    yaml = pytest.importorskip("yaml")
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert [c.name for c in load_plan(path).cells] == ["rank=2", "rank=4"]
    toml = tmp_path / "mine.toml"
    toml.write_text('[base]\nmethod = "lora"\n[grid]\nrank = [4, 8]\nseed = [1, 2]\n')
    plan = load_plan(toml, output_dir=str(tmp_path / "o"))
    assert plan.name == "mine" and plan.root == tmp_path / "o" / "mine" and len(plan.cells) == 4


def test_example_file_is_valid():
    from pathlib import Path

    plan = load_plan(Path(__file__).parents[1] / "examples" / "compare-lora.toml")
    assert [c.config for c in plan.cells] == [f"rank={r} method={m}" for r in (4, 16, 32) for m in ("lora", "qlora")]
    assert all(c.cfg.target_modules == ["query"] for c in plan.cells)


def test_cli_compare(spec, tmp_path, capsys):
    path = tmp_path / "c.toml"
    raw = spec({"rank": [2]}, max_steps=2, train_size=200, eval_size=30)  # TOML has no None
    lines = ["[compare]", 'name = "cli"', "[base]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in raw["base"].items()]
    lines += ["[grid]", "rank = [2]"]
    path.write_text("\n".join(lines) + "\n")
    assert main(["compare", str(path), "--output-dir", str(tmp_path / "o"), "--quiet", "--in-process"]) == 0
    out = capsys.readouterr().out
    assert "rank" in out and "report: " in out and (tmp_path / "o" / "cli" / "report.html").is_file()

    path.write_text("[grid]\nrnak = [2]\n")
    assert main(["compare", str(path)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "lightune: error: unknown [grid] key(s): rnak"


def test_cli_missing_file_is_one_line(lightune_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = lightune_cli("compare", "missing.toml")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "lightune: error: config file not found: missing.toml"


def test_grid_over_peft_and_quantize(spec):
    plan = plan_from_dict(spec({"peft": ["lora", "dora"], "quantize": ["none", "nf4"]}))
    assert [c.cfg.method for c in plan.cells] == ["lora", "qlora", "dora", "dora+nf4"]
    assert plan.cells[1].name == "peft=lora_quantize=nf4"
    with pytest.raises(ConfigError, match="grid cell method=qlora_peft=dora: method 'qlora' means peft 'lora'"):
        plan_from_dict(spec({"method": ["qlora"], "peft": ["dora"]}))
    with pytest.raises(ConfigError, match="grid cell peft=full: quantize 'nf4' needs an adapter method"):
        plan_from_dict(spec({"peft": ["full"]}, quantize="nf4"))


def test_finished_cells_of_an_older_lightune_are_reused(spec, monkeypatch, tmp_path):
    """A cell whose run was written before peft and quantize existed (config with `method` only) is reused."""
    from conftest import as_old_run

    plan = plan_from_dict(spec({"method": ["lora"]}, max_steps=2))
    run_compare(plan, progress=False, log=quiet)
    cell = plan.runs_dir / "method=lora"
    as_old_run(cell, tmp_path / "old")
    shutil.rmtree(cell)
    (tmp_path / "old").rename(cell)
    calls = count_calls(monkeypatch)
    result = run_compare(plan, progress=False, log=quiet)
    assert calls == [] and list(result.cells["status"]) == ["reused"]


def test_reading_a_plan_loads_neither_torch_nor_the_cli(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text('[grid]\nmethod = ["lora", "qlora"]\n')
    code = ("import sys; from lightune.compare_plan import load_plan; load_plan(sys.argv[1]); "
            "assert 'torch' not in sys.modules, 'torch'; import lightune.compare; "
            "assert 'lightune.cli' not in sys.modules, 'cli'")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_the_table_shows_the_objective_each_configuration_resolved_to(spec):
    from lightune.compare_report import cell_row, display_rows, results_markdown, tabulate_cells

    plan = plan_from_dict(spec({"pooling": ["mean", "cls"]}, train_size=48, head_init="probe"))
    objectives = {"pooling=mean": "contrastive", "pooling=cls": "cross_entropy"}  # what `auto` chose per cell
    rows = [cell_row(plan, cell, "trained", {"test": {"accuracy": 0.8, "f1": 0.8},
                                             "training": {"objective": objectives[cell.name]}}) for cell in plan.cells]
    cells, table = tabulate_cells(plan, rows)
    header, shown = display_rows(plan, table)
    column = header.index("objective")
    assert {row[0]: row[column] for row in shown} == {"mean": "contrastive", "cls": "cross_entropy"}
    assert "| objective |" in results_markdown(plan, cells, table, 1.0)
