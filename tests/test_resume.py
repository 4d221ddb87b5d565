"""Checkpoints (--save-every), SIGKILL/SIGTERM in the middle of training, and `lightune train --resume`."""

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import synthetic_reviews, write_csv
from lightune import checkpoints, cli, runs
from lightune.checkpoint_check import CHECKSUMS_KEY
from lightune.checkpoints import STATE_FILE, latest_checkpoint

SETTINGS = dict(epochs=2, learning_rate=1e-2, group_by_length=True)  # LoRA dropout 0.1: the random states matter


def train_command(cfg, **extra) -> list[str]:
    """`python -m lightune train` with cfg's settings (and extra flags)."""
    args = [sys.executable, "-m", "lightune", "train", "--quiet", "--model", cfg.model, "--data", cfg.data,
            "--train-size", "all", "--eval-size", "all", "--max-length", str(cfg.max_length),
            "--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size), "--lr", str(cfg.learning_rate),
            "--output-dir", cfg.output_dir, "--run-name", cfg.run_name, "--head-init", cfg.head_init]
    for key, value in extra.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


def wait_for_checkpoint(process: subprocess.Popen, root: Path, timeout: float = 120) -> Path:
    """The first checkpoint of the run in progress under root (its hidden staged directory)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [c for staged in root.glob(".*.partial") if (c := latest_checkpoint(staged))]
        if found:
            return found[0]
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    process.kill()
    raise AssertionError("no checkpoint appeared")


def assert_same_adapter(run_a: Path, run_b: Path) -> None:
    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (run_a, run_b))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_adapter(tiny_config, capsys):
    from lightune.training import run_training

    reference = run_training(tiny_config(run_name="straight", **SETTINGS), progress=False)
    cfg = tiny_config(run_name="killed", **SETTINGS)
    process = subprocess.Popen(train_command(cfg, save_every=3), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = wait_for_checkpoint(process, Path(cfg.output_dir))
    process.send_signal(signal.SIGKILL)
    process.wait()
    staged = checkpoint.parent
    state = json.loads((latest_checkpoint(staged) / STATE_FILE).read_text())
    assert 0 < state["batches_in_epoch"] < 20 and state["step"] < 40  # mid-epoch, before the end
    assert not (Path(cfg.output_dir) / "killed").exists()

    assert cli.main(["train", "--resume", str(staged), "--quiet"]) == 0
    resumed = Path(cfg.output_dir) / "killed"
    assert runs.is_complete_run(resumed) and not staged.exists()
    assert sorted(p.name for p in resumed.parent.iterdir()) == ["killed", "straight"]  # nothing else left behind
    assert_same_adapter(resumed, reference.run_dir)
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["training"]["resumed_from"] == {"run": staged.name, "step": state["step"]}
    assert metrics["training"]["steps"] == 40 and len(metrics["history"]) == 2
    assert metrics["test"]["accuracy"] == pytest.approx(reference.metrics["test"]["accuracy"])
    assert not list(resumed.glob("*checkpoint*"))


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes(tiny_config, capsys):
    cfg = tiny_config(run_name="stopped", **SETTINGS)
    process = subprocess.Popen(train_command(cfg, save_every=1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    wait_for_checkpoint(process, Path(cfg.output_dir))
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    kept = Path(cfg.output_dir) / "stopped.incomplete"
    assert process.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == (f"lightune: terminated (SIGTERM) (stopped at "
                                            f"{latest_checkpoint(kept).name}; resume with: lightune train --resume "
                                            f"{kept})")
    assert (kept / "error.txt").is_file() and not runs.is_complete_run(kept)
    assert len(list(kept.glob("checkpoint-*"))) == 1  # older checkpoints are removed
    assert not list(Path(cfg.output_dir).glob(".*"))  # no staged or temporary directory left

    assert cli.main(["train", "--resume", str(kept), "--quiet", "--save-every", "7"]) == 0
    done = Path(cfg.output_dir) / "stopped"
    assert runs.is_complete_run(done) and not kept.exists()
    assert json.loads((done / "metrics.json").read_text())["training"]["steps"] == 40


@pytest.fixture
def unfinished_run(tiny_config):
    """A run kept as `<name>.incomplete` with its config.json and error.txt, without a checkpoint."""
    cfg = tiny_config(run_name="halted")
    run = Path(cfg.output_dir) / "halted.incomplete"
    run.mkdir(parents=True)
    runs.write_json(run / "config.json", cfg.to_dict())
    (run / "error.txt").write_text("KeyboardInterrupt\n")
    return run


def _refusal(capsys, *args) -> str:
    assert cli.main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lightune: error: --resume ")
    return err


def test_resume_refuses_what_it_cannot_continue(unfinished_run, interrupted_run, tmp_path, capsys):
    assert "the run has no checkpoint (train with --save-every N" in _refusal(capsys, "--resume", str(unfinished_run))
    shutil.copytree(latest_checkpoint(interrupted_run), unfinished_run / "checkpoint-7")  # a sound checkpoint
    assert "learning_rate 0.5 conflicts with the run's 0.01" in _refusal(
        capsys, "--resume", str(unfinished_run), "--lr", "0.5")
    config = tmp_path / "other.toml"
    config.write_text('method = "full"\n')
    assert "peft 'full' conflicts with the run's 'lora'" in _refusal(
        capsys, "--resume", str(unfinished_run), "--config", str(config))
    plain = tmp_path / "plain"
    plain.mkdir()
    assert "is not a lightune run that did not finish" in _refusal(capsys, "--resume", str(plain))
    assert "no such run directory" in _refusal(capsys, "--resume", str(tmp_path / "missing"))
    with runs.run_lock(unfinished_run):  # as a live training holds its run
        assert "a training is still writing this run" in _refusal(capsys, "--resume", str(unfinished_run))
    (unfinished_run.parent / "halted").mkdir()
    assert f"run directory {unfinished_run.parent / 'halted'} already exists" in _refusal(
        capsys, "--resume", str(unfinished_run))
    assert (unfinished_run / "config.json").is_file()  # a refusal changes nothing


@pytest.fixture(scope="module")
def interrupted_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A run stopped (as by Ctrl-C) right after its first checkpoint: runs/cut.incomplete with checkpoint-7 of a
    40-step schedule (2 epochs of 20 batches)."""
    from lightune.config import load_config
    from lightune.training import run_training

    root = tmp_path_factory.mktemp("interrupted")
    data = write_csv(root / "reviews.csv", synthetic_reviews(400))
    cfg = load_config(overrides=dict(model=str(tiny_model_dir), data=str(data), train_size=None, eval_size=None,
                                     max_length=32, epochs=2, batch_size=16, learning_rate=1e-2, save_every=7,
                                     output_dir=str(root / "runs"), run_name="cut", head_init="random"))
    save = checkpoints.save_checkpoint

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoints, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            run_training(cfg, progress=False)
    run = root / "runs" / "cut.incomplete"
    assert latest_checkpoint(run).name == "checkpoint-7"
    return run


def _contents(root: Path) -> dict[str, str]:
    """Every file and folder under root: its sha256 (a folder: 'dir')."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _truncate(name: str):
    def damage(checkpoint: Path) -> None:
        data = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(data[:len(data) // 2])
    return damage


def _flip_a_byte(name: str):
    def damage(checkpoint: Path) -> None:
        data = bytearray((checkpoint / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (checkpoint / name).write_bytes(bytes(data))
    return damage


def _state(**changes):
    def damage(checkpoint: Path) -> None:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        (checkpoint / STATE_FILE).write_text(json.dumps({**state, **changes}))
    return damage


def _sizes(checkpoint: Path, name: str) -> str:
    size = (checkpoint / name).stat().st_size
    return f"checkpoint-7/{name} is damaged: {size // 2} bytes, {size} when saved"


DAMAGES = {
    "trainable truncated": (_truncate("trainable.safetensors"), lambda c: _sizes(c, "trainable.safetensors")),
    "best truncated": (_truncate("best.safetensors"), lambda c: _sizes(c, "best.safetensors")),
    "optimizer truncated": (_truncate("optimizer.bin"), lambda c: _sizes(c, "optimizer.bin")),
    "scheduler truncated": (_truncate("scheduler.bin"), lambda c: _sizes(c, "scheduler.bin")),
    "optimizer changed": (_flip_a_byte("optimizer.bin"), lambda c: "checkpoint-7/optimizer.bin is damaged: its "
                                                                   "content differs from when it was saved (sha256)"),
    "optimizer missing": (lambda c: (c / "optimizer.bin").unlink(), lambda c: "checkpoint-7/optimizer.bin is missing"),
    "state truncated": (_truncate(STATE_FILE), lambda c: "checkpoint-7/trainer_state.json is damaged: not valid JSON "
                                                         "("),
    "step beyond the schedule": (_state(step=1_000_000_000), lambda c: "checkpoint-7/trainer_state.json does not fit "
                                                                       "the run: step 1000000000, but the run trains "
                                                                       "40 steps"),
    "step off its epoch": (_state(step=8), lambda c: "checkpoint-7/trainer_state.json does not fit the run: step 8 is "
                                                     "not batch 7 of epoch 1 (20 batches an epoch)"),
    "step not a number": (_state(step="7"), lambda c: "checkpoint-7/trainer_state.json is damaged: 'step' is '7', "
                                                      "not an integer >= 0"),
    "best index out of range": (_state(best_index=3), lambda c: "checkpoint-7/trainer_state.json is damaged: "
                                                                "'best_index' is 3, but there is no evaluation yet"),
    "checksums changed": (_state(**{CHECKSUMS_KEY: {"optimizer.bin": "x"}}),
                          lambda c: "checkpoint-7/trainer_state.json is damaged: 'checksums' is not a table of file "
                                    "sizes and sha256 digests"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_checkpoint_is_one_line_and_nothing_is_copied_or_removed(interrupted_run, tmp_path, capsys,
                                                                           damage):
    run = tmp_path / "runs" / "cut.incomplete"
    shutil.copytree(interrupted_run, run)
    checkpoint = run / "checkpoint-7"
    harm, message = DAMAGES[damage]
    expected = f"lightune: error: --resume {run}: {message(checkpoint)}"
    harm(checkpoint)
    before = _contents(run.parent)
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 2
    # the small splits' warnings (data.split_warnings) may come first; the error is one line
    err = "\n".join(line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: "))
    assert len(err.splitlines()) == 1 and err.startswith(expected), err
    assert _contents(run.parent) == before  # no new run, no .incomplete-2, the damaged one as it was


def test_a_checkpoint_records_the_checksums_of_its_files(interrupted_run):
    checkpoint = latest_checkpoint(interrupted_run)
    recorded = json.loads((checkpoint / STATE_FILE).read_text())[CHECKSUMS_KEY]
    files = sorted(p.name for p in checkpoint.iterdir() if p.name != STATE_FILE)
    assert sorted(recorded) == files and {"trainable.safetensors", "best.safetensors", "optimizer.bin",
                                          "scheduler.bin", "random_states_0.pkl"} <= set(files)
    for name, entry in recorded.items():
        data = (checkpoint / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_checkpoint_without_checksums_still_resumes(interrupted_run, tmp_path, capsys):
    """Checkpoints written before checksums existed: their files are checked by loading them."""
    run = tmp_path / "runs" / "cut.incomplete"
    shutil.copytree(interrupted_run, run)
    state = json.loads((run / "checkpoint-7" / STATE_FILE).read_text())
    del state[CHECKSUMS_KEY]
    (run / "checkpoint-7" / STATE_FILE).write_text(json.dumps(state))
    assert cli.main(["train", "--resume", str(run), "--quiet"]) == 0
    done = run.parent / "cut"
    assert runs.is_complete_run(done) and not run.exists()
    assert json.loads((done / "metrics.json").read_text())["training"]["resumed_from"] == {"run": run.name,
                                                                                          "step": 7}
