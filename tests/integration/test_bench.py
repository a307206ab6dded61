"""The benchmark scripts run and print their tables.

Figures are not asserted: timing belongs to `make bench`, not to tests. Under
MOSE_TRIM=1 (as `make test` runs) they run `--quick`; otherwise in full.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["layers", "model", "scaling", "chain", "serve", "train", "lora"])
def test_benchmark_runs_and_prints_its_table(script):
    trimmed = ["--quick"] if os.environ.get("MOSE_TRIM") == "1" else []
    result = subprocess.run([sys.executable, f"{script}.py", *trimmed], cwd=BENCH,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| " in result.stdout and "×" in result.stdout
