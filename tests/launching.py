"""`accelerate launch` of mose on 2 CPU processes, as the tests adapt the shipped configs.

The shipped configs are for GPUs. On the CPU the tests change only what a machine without
one needs: 2 processes, no mixed precision, `use_cpu` (the DDP config then runs MULTI_CPU
over gloo, the FSDP one FSDP2 over gloo, see `mose.train.run.make_accelerator`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent
CONFIGS = Path(__file__).parents[1] / "configs" / "accelerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_config(name: str, folder: Path, processes: int = 2) -> Path:
    """configs/accelerate/NAME.yaml for CPU processes, everything else (fsdp_config included) as shipped."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    config.update(num_processes=processes, mixed_precision="no", use_cpu=True)
    path = folder / f"{name}-cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config: Path, *command: str) -> subprocess.Popen:
    """`accelerate launch --config_file config COMMAND` in a session of its own, so that killing
    it kills its workers. COMMAND: `-m mose.cli train ...`, or a script and its arguments."""
    args = [str(BIN / "accelerate"), "launch", "--config_file", str(config),
            "--main_process_port", str(free_port()), *command]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def launch_train(config: Path, recipe: Path, *extra: str) -> subprocess.Popen:
    """`accelerate launch ... mose train --config RECIPE`, as the README shows it."""
    return launch(config, "-m", "mose.cli", "train", "--config", str(recipe), "--no-progress", *extra)


def finished(proc: subprocess.Popen, timeout: float = 400) -> str:
    output = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, output[-6000:]
    return output
