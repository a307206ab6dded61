"""The shipped accelerate configs as they will run.

Every file of configs/accelerate/ is read by accelerate's own config classes and
launcher. The FSDP one then trains the SFT stage on 2 CPU processes over gloo
(FSDP2, as accelerate drives it; only num_processes, mixed_precision and use_cpu
differ from the shipped file): it matches one process at the same global batch,
logs the true gradient norm, writes sharded resume states, survives SIGKILL plus
`--resume`, and gathers a final checkpoint that loads and generates.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mose
from conftest import prompt_batch
from launching import CONFIGS, cpu_config, finished, launch_train
from mose.data import read_jsonl
from mose.data.world import generate
from mose.models.loading import load_model
from mose.train import train
from mose.train.loop import narrow_fsdp_wrap
from mose.train.recipe import load_recipe

STEPS = 6 if os.environ.get("MOSE_TRIM") else 12  # SFT steps of the launched runs


def launch_args(config: Path):
    """(args, file config) as `accelerate launch --config_file config` resolves them."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(config), "train.py"])
    return _validate_launch_command(args)[:2]


def launch_env(config: Path) -> dict[str, str]:
    """The ACCELERATE_* / FSDP_* variables the launcher gives each process."""
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults = launch_args(config)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def test_every_accelerate_config_is_read_by_accelerate_with_known_keys(monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    files = sorted(CONFIGS.glob("*.yaml"))
    assert [p.name for p in files] == ["ddp.yaml", "deepspeed-zero2.yaml", "deepspeed-zero3.yaml",
                                       "fsdp.yaml"]
    options = vars(launch_command_parser().parse_args(["train.py"]))  # what the launcher knows
    for path in files:
        config = load_config_from_file(str(path))  # refuses unknown top-level keys
        assert isinstance(config, ClusterConfig), path
        # The launcher copies nested keys onto its arguments unchecked: an unknown one is ignored.
        nested = [*config.fsdp_config, *config.deepspeed_config]
        assert nested == [k for k in nested if k in options], (path, set(nested) - set(options))
        env = launch_env(path)
        for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        if config.distributed_type == DistributedType.FSDP:
            assert FullyShardedDataParallelPlugin().fsdp_version == 2, path
        elif config.distributed_type == DistributedType.DEEPSPEED:
            zero = DeepSpeedPlugin().deepspeed_config["zero_optimization"]
            assert zero["stage"] == config.deepspeed_config["zero_stage"], path
            assert DeepSpeedPlugin().deepspeed_config.get("gradient_clipping", "auto") == "auto", path
        else:
            assert config.distributed_type == DistributedType.MULTI_GPU, path


@pytest.mark.parametrize("kind, wrapped", [
    ("qwen2_vl", ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"]),
    ("qwen2_5_vl", ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"]),
    ("qwen2", ["Qwen2DecoderLayer"]),
])
def test_the_fsdp_config_wraps_every_decoder_layer_and_vision_block(kind, wrapped, tiny, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    for key, value in launch_env(CONFIGS / "fsdp.yaml").items():
        monkeypatch.setenv(key, value)
    model, _ = tiny(kind)
    plugin = FullyShardedDataParallelPlugin()
    assert narrow_fsdp_wrap(plugin, model) == wrapped
    plugin.set_auto_wrap_policy(model)  # accelerate's own check: every name is in the model
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    units = [m for m in model.modules() if policy(m)]
    assert len(units) == sum(type(m).__name__ in wrapped for m in model.modules()) > 0
    layers = model.config.get_text_config().num_hidden_layers
    vision = getattr(getattr(model.config, "vision_config", None), "depth", 0)
    assert len(units) == layers + vision


# ------------------------------------------------------------- 2 processes under FSDP2


def write_recipe(path: Path, world: str, out: Path, batch_size: int) -> Path:
    sft = {"batch_size": batch_size, "max_steps": STEPS, "lr": 1e-3, "log_every": 1, "save_every": 2,
           "max_grad_norm": 1.0, "warmup_ratio": 0.2, "skill_loss_weight": 0.1}
    recipe = {"model": "tiny:qwen2_vl", "output_dir": str(out), "seed": 0, "mixed_precision": "no",
              "data": {"train": world}, "stages": {"convert": {"mose": {"taxonomy": "driving"}}, "sft": sft}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in open(run / "logs" / "sft" / "metrics.jsonl") if '"loss"' in line]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return str(generate("driving", n=48, seed=1, out=tmp_path_factory.mktemp("world")))


@pytest.fixture(scope="module")
def runs(world, tmp_path_factory):
    """(one process at batch 4, two FSDP2 processes at batch 2, the accelerate config)."""
    folder = tmp_path_factory.mktemp("fsdp")
    config = cpu_config("fsdp", folder)
    two = launch_train(config, write_recipe(folder / "two.yaml", world, folder / "two", batch_size=2))
    train(load_recipe(write_recipe(folder / "one.yaml", world, folder / "one", batch_size=4)), progress=False)
    finished(two)
    return folder / "one", folder / "two", config


@pytest.mark.slow
def test_fsdp_on_two_processes_matches_one_at_the_same_global_batch(runs):
    one, two, _ = runs
    summary = json.loads((two / "train_results.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed"] == "FSDP"  # sharded, not plain DDP
    logs = metrics(one), metrics(two)
    assert len(logs[0]) == len(logs[1]) == STEPS
    for a, b in zip(*logs, strict=True):
        assert b["grad_norm"] > 0  # the norm of the sharded gradients, not of stale tensors
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    expected, got = load_file(one / "sft" / "model.safetensors"), load_file(two / "sft" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.allclose(expected[name], got[name], atol=1e-4), name


@pytest.mark.slow
def test_fsdp_sigkill_mid_stage_then_resume_ends_with_the_uninterrupted_weights(runs, world, tmp_path):
    _, two, config = runs
    recipe = write_recipe(tmp_path / "killed.yaml", world, tmp_path / "killed", batch_size=2)
    proc = launch_train(config, recipe)
    states = tmp_path / "killed" / ".resume" / "sft"
    deadline = time.monotonic() + 300
    while not list(states.glob("step-*")):
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, "no resume state appeared in time"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, as a lost machine would be
    proc.wait()
    (state,) = states.glob("step-*")
    assert sorted(p.name for p in state.iterdir()) == ["rank-00000", "rank-00001", "state.json"]
    assert not (tmp_path / "killed" / "sft").exists()
    finished(launch_train(config, recipe, "--resume"))

    expected, got = load_file(two / "sft" / "model.safetensors"), load_file(tmp_path / "killed" / "sft" /
                                                                            "model.safetensors")
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert [row["step"] for row in metrics(tmp_path / "killed")] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_the_gathered_fsdp_checkpoint_loads_and_generates(runs, world):
    _, two, _ = runs
    saved = load_file(two / "sft" / "model.safetensors")
    model = mose.from_pretrained(str(two / "sft"))
    state = model.state_dict()
    assert all(torch.equal(state[name], saved[name]) for name in saved)  # whole tensors, not shards
    loaded, processor = load_model(str(two / "sft"))
    samples = list(read_jsonl(world))[:3]
    inputs = prompt_batch(processor, samples)
    with torch.no_grad():
        settings = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False}
        out, again = loaded.generate(**inputs, **settings), model.generate(**inputs, **settings)
    assert out.shape == (3, inputs["input_ids"].shape[1] + 4) and torch.equal(out, again)
