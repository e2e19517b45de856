"""Two CPU processes (gloo) through `accelerate launch`: lora, dylora and spiel train, only the main
process writes the run directory, and every process ends with the same weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import tiny_config
from tunelab.config import dump_config
from tunelab.rundir import RunDir

METHODS = {
    "lora": {"name": "lora", "r": 4, "alpha": 8},
    "dylora": {"name": "dylora", "r": 6, "alpha": 8},
    "spiel": {"name": "spiel", "num_tunable": 3000, "reselection_steps": 4, "accumulation_steps": 1},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes(tmp_path, tiny_model_dir, qa_jsonl, method):
    config = tiny_config(
        tiny_model_dir,
        qa_jsonl,
        tmp_path / "run",
        method=METHODS[method],
        **{"train.max_steps": 8, "train.batch_size": 4},
    )
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(config))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # with no GPU present this starts CPU processes (torchrun, gloo)
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "tunelab",
        "train",
        str(path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    records = RunDir(run_dir).metrics()
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 9))  # written once, by the main process
    assert (run_dir / "final" / "trained.safetensors").is_file()
    assert "replicas agree: 2 processes" in result.stderr
    shown = result.stdout + result.stderr  # told once, by the main process
    assert shown.count("done: run directory") == 1 and shown.count(f"training {method} on ") == 1, shown
