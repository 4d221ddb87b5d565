"""The command line as a user meets it: one-line errors with non-zero exits, train then predict."""

import json
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import write_csv
from lightune.checkpoints import latest_checkpoint
from lightune.cli import main
from lightune.commands import train as train_command
from lightune.commands.predict import read_texts_file
from lightune.errors import ModelError


def run_cli(*args, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m lightune ARGS` in a fresh interpreter: for what only a process shows (its exit status through
    __main__, signals, what stderr holds when it is a pipe, which modules it imported)."""
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
        (["train", "--method", "prefix"], "invalid choice: 'prefix'"),  # not offered: see README, Methods
        (["train", "--config", "missing.toml"], "config file not found: missing.toml"),
        (["train", "--model", "/definitely/not/a/model"], "cannot load"),
        (["predict", "no-such-run", "great film"], "run directory not found: no-such-run"),
    ],
)
def test_bad_input_is_one_readable_line(lightune_cli, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)  # the relative paths above, and the default output_dir, as from a fresh folder
    assert_one_line_error(lightune_cli(*args), message)


def test_wrong_columns_and_empty_text_in_user_file(lightune_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_csv(tmp_path / "d.csv", [("good", "pos")] * 3, header=("review", "label"))
    assert_one_line_error(lightune_cli("train", "--data", str(path)), "has no column 'text'")
    path = write_csv(tmp_path / "e.csv", [("good", "pos"), ("", "neg")])
    assert_one_line_error(lightune_cli("train", "--data", str(path)), "row 2 has an empty text")


def test_unknown_label_names_the_row(lightune_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_csv(tmp_path / "d.csv", [("good", "pos"), ("bad", "neutral")])
    assert_one_line_error(lightune_cli("train", "--data", str(path), "--labels", "neg,pos"),
                          "row 2 has unknown label 'neutral'")


def test_bad_unlabelled_input_is_one_line_and_exit_2(lightune_cli, tiny_model_dir, reviews_csv, tmp_path):
    base = ("train", "--model", str(tiny_model_dir), "--data", str(reviews_csv), "--output-dir", str(tmp_path))
    (tmp_path / "empty.txt").write_text("\n\n")
    for args, message in (
            (("--unlabeled", str(tmp_path / "none.txt")), f"unlabelled texts not found: '{tmp_path / 'none.txt'}'"),
            (("--unlabeled", str(tmp_path / "empty.txt")), f"{tmp_path / 'empty.txt'} holds no texts"),
            (("--unlabeled", "u.txt", "--problem", "multi_label", "--label-columns", "a,b"),
             "--unlabeled (self-training on pseudo-labels) is for single-label data")):
        result = lightune_cli(*base, *args)
        assert_one_line_error(result, message)
        assert result.returncode == 2


def test_cuda_without_gpu(lightune_cli, tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(lightune_cli("train", "--device", "cuda"), "no CUDA GPU is available")


def test_train_then_predict_from_args_stdin_and_files(lightune_cli, tiny_model_dir, reviews_csv, tmp_path,
                                                      monkeypatch):
    out = tmp_path / "runs"
    monkeypatch.setattr(train_command, "progress_bars", lambda requested: requested)  # as on a terminal: --quiet hides
    result = lightune_cli("train", "--model", str(tiny_model_dir), "--data", str(reviews_csv), "--train-size", "all",
                          "--eval-size", "all", "--max-length", "32", "--epochs", "3", "--lr", "1e-2", "--output-dir",
                          str(out), "--run-name", "cli", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout and (out / "cli" / "report.md").is_file()
    assert "epoch 1" not in result.stderr and "it/s" not in result.stderr  # --quiet: no progress bar at all
    run = str(out / "cli")

    by_args = lightune_cli("predict", run, "great superb film", "awful boring waste", "--json")
    rows = [json.loads(line) for line in by_args.stdout.splitlines()]
    assert [r["label"] for r in rows] == ["pos", "neg"]
    in_bf16 = lightune_cli("predict", run, "great superb film", "awful boring waste", "--json", "--precision", "bf16")
    assert [json.loads(line)["label"] for line in in_bf16.stdout.splitlines()] == ["pos", "neg"]

    by_stdin = lightune_cli("predict", run, stdin="loved it brilliant\n\nterrible dull mess\n")
    assert [line.split("\t")[0] for line in by_stdin.stdout.splitlines()] == ["pos", "neg"]

    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text('{"text": "hated it"}\n{"text": "wonderful moving story"}\n')
    by_file = lightune_cli("predict", run, "--file", str(jsonl), "--json")
    assert [json.loads(line)["label"] for line in by_file.stdout.splitlines()] == ["neg", "pos"]

    interactive = lightune_cli("predict", run, "--interactive", stdin="excellent delightful\n\n")
    assert interactive.returncode == 0 and "pos\t" in interactive.stdout and "neg\t" not in interactive.stdout

    assert_one_line_error(lightune_cli("predict", run, "--file", str(tmp_path / "none.txt")), "file not found")
    assert_one_line_error(lightune_cli("predict", run, ""), "text 1 is empty")


def test_read_texts_file_plain_and_bad_jsonl(tmp_path):
    plain = tmp_path / "t.txt"
    plain.write_text("one\n\n two \n<br />\n\u200b\ufeff\n")  # lines empty once cleaned: skipped like blank ones
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
    import lightune.steps as steps

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(steps, "backward_in_chunks", fail)  # inside the epoch's progress bar
    monkeypatch.setattr(train_command, "progress_bars", lambda requested: requested)  # as on a terminal
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


@pytest.mark.parametrize("flag", ["--weight-decay", "--max-grad-norm", "--dropout", "--lr", "--epochs",
                                  "--validation-fraction", "--test-fraction", "--warmup-ratio"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_numbers_fail_in_validation(capsys, flag, value):
    assert main(["train", flag, value]) == 2
    name = {"--lr": "learning_rate"}.get(flag, flag[2:].replace("-", "_"))
    assert capsys.readouterr().err == f"lightune: error: {name} must be a finite number; got {value}\n"


def test_output_dir_problems_fail_before_loading(tmp_path, capsys):
    file = tmp_path / "file.txt"
    file.write_text("x")
    assert main(["train", "--output-dir", str(file)]) == 2
    assert capsys.readouterr().err == f"lightune: error: output_dir {file}: {file} is not a directory\n"
    assert main(["train", "--run-name", "victim.incomplete"]) == 2
    assert "run_name must not end in .incomplete" in capsys.readouterr().err
    # a folder no directory can be made in (root may write into read-only folders, not into /proc)
    assert main(["train", "--output-dir", "/proc/xyz/runs"]) == 2
    assert capsys.readouterr().err == ("lightune: error: output_dir /proc/xyz/runs: cannot create a directory in /proc "
                                       "(No such file or directory)\n")
    from lightune.config import load_config

    load_config(overrides={"output_dir": str(tmp_path / "new" / "runs")})  # checked by making a folder in tmp_path
    assert list(tmp_path.iterdir()) == [file]  # and removing it


def test_a_path_that_cannot_be_read_or_written_is_one_line_naming_it(monkeypatch, capsys):
    from lightune.commands import predict

    def denied(args):
        raise PermissionError(13, "Permission denied", "/srv/runs/shared/adapter/adapter_model.safetensors")

    monkeypatch.setattr(predict, "run", denied)
    assert main(["predict", "RUN", "great film"]) == 2
    assert capsys.readouterr().err == ("lightune: error: /srv/runs/shared/adapter/adapter_model.safetensors: "
                                       "Permission denied\n")


def test_unreadable_data_file_is_one_line(lightune_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\u00e9,pos\n".encode("latin-1"))
    result = lightune_cli("train", "--data", str(path), "--quiet")
    assert result.returncode == 2
    assert result.stderr == f"lightune: error: {path} is not UTF-8 text: byte 0xe9 at line 2 (byte offset 14)\n"


def test_sigterm_during_training_keeps_the_run_as_incomplete(tiny_model_dir, reviews_csv, tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "lightune", "train", "--model", str(tiny_model_dir), "--data",
                             str(reviews_csv), "--train-size", "all", "--eval-size", "all", "--max-length", "32",
                             "--epochs", "1000", "--output-dir", str(out), "--run-name", "term", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(out.glob(".term.*.partial/config.json")):  # the run is staged: training is under way
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    kept = out / "term.incomplete"
    checkpoint = latest_checkpoint(kept)  # SIGTERM in the training loop: it stops after the step with a checkpoint
    hint = f"stopped at {checkpoint.name}; resume with: lightune train --resume {kept}" if checkpoint else \
        f"unfinished run kept in {kept}, traceback in its error.txt"  # (in the base model's evaluation)
    assert stderr.splitlines()[-1] == f"lightune: terminated (SIGTERM) ({hint})"
    assert "Traceback" not in stderr
    assert "Terminated: terminated by SIGTERM" in (kept / "error.txt").read_text()
    assert (kept / "config.json").is_file() and not (kept / "metrics.json").exists()
    assert not (out / "term").exists() and not list(out.glob(".term*"))


def test_sigterm_handler_is_restored_after_training(monkeypatch, capsys):
    import lightune.training

    previous = signal.getsignal(signal.SIGTERM)
    seen = []

    def fake_training(cfg, progress=True, resume=None):
        seen.append(signal.getsignal(signal.SIGTERM))
        raise KeyboardInterrupt

    monkeypatch.setattr(lightune.training, "run_training", fake_training)
    assert main(["train"]) == 130
    assert seen and seen[0] is not previous and signal.getsignal(signal.SIGTERM) is previous


def test_predict_escapes_terminal_controls_and_refuses_bad_input(trained_tiny_run, tmp_path, capsys):
    run = str(trained_tiny_run.run_dir)
    hostile = "great \x1b]0;pwned\x07film\x1b[2J\tend \u202eevil \x9b31m"
    assert main(["predict", run, hostile]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\x9b" not in out
    assert out.endswith("\tgreat \\x1b]0;pwned\\x07film\\x1b[2J\\tend \\u202eevil \\x9b31m\n")
    assert main(["predict", run, hostile, "--json"]) == 0
    line = capsys.readouterr().out
    assert "\x9b" not in line and "\u202e" not in line and json.loads(line)["text"] == hostile

    latin = tmp_path / "texts.txt"
    latin.write_bytes("good film\nna\u00efve\n".encode("latin-1"))
    assert main(["predict", run, "--file", str(latin)]) == 2
    assert capsys.readouterr().err == f"lightune: error: {latin} is not UTF-8 text: byte 0xef at line 2 (byte offset 12)\n"
    assert main(["predict", run, "a\udcffb"]) == 2  # how Python passes an undecodable byte in an argument
    assert "argument 1 is not UTF-8 text" in capsys.readouterr().err


def test_predict_file_lines_split_only_at_line_feeds(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffone\u2028still one\x85too\r\n\ntwo\n".encode())
    assert read_texts_file(str(path)) == ["one\u2028still one\x85too", "two"]


def test_predict_with_a_damaged_run_exits_2(trained_tiny_run, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained_tiny_run.run_dir, broken)
    (broken / "metrics.json").write_text("")
    assert main(["predict", str(broken), "great film"]) == 2
    assert capsys.readouterr().err.startswith(f"lightune: error: {broken / 'metrics.json'} is damaged: not valid JSON")


def _signal_in_finalizer():
    signal.raise_signal(signal.SIGTERM)  # the handler runs in here, at the next instruction
    sum(range(1000))


class _Freed:
    def __del__(self):
        _signal_in_finalizer()


class _Plain:
    pass


def _finalized():
    """An object with a weakref.finalize callback (a finalizer not named __del__, as tempfile's)."""
    import weakref

    obj = _Plain()
    weakref.finalize(obj, _signal_in_finalizer)
    return obj


@pytest.mark.parametrize("make", [_Freed, _finalized], ids=["__del__", "weakref.finalize"])
def test_sigterm_in_a_finalizer_is_raised_outside_it(capsys, make):
    """SIGTERM just after "run saved" landed in a finalizer (tqdm's or a Dataset's __del__): Python printed the
    Terminated raised there as "Exception ignored in ..." with a traceback, and the signal was lost."""
    from lightune.commands.train import Terminated, _sigterm_raises_terminated

    with pytest.raises(Terminated):
        with _sigterm_raises_terminated():
            make()  # freed at once
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # the handler before it, restored
    assert "Exception ignored" not in capsys.readouterr().err


@pytest.mark.parametrize("blank", ["<br />", "\u200b", "\ufeff", "\x01\x02"])
def test_predict_refuses_texts_empty_once_cleaned(trained_tiny_run, capsys, blank):
    """Like "  ": one line and exit 2, from the command line and the library alike."""
    from lightune.errors import DataError
    from lightune.inference import predict

    assert main(["predict", str(trained_tiny_run.run_dir), "great film", blank]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "lightune: error: text 2 is empty\n")
    with pytest.raises(DataError, match="^text 1 is empty$"):
        predict([blank], trained_tiny_run.run_dir, device="cpu")


@pytest.fixture
def nan_run(trained_tiny_run, tmp_path):
    """A copy of the shared run whose adapter weights are all NaN."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan"
    shutil.copytree(trained_tiny_run.run_dir, broken)
    weights = broken / "adapter" / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(weights).items()}, weights)
    return broken


def test_nan_weights_are_refused_alike_by_predict_evaluate_and_serve(nan_run, capsys):
    """One check (inference.check_finite_weights), one message; serve used to answer probabilities null."""
    from fastapi.testclient import TestClient

    from lightune.serving import Access, AdapterRegistry, AdapterRoot, create_app

    message = f"{nan_run}/adapter/adapter_model.safetensors holds NaN or infinite weights: the run is broken; " \
              "train it again"
    assert main(["predict", str(nan_run), "great film", "--json"]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", f"lightune: error: {message}\n")
    assert main(["evaluate", str(nan_run)]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", f"lightune: error: {message}\n")
    assert not (nan_run.parent / "evaluations").exists()

    registry = AdapterRegistry(device="cpu")
    with pytest.raises(ModelError, match=f"^{re.escape(message)}$"):
        registry.add("nan", nan_run)
    client = TestClient(create_app(registry, access=Access(adapter_root=AdapterRoot(nan_run.parent))))
    response = client.post("/adapters", json={"run_dir": "nan"})
    assert (response.status_code, response.json()) == (400, {"detail": message.replace(str(nan_run), "nan")})


def test_options_may_follow_the_run_and_the_texts(trained_tiny_run, capsys):
    run = str(trained_tiny_run.run_dir)
    assert main(["predict", run, "--json", "great film"]) == 0
    assert [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == ["great film"]
    assert main(["predict", "--device", "cpu", run, "awful mess", "--json", "loved it", "--truncation", "tail"]) == 0
    assert [json.loads(line)["text"] for line in capsys.readouterr().out.splitlines()] == ["awful mess", "loved it"]
    assert main(["predict", run, "--", "--json"]) == 0  # after --, an option's name is a text
    assert capsys.readouterr().out.endswith("\t--json\n")


@pytest.mark.parametrize("args, message", [
    (["predict", "RUN", "--bogus\x1b[2J\u202e"], "lightune: error: unrecognized arguments: --bogus\\x1b[2J\\u202e"),
    (["train", "--epochs", "1\x1b]0;x\x07"], "lightune train: error: argument --epochs: invalid float value: "
                                             "'1\\x1b]0;x\\x07'"),
    (["evaluate"], "lightune evaluate: error: the following arguments are required: run_dir"),
    (["predict"], "lightune predict: error: the following arguments are required: run_dir"),  # texts are optional
])
def test_argument_errors_are_escaped_for_the_terminal(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == message


def test_a_one_line_error_escapes_terminal_controls(capsys):
    assert main(["predict", "no-run\x1b[2J\u202e", "great film"]) == 2
    assert capsys.readouterr().err == "lightune: error: run directory not found: no-run\\x1b[2J\\u202e\n"


def test_every_train_flag_has_help_with_its_default():
    from lightune.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    flags = [a for a in train._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 50
    for action in flags:
        assert action.help and "default" in action.help, action.option_strings
    data = next(a for a in flags if "--data" in a.option_strings)
    assert ".json/" in data.help and ".jsonl" in data.help and ".csv" in data.help
    help_text = train.format_help()
    for shown in ("--dropout DROPOUT", "(default: 0.1)", "--seed SEED", "(default: 42)", "--device DEVICE",
                  "--precision PRECISION", "--max-length MAX_LENGTH", "(default: 256)", "--text-column TEXT_COLUMN"):
        assert shown in help_text


def test_version_and_the_description_names_the_methods(capsys):
    from lightune import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"lightune {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    description = " ".join(capsys.readouterr().out.split())
    for method in ("LoRA", "QLoRA", "DoRA", "IA3", "VeRA", "prompt tuning"):
        assert method in description


def test_predict_checks_the_run_and_the_texts_before_the_heavy_imports(tmp_path):
    code = ("import sys; from lightune.cli import main; code = main(sys.argv[1:]); "
            "print(code, sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, "predict", str(tmp_path / "nope"), "x"], capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.split("\n")[0] == "2 []"
    assert out.stderr.strip() == f"lightune: error: run directory not found: {tmp_path / 'nope'}"


def test_piped_training_shows_no_progress_bars_and_warns_about_tiny_splits(tiny_model_dir, tmp_path):
    from conftest import synthetic_reviews

    data = write_csv(tmp_path / "sixty.csv", synthetic_reviews(60))  # 6 validation and 6 test rows, 3 per label
    result = run_cli("train", "--model", str(tiny_model_dir), "--data", str(data), "--train-size", "all",
                     "--eval-size", "all", "--max-length", "32", "--epochs", "1", "--output-dir",
                     str(tmp_path / "runs"), "--run-name", "tiny")  # no --quiet: stderr is a pipe here
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr and "it/s" not in result.stderr
    warnings = result.stderr.splitlines()
    assert warnings == [
        "warning: the validation split has only 6 rows (under 50): the best checkpoint, the temperature and any "
        "thresholds are chosen on it; give more data or a larger --eval-size / --validation-fraction",
        "warning: the validation split has under 5 rows of some labels (neg 3, pos 3): their scores there are rough",
        "warning: the test split has only 6 rows (under 50): its accuracy is a rough estimate; give more data or a "
        "larger --eval-size / --test-fraction",
        "warning: the test split has under 5 rows of some labels (neg 3, pos 3): their scores there are rough",
    ] + [line for line in warnings[4:] if "below its base" in line]  # a tiny run may end below its base too
    metrics = json.loads((tmp_path / "runs" / "tiny" / "metrics.json").read_text())
    assert metrics["warnings"] == [line.removeprefix("warning: ") for line in warnings]
    report = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    assert all(f"- Warning: {w}" in report for w in metrics["warnings"])
