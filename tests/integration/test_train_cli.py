"""`mose train` as a user runs it: killed and resumed, interrupted, and on 2 processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mose.data.world import generate

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return str(generate("driving", n=64, seed=1, out=tmp_path_factory.mktemp("world")))


def write_recipe(path: Path, world: str, out: Path, sft_steps: int = 6, batch_size: int = 4) -> Path:
    stage = {"batch_size": batch_size, "log_every": 1, "save_every": 2,
             "max_grad_norm": 1.0, "warmup_ratio": 0.2}
    recipe = {"model": "tiny:qwen2_vl", "output_dir": str(out), "seed": 0, "data": {"train": world},
              "stages": {"convert": {"mose": {"taxonomy": "driving"}},
                         # float32 pooling only: a bf16 forward's rounding depends on the batch's
                         # shape, which the 2-process run changes
                         "router": {**stage, "max_steps": 4, "lr": 1e-2, "eval_size": 8,
                                    "precisions": ["float32"]},
                         "sft": {**stage, "max_steps": sft_steps, "lr": 1e-3, "skill_loss_weight": 0.1}}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def mose_train(recipe: Path, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "mose"), "train", "--config", str(recipe), "--no-progress", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def weights(run: Path, stage: str = "sft") -> dict[str, torch.Tensor]:
    return load_file(run / stage / "model.safetensors")


def kill_after_checkpoint(proc: subprocess.Popen, resume_dir: Path, step: int, sig: int) -> None:
    """Send `sig` once the stage has written a resume state at or past `step`."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        steps = [int(p.name.split("-")[1]) for p in resume_dir.glob("step-*")] if resume_dir.is_dir() else []
        if steps and max(steps) >= step:
            proc.send_signal(sig)
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be interrupted:\n{proc.stdout.read()}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("no resume state appeared in time")


def test_sigkill_mid_stage_then_resume_ends_with_the_uninterrupted_weights(tmp_path, world):
    steps = 10 if os.environ.get("MOSE_TRIM") else 30
    reference = write_recipe(tmp_path / "ref.yaml", world, tmp_path / "ref", sft_steps=steps)
    assert mose_train(reference).wait() == 0

    killed = write_recipe(tmp_path / "killed.yaml", world, tmp_path / "killed", sft_steps=steps)
    proc = mose_train(killed)
    kill_after_checkpoint(proc, tmp_path / "killed" / ".resume" / "sft", 4, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (tmp_path / "killed" / "sft").exists()  # no half-written output that looks complete
    again = mose_train(killed)
    assert again.wait() == 2 and "pass --resume" in again.stdout.read()  # never restarts silently
    changed = mose_train(killed, "--resume", "stages.sft.batch_size=2")
    assert changed.wait() == 2 and "ran with other settings" in changed.stdout.read()
    resumed = mose_train(killed, "--resume")
    assert resumed.wait() == 0, resumed.stdout.read()

    expected, got = weights(tmp_path / "ref"), weights(tmp_path / "killed")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    log = [json.loads(line) for line in open(tmp_path / "killed" / "logs" / "sft" / "metrics.jsonl")]
    steps_logged = [row["step"] for row in log if "loss" in row]
    assert steps_logged == list(range(1, steps + 1))  # each step once, though some ran twice


def test_ctrl_c_keeps_the_last_checkpoint_and_says_how_to_resume(tmp_path, world):
    recipe = write_recipe(tmp_path / "r.yaml", world, tmp_path / "run", sft_steps=200)
    # A shell's background job (`make test &`) ignores SIGINT, and so would the run it starts:
    # Python leaves an inherited SIG_IGN in place. Ctrl-C reaches a foreground run.
    proc = mose_train(recipe, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    kill_after_checkpoint(proc, tmp_path / "run" / ".resume" / "sft", 2, signal.SIGINT)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    assert "--resume" in output
    states = list((tmp_path / "run" / ".resume" / "sft").glob("step-*"))
    assert len(states) == 1 and (states[0] / "state.json").is_file()
    assert (tmp_path / "run" / "router" / "model.safetensors").is_file()


def test_two_processes_match_one_at_the_same_global_batch(tmp_path, world):
    one = write_recipe(tmp_path / "one.yaml", world, tmp_path / "one", sft_steps=3, batch_size=4)
    assert mose_train(one).wait() == 0
    two = write_recipe(tmp_path / "two.yaml", world, tmp_path / "two", sft_steps=3, batch_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # `--cpu --num_processes 2` silently runs one process; --multi_gpu on a CPU machine gives two (gloo).
    launch = subprocess.run(
        [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mose.cli", "train",
         "--config", str(two), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=600)
    assert launch.returncode == 0, launch.stdout + launch.stderr
    summary = json.loads((tmp_path / "two" / "train_results.json").read_text())
    assert summary["world_size"] == 2
    for stage in ("router", "sft"):
        # Same samples per step and the same loss normalisation (the skill loss too, carried by
        # answer tokens): the same losses, gradient norms and weights, up to float noise (each
        # process pads its micro-batch to its own longest sample).
        logs = [[json.loads(line) for line in open(tmp_path / run / "logs" / stage / "metrics.jsonl")
                 if '"loss"' in line] for run in ("one", "two")]
        assert len(logs[0]) == len(logs[1]) >= 3
        for a, b in zip(*logs, strict=True):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), stage
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), stage
        expected, got = weights(tmp_path / "one", stage), weights(tmp_path / "two", stage)
        for name in expected:
            assert torch.allclose(expected[name], got[name], atol=1e-4), (stage, name)
