"""The benchmark scripts run (`--quick`) and print their tables.

Figures are not asserted: timing belongs to `make bench`, not to tests.
"""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.slow
@pytest.mark.parametrize("script", ["layers", "model", "scaling", "chain"])
def test_benchmark_runs_and_prints_its_table(script):
    result = subprocess.run([sys.executable, f"{script}.py", "--quick"], cwd=BENCH,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| " in result.stdout and "×" in result.stdout
