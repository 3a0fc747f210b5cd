"""target/train.py end to end on CPU: train a few seconds, export, and score the exported model
with the trusted scorer; it must beat the uniform baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import PREPARE_PY, REPO

TRAIN_PY = REPO / "target" / "train.py"


def run(args: list, env: dict | None = None, timeout: int = 300) -> str:
    full_env = {**os.environ, "PYTHONPATH": str(REPO / "prepare"), "CUDA_VISIBLE_DEVICES": "",
                **(env or {})}
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_train_export_and_score(small_data: Path, tmp_path: Path):
    out = tmp_path / "out"
    stdout = run([TRAIN_PY], env={"AUTORESEARCH_TIME_BUDGET": "3", "AUTORESEARCH_OUT": str(out),
                                  "AUTORESEARCH_DATA_DIR": str(small_data)})
    assert "\n---\n" in stdout, stdout
    summary = dict(line.split(": ", 1) for line in stdout.split("\n---\n")[-1].splitlines()
                   if ": " in line)
    assert float(summary["training_seconds"]) >= 3
    assert int(summary["num_steps"]) > 0
    assert float(summary["holdout_loss"]) > 0
    model = out / "model.pt2"
    assert model.exists()

    score = json.loads(run([PREPARE_PY, "score", "--model", model, "--data-dir", small_data,
                            "--device", "cpu"]))
    assert score["status"] == "ok", score
    assert score["val_bpb"] < score["uniform_bpb"], score      # learnt something in 3 s
