"""The command line as a user meets it: one-line errors with non-zero exits, train then predict."""

import json
import subprocess
import sys

import pytest

from conftest import write_csv
from lightune.cli import main, read_texts_file


def run_cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightune", *args], input=stdin, capture_output=True, text=True,
                          timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("lightune") and message in lines[-1], result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "no/such/file.csv"], "data not found: 'no/such/file.csv'"),
        (["train", "--rank", "0"], "rank must be >= 1"),
        (["train", "--method", "prompt"], "invalid choice: 'prompt'"),
        (["train", "--config", "missing.toml"], "config file not found: missing.toml"),
        (["train", "--model", "/definitely/not/a/model"], "cannot load"),
        (["predict", "no-such-run", "great film"], "run directory not found: no-such-run"),
    ],
)
def test_bad_input_is_one_readable_line(args, message):
    assert_one_line_error(run_cli(*args), message)


def test_wrong_columns_and_empty_text_in_user_file(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("good", "pos")] * 3, header=("review", "label"))
    assert_one_line_error(run_cli("train", "--data", str(path)), "has no column 'text'")
    path = write_csv(tmp_path / "e.csv", [("good", "pos"), ("", "neg")])
    assert_one_line_error(run_cli("train", "--data", str(path)), "row 2 has an empty text")


def test_unknown_label_names_the_row(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("good", "pos"), ("bad", "neutral")])
    assert_one_line_error(run_cli("train", "--data", str(path), "--labels", "neg,pos"),
                          "row 2 has unknown label 'neutral'")


def test_cuda_without_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert_one_line_error(run_cli("train", "--device", "cuda"), "no CUDA GPU is available")


def test_train_then_predict_from_args_stdin_and_files(tiny_model_dir, reviews_csv, tmp_path):
    out = tmp_path / "runs"
    result = run_cli("train", "--model", str(tiny_model_dir), "--data", str(reviews_csv), "--train-size", "all",
                     "--eval-size", "all", "--max-length", "32", "--epochs", "3", "--lr", "1e-2", "--output-dir",
                     str(out), "--run-name", "cli", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout and (out / "cli" / "report.md").is_file()
    run = str(out / "cli")

    by_args = run_cli("predict", run, "great superb film", "awful boring waste", "--json")
    rows = [json.loads(line) for line in by_args.stdout.splitlines()]
    assert [r["label"] for r in rows] == ["pos", "neg"]

    by_stdin = run_cli("predict", run, stdin="loved it brilliant\n\nterrible dull mess\n")
    assert [line.split("\t")[0] for line in by_stdin.stdout.splitlines()] == ["pos", "neg"]

    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text('{"text": "hated it"}\n{"text": "wonderful moving story"}\n')
    by_file = run_cli("predict", run, "--file", str(jsonl), "--json")
    assert [json.loads(line)["label"] for line in by_file.stdout.splitlines()] == ["neg", "pos"]

    interactive = run_cli("predict", run, "--interactive", stdin="excellent delightful\n\n")
    assert interactive.returncode == 0 and "pos\t" in interactive.stdout and "neg\t" not in interactive.stdout

    assert_one_line_error(run_cli("predict", run, "--file", str(tmp_path / "none.txt")), "file not found")
    assert_one_line_error(run_cli("predict", run, ""), "text 1 is empty")


def test_read_texts_file_plain_and_bad_jsonl(tmp_path):
    plain = tmp_path / "t.txt"
    plain.write_text("one\n\n two \n")
    assert read_texts_file(str(plain)) == ["one", " two "]
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"text": "a"}\nnot json\n')
    from lightune.errors import DataError

    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_texts_file(str(bad))


def test_main_returns_exit_code_without_subprocess(capsys):
    assert main(["train", "--epochs", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "lightune: error: epochs must be > 0; got -1.0"


def test_unexpected_failure_ends_the_progress_bar_and_names_the_incomplete_run(tiny_model_dir, reviews_csv, tmp_path,
                                                                               monkeypatch, capsys):
    import lightune.training as training

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(training, "backward_in_chunks", fail)  # inside the epoch's progress bar
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(reviews_csv), "--max-length", "32",
                 "--output-dir", str(tmp_path), "--run-name", "boom"])
    assert code == 1
    err = capsys.readouterr().err
    assert "epoch 1" in err  # the bar was drawn ...
    last_line = err.rstrip("\n").splitlines()[-1].split("\r")[-1]  # ... and cleared before the error line
    failed = tmp_path / "boom.incomplete"
    assert last_line == (f"lightune: error: RuntimeError: boom (unfinished run kept in {failed}, "
                         "traceback in its error.txt)")
    assert "RuntimeError: boom" in (failed / "error.txt").read_text()
