"""`mose demo --quick`: the newcomer's main job end to end, in a subprocess (under 2 minutes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
MOSE = str(Path(sys.executable).parent / "mose")
METHODS = ("mose", "moe_4x1", "dense_sft")
KEYS = ("overall", "perception", "prediction", "planning", "trainable_params", "active_params",
        "tokens_per_s")


def test_quick_demo_writes_results_and_report(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([MOSE, "demo", "--quick", "--out", str(out)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert tuple(results["methods"]) == METHODS
    for method, row in results["methods"].items():
        assert all(key in row for key in KEYS), (method, row)
        for key in ("overall", "perception", "prediction", "planning"):
            assert 0 <= row[key] <= 100
        assert 0 < row["trainable_params"] and 0 < row["active_params"] and row["tokens_per_s"] > 0
    rows = results["methods"]
    # MoSE and the token MoE each send a token through a shared and one routed expert per MoE layer
    # (their routers differ in size); dense SFT has one FFN there.
    mose, moe, dense = (rows[m]["active_params"] for m in METHODS)
    assert abs(mose - moe) < 0.01 * moe and moe > dense
    assert rows["dense_sft"]["trainable_params"] < rows["moe_4x1"]["trainable_params"]
    # The study's tables and runs are in the same file.
    assert "MoSE" in results["tables"]["main comparison"] and len(results["runs"]) == 3
    page = (out / "report.html").read_text()
    assert "MoSE" in page and "dense SFT" in page and "<table" in page and "trainable" in page
    assert "test split" in result.stdout and "skill chain" in result.stdout

    # A rerun reuses every finished stage and prediction.
    again = subprocess.run([MOSE, "demo", "--quick", "--out", str(out)], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]
    # The default run never reuses the quick run's data and models (the study's own check refuses).
    default = subprocess.run([MOSE, "demo", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert default.returncode == 2 and "made with other data" in default.stdout
