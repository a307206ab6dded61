"""The examples run as shipped: a taxonomy of one's own, end to end on the tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_custom_taxonomy_example_runs_from_data_to_scores(tmp_path):
    size = {"N": "30", "EPOCHS": "1"} if os.environ.get("MOSE_TRIM") else {"N": "120", "EPOCHS": "2"}
    env = os.environ | size | {"OUT": str(tmp_path), "MOSE": str(BIN / "mose"), "PY": sys.executable}
    run = subprocess.run(["bash", str(ROOT / "examples" / "custom-taxonomy" / "run.sh")], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    test = tmp_path / "data" / "test.labelled.jsonl"
    labelled = [json.loads(line) for line in test.read_text().splitlines()]
    assert {r["skills"]["perception"] for r in labelled} == {"box", "person"}  # the rules decided each
    predictions = [json.loads(line) for line in
                   (tmp_path / "runs" / "warehouse" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(labelled)
    assert {tuple(p["skill_chain"]) for p in predictions} == {("perception", "planning")}  # its own levels
    scores = json.loads((tmp_path / "runs" / "warehouse" / "scores.json").read_text())
    assert scores["n"] == len(labelled) and "routing" in scores
