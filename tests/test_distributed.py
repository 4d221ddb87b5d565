"""Two processes on CPU (gloo) launched by torchrun: the same adapter as one process with the same global
batch, one run written (by the main process), and evaluation rows counted once each across uneven shards."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lightune import runs
from lightune.training import run_training

# no dropout (each process draws its own masks), batches in sampler order (length grouping depends on the batch
# size); 37 validation and test texts in batches of 4: 10 batches, shared 5 and 5 but 20 and 17 texts
SETTINGS = dict(epochs=1, dropout=0.0, group_by_length=False, eval_size=37, eval_batch_size=4)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="needs torchrun (torch's launcher)")
def test_two_processes_match_one_and_write_one_run(tiny_config):
    one = run_training(tiny_config(run_name="one", batch_size=16, **SETTINGS), progress=False)
    cfg = tiny_config(run_name="two", batch_size=8, **SETTINGS)
    # (`accelerate launch --cpu` starts one process unless MPI is set up; torchrun starts two, gloo on CPU)
    command = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "lightune", "train", "--quiet",
               "--device", "cpu", "--model", cfg.model, "--data", cfg.data, "--train-size", "all", "--eval-size", "37", "--eval-batch-size", "4", "--max-length", "32",
               "--epochs", "1", "--batch-size", "8", "--lr", str(cfg.learning_rate), "--dropout", "0",
               "--no-group-by-length", "--head-init", "random", "--output-dir", cfg.output_dir, "--run-name", "two"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    root = Path(cfg.output_dir)
    assert sorted(p.name for p in root.iterdir()) == ["one", "two"]  # the other process wrote nothing there
    two = root / "two"
    assert runs.is_complete_run(two) and done.stdout.count("run saved to") == 1
    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (one.run_dir, two))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=name)

    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["data"]["sizes"]["test"] == metrics["data"]["sizes"]["validation"] == 37
    for evaluation in (metrics["base"], metrics["test"], metrics["history"][-1]["validation"]):
        assert evaluation["examples"] == 37 and sum(map(sum, evaluation["confusion_matrix"])) == 37
    # every text once: the same confusion matrices and losses as one process over the same texts
    assert metrics["base"]["confusion_matrix"] == one.metrics["base"]["confusion_matrix"]
    assert metrics["test"]["confusion_matrix"] == one.metrics["test"]["confusion_matrix"]
    assert metrics["test"]["loss"] == pytest.approx(one.metrics["test"]["loss"], rel=1e-3)
    assert metrics["training"]["processes"] == 2 and one.metrics["training"]["processes"] == 1
    assert metrics["training"]["steps"] == one.metrics["training"]["steps"] == 20
    assert metrics["training"]["examples"] == one.metrics["training"]["examples"] == 320
