"""Qwen2-VL-2B's real widths (random weights, bf16) through every step mose takes.

`bench/real_shape.py` runs the checks (convert keeps the logits, route-once
generation, save/load, a router-stage step, an SFT step, the activation estimate
against the bytes autograd saves) and exits non-zero if one fails; these tests run
it and read its JSON. Under MOSE_TRIM=1 (`make test`) it runs `--trim`: real widths
with 2 decoder layers and 1 vision block (about 60 s and 3 GiB); otherwise 6 decoder
layers and the full vision tower (about 10 GiB).

On a CPU without native bfloat16 (AVX2 only), where a bf16 matmul at these widths is
30-60x slower than float32, the real-width checks run in float32 and the bf16 ones at
tiny widths (`--quick`); the test says so in a warning.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from mose.models.device import native_bfloat16

NATIVE_BF16 = native_bfloat16("cpu")
ROOT = Path(__file__).resolve().parents[2]
TRIM = os.environ.get("MOSE_TRIM") == "1"
CHECKS = ["build", "convert", "generate", "save_load", "router_step", "activations", "sft_step"]


def run_bench(tmp_path: Path, *args: str) -> list[dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, "real_shape.py", *args, "--json", str(out)], cwd=ROOT / "bench",
                            capture_output=True, text=True, timeout=1800,
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def assert_checks_hold(results: dict[str, dict]) -> None:
    assert list(results) == CHECKS
    convert = results["convert"]
    assert convert["max_abs_diff"] <= convert["tolerance"] and convert["max_abs_logit"] > 0
    assert results["generate"]["new_tokens"] == 4 and results["generate"]["chains"] == 2
    assert results["router_step"]["routers_moved"] >= 2
    assert 0.85 <= results["activations"]["estimate_over_measured"] <= 1.15


@pytest.mark.slow
def test_the_2b_shape_converts_generates_saves_and_trains(tmp_path):
    dtype = ["--dtype", "float32"] if not NATIVE_BF16 else []
    if dtype:
        warnings.warn("this CPU has no native bfloat16 (AVX2 only): the 2B-width checks run in float32, "
                      "the bf16 ones at tiny widths", stacklevel=1)
    results = {r["check"]: r for r in run_bench(tmp_path, *(["--trim"] if TRIM else []), *dtype)}
    assert_checks_hold(results)
    assert results["sft_step"]["trainable_params"] > 1e8  # real-width experts
    if TRIM:  # float32 weights take twice the bytes
        assert max(r["peak_mib"] for r in results.values()) < (7 if dtype else 3.5) * 1024
    if dtype:
        assert_checks_hold({r["check"]: r for r in run_bench(tmp_path / "bf16", "--quick")})


@pytest.mark.slow
def test_gpu_script_runs_end_to_end_on_the_cpu():
    """Every part of bench/gpu.sh on the CPU at tiny widths. Of the benchmark tables only
    layers.py runs here (test_bench.py runs all seven --quick): the seven take about 2 minutes on this CPU."""
    env = {**os.environ, "BENCHES": "layers", "OMP_NUM_THREADS": "1", "PY": sys.executable}
    result = subprocess.run(["bash", "bench/gpu.sh", "--device", "cpu", "--quick"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    for heading in ("## layers", "## real_shape", "## training stages", "## recipe_run",
                    "| chains bf16 vs fp32 |", "estimate"):
        assert heading in result.stdout, heading
