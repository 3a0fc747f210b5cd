"""target/train.py end to end on CPU: train within its wall-clock budget, export, and score the
exported model with the trusted scorer; it must beat the uniform baseline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


BUDGET = 25                    # wall seconds: imports, a fallback export, training, the export


def test_train_export_and_score(small_data: Path, tmp_path: Path):
    out = tmp_path / "out"
    start = time.time()
    stdout = run([TRAIN_PY], env={"AUTORESEARCH_TIME_BUDGET": str(BUDGET),
                                  "AUTORESEARCH_DEADLINE": str(start + BUDGET),
                                  "AUTORESEARCH_OUT": str(out),
                                  "AUTORESEARCH_DATA_DIR": str(small_data)})
    wall = time.time() - start
    assert "\n---\n" in stdout, stdout
    summary = dict(line.split(": ", 1) for line in stdout.split("\n---\n")[-1].splitlines()
                   if ": " in line)
    # It plans on the deadline: its model saved before it, a good part of the budget trained.
    assert float(summary["total_seconds"]) < BUDGET and float(summary["left_seconds"]) > 0, stdout
    assert float(summary["training_seconds"]) >= BUDGET / 5, stdout
    print(f"wall {wall:.1f}s (interpreter exit included)")
    assert int(summary["num_steps"]) > 1
    assert sorted(p.name for p in out.iterdir()) == ["model.pt2"]    # no temporary file left
    assert float(summary["holdout_loss"]) > 0
    model = out / "model.pt2"
    assert model.exists()

    score = json.loads(run([PREPARE_PY, "score", "--model", model, "--data-dir", small_data,
                            "--device", "cpu"]))
    assert score["status"] == "ok", score
    assert score["val_bpb"] < score["uniform_bpb"], score      # learnt something
