"""The loop under the sharded backends, as accelerate drives them, on one CPU process.

FSDP2 runs here for real (world size 1 over gloo, in this process): `fully_shard`
replaces every parameter by a DTensor, so the loop must clip, step and save the
prepared model's parameters. DeepSpeed cannot run beside accelerate on a CPU (see
`mose.train.run.make_accelerator`), so the config the loop completes for it is
checked as a unit, from the shipped configs exactly as `accelerate launch` reads them.
"""

from __future__ import annotations

import json
import re
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import load_file

from mose.data.world import generate
from mose.train import RecipeError, train
from mose.train.loop import complete_deepspeed_config
from mose.train.recipe import SFTStage, recipe_from_dict

CONFIGS = Path(__file__).parents[2] / "configs" / "accelerate"


def launch_env(config: Path, **overrides) -> dict[str, str]:
    """The ACCELERATE_* / FSDP_* variables `accelerate launch --config_file config` gives
    its processes (keys of the YAML replaced by `overrides`)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    data = {**yaml.safe_load(config.read_text()), **overrides}
    with tempfile.TemporaryDirectory() as folder:  # the parser reads a file
        path = Path(folder) / config.name
        path.write_text(yaml.safe_dump(data))
        args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
        args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def deepspeed_plugin(config: Path, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    env = launch_env(config)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()  # from the variables, as each launched process builds it
    plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])  # as AcceleratorState does
    return plugin


@pytest.mark.parametrize("name", ["deepspeed-zero2.yaml", "deepspeed-zero3.yaml"])
def test_the_deepspeed_config_is_completed_from_the_stage(name, monkeypatch):
    plugin = deepspeed_plugin(CONFIGS / name, monkeypatch)
    config = plugin.deepspeed_config
    # What accelerate's prepare cannot fill without a DataLoader, or fills with its own 1.0:
    assert config["train_micro_batch_size_per_gpu"] == "auto"
    assert config.get("gradient_clipping", "auto") == "auto"  # the YAML no longer decides it
    complete_deepspeed_config(config, SFTStage(batch_size=3, max_grad_norm=0.5), "bf16", world=8)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["train_batch_size"] == 24 and config["gradient_accumulation_steps"] == 1
    assert config["gradient_clipping"] == 0.5
    # bf16 as torch autocast over float32 weights, not DeepSpeed's own bf16 (which casts them)
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert not plugin.is_auto("train_micro_batch_size_per_gpu")  # prepare now has its batch size

    no_clip = deepspeed_plugin(CONFIGS / name, monkeypatch).deepspeed_config
    complete_deepspeed_config(no_clip, SFTStage(max_grad_norm=None), "bf16", world=2)
    assert no_clip["gradient_clipping"] == 0.0  # DeepSpeed's "no clipping"
    launched_bf16 = deepspeed_plugin(CONFIGS / name, monkeypatch).deepspeed_config
    assert launched_bf16["bf16"]["enabled"] is True  # as accelerate fills it from mixed_precision
    complete_deepspeed_config(launched_bf16, SFTStage(), "no", world=2)  # the accelerator's, always
    assert launched_bf16["torch_autocast"] == {"enabled": False} and not launched_bf16["bf16"]["enabled"]


def deepspeed_casts(model, config) -> None:
    """What DeepSpeed 0.19's engine does to a model's weights when it starts
    (`_configure_distributed_model` → `_cast_module_mixed_precision`): with its own bf16 or
    fp16 mode on, every floating weight is cast parameter by parameter, `p.data = p.data.to(dtype)`,
    so no module's `_apply` (Router's keeps float32) is ever asked."""
    dtype = (torch.bfloat16 if config["bf16"]["enabled"] else torch.float16 if config["fp16"]["enabled"]
             else None)
    for p in model.parameters():
        if dtype is not None and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


@pytest.mark.parametrize("name", ["deepspeed-zero2.yaml", "deepspeed-zero3.yaml"])
def test_routers_keep_their_float32_weights_through_deepspeeds_start(name, tiny, monkeypatch):
    import copy

    import mose
    from mose.layers import Router

    model = mose.convert(tiny("qwen2_vl")[0], mose.MoSEConfig(taxonomy="driving"))
    routers = [m for m in model.modules() if isinstance(m, Router)]
    saved = [{k: v.clone() for k, v in r.state_dict().items()} for r in routers]
    as_launched = deepspeed_plugin(CONFIGS / name, monkeypatch).deepspeed_config
    rounded = copy.deepcopy(model)
    deepspeed_casts(rounded, as_launched)  # what DeepSpeed's own bf16 mode would have done
    dtypes = {p.dtype for m in rounded.modules() if isinstance(m, Router) for p in m.parameters()}
    assert dtypes == {torch.bfloat16}

    deepspeed_casts(model, complete_deepspeed_config(as_launched, SFTStage(), "bf16", world=8))
    for router, state in zip(routers, saved, strict=True):
        for key, value in router.state_dict().items():
            assert value.dtype == torch.float32 and torch.equal(value, state[key]), key


def test_a_deepspeed_value_that_disagrees_with_the_recipe_is_an_error(monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "1.0")  # as the old YAML had it
    plugin = deepspeed_plugin(CONFIGS / "deepspeed-zero2.yaml", monkeypatch)
    assert plugin.deepspeed_config["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match=r"gradient_clipping: 1.0 but stages.sft.max_grad_norm asks for 0.3"):
        complete_deepspeed_config(plugin.deepspeed_config, SFTStage(max_grad_norm=0.3), "bf16", 8, "sft")
    agreeing = deepspeed_plugin(CONFIGS / "deepspeed-zero2.yaml", monkeypatch).deepspeed_config
    complete_deepspeed_config(agreeing, SFTStage(max_grad_norm=1.0), "bf16", 8, "sft")  # no error


def test_deepspeed_without_a_gpu_is_refused_not_run_as_something_else(monkeypatch):
    from mose.train.run import make_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(RecipeError, match="DeepSpeed, which accelerate does not run on a machine without"):
        make_accelerator("no")


# ---------------------------------------------------------------- recipes and FSDP2 runs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return str(generate("driving", n=24, seed=2, out=tmp_path_factory.mktemp("world")))


def sft_recipe(tmp_path: Path, world: str, name: str, **top):
    stage = {"batch_size": 4, "max_steps": 4, "lr": 1e-3, "log_every": 1, "save_every": 2,
             "warmup_ratio": 0.0, "max_grad_norm": 0.05, "skill_loss_weight": 0.1}
    data = {"model": "tiny:qwen2_vl", "output_dir": str(tmp_path / name), "seed": 0, "mixed_precision": "no",
            "data": {"train": world},
            "stages": {"convert": {"mose": {"taxonomy": "driving"}}, "sft": stage}, **top}
    return recipe_from_dict(data, source=f"{name}.yaml")


def logged(run: Path) -> list[dict]:
    return [json.loads(line) for line in open(run / "logs" / "sft" / "metrics.jsonl")]


def _reset_accelerate() -> None:
    """accelerate keeps one state per process: start each run here from none."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fsdp_process(monkeypatch):
    """This process as rank 0 of 1 under the shipped FSDP config (FSDP2), on the CPU."""
    _reset_accelerate()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = launch_env(CONFIGS / "fsdp.yaml", num_processes=1, mixed_precision="no", use_cpu=True)
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield
    _reset_accelerate()


@pytest.fixture(scope="module")
def plain_run(world, tmp_path_factory):
    """The same stage without sharding: what FSDP2 must reproduce."""
    _reset_accelerate()
    out = tmp_path_factory.mktemp("plain")
    train(sft_recipe(out, world, "run"), progress=False)
    _reset_accelerate()
    return out / "run"


def test_fsdp2_clips_and_logs_the_true_gradient_norm(plain_run, world, tmp_path, fsdp_process):
    results = train(sft_recipe(tmp_path, world, "run"), progress=False)
    sharded = tmp_path / "run"
    summary = json.loads((sharded / "train_results.json").read_text())
    assert summary["world_size"] == 1 and summary["distributed"] == "FSDP"
    assert results["sft"]["grad_norm"] > 0.05  # the clip threshold, so clipping changes the step
    for a, b in zip(logged(plain_run), logged(sharded), strict=True):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)  # not 0: the real norm
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    # Clipped as the plain run clips: the same weights (an unclipped step at lr 1e-3 is 20x larger).
    expected = load_file(plain_run / "sft" / "model.safetensors")
    got = load_file(sharded / "sft" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=2e-5, msg=name)


def test_fsdp2_writes_sharded_resume_states_and_resumes_from_them(plain_run, world, tmp_path, fsdp_process,
                                                                  monkeypatch):
    from mose.train import loop

    recipe = sft_recipe(tmp_path, world, "run")
    original = loop.StageLogger.log

    def stop_at_three(self, step, values, samples):
        if step == 3:  # after the state of step 2 was written
            raise KeyboardInterrupt
        original(self, step, values, samples)

    monkeypatch.setattr(loop.StageLogger, "log", stop_at_three)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, progress=False)
    (state,) = (tmp_path / "run" / ".resume" / "sft").glob("step-*")
    assert state.name == "step-00000002"
    assert json.loads((state / "state.json").read_text())["fingerprint"]["sharding"] == "FSDP"
    assert sorted(p.name for p in (state / "rank-00000").iterdir()) == [
        "optimizer.safetensors", "rng.safetensors", "trainable.safetensors"]

    monkeypatch.setattr(loop.StageLogger, "log", original)
    _reset_accelerate()  # a new run, as a new `mose train --resume` would be
    train(recipe, resume=True, progress=False)
    steps = [row["step"] for row in logged(tmp_path / "run")]
    assert steps == [1, 2, 3, 4]
    expected = load_file(plain_run / "sft" / "model.safetensors")
    got = load_file(tmp_path / "run" / "sft" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=2e-5, msg=name)


def test_training_stages_refuse_half_precision_weights(world, tmp_path, monkeypatch):
    import mose.train.run as run

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the recipe was refused")

    monkeypatch.setattr(run, "load_model", no_load)
    for dtype, half in (("bfloat16", "bf16"), ("float16", "fp16")):
        with pytest.raises(RecipeError, match=rf"{dtype}.yaml: 'dtype' is {dtype}, but stage 'sft' trains.*"
                                              rf"'dtype: float32'.*'mixed_precision: {half}'"):
            train(sft_recipe(tmp_path, world, dtype, dtype=dtype), progress=False)
    convert_only = sft_recipe(tmp_path, world, "convert", dtype="bfloat16")
    convert_only.stages.pop("sft")
    run.check_recipe(convert_only)  # converting in bf16 trains nothing: allowed


def test_bf16_mixed_precision_holds_frozen_weights_in_bf16_and_gives_them_back_exactly(
        world, tmp_path, monkeypatch):
    """A LoRA-MoSE SFT stage under bf16 mixed precision: while it steps, the frozen base is bf16
    and the LoRA deltas (fp32 masters) and routers fp32; the saved base is the float32 one it started from."""
    from mose.train import loop

    _reset_accelerate()
    seen = {}
    original = loop._step

    def spy(runner, *args, **kwargs):
        if not seen:
            for name, p in loop.Accelerator().unwrap_model(runner).named_parameters():
                kind = "router" if ".router." in name else "trained" if p.requires_grad else "frozen"
                seen.setdefault(kind, set()).add(p.dtype)
        return original(runner, *args, **kwargs)

    monkeypatch.setattr(loop, "_step", spy)
    recipe = sft_recipe(tmp_path, world, "lora", mixed_precision="bf16")
    recipe.stages["convert"].mose = {"taxonomy": "driving", "experts": "lora", "lora_rank": 4}
    recipe.stages["sft"].max_steps = 2
    train(recipe, progress=False)
    _reset_accelerate()
    assert seen == {"frozen": {torch.bfloat16}, "trained": {torch.float32}, "router": {torch.float32}}
    before, after = (load_file(tmp_path / "lora" / s / "model.safetensors") for s in ("convert", "sft"))
    trained = (".experts.", ".shared_expert.", ".router.")
    frozen = [n for n in before if not any(part in n for part in trained)]
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], before[n]) for n in frozen)
    assert any(not torch.equal(after[n], before[n]) for n in after if ".experts.B_" in n)  # they trained


def test_records_with_and_without_images_are_refused_under_sharding_only(world):
    """A process whose micro-batch has no image skips the vision tower, whose sharded weights the
    other processes then gather alone (a hang, or gloo's collective mismatch)."""
    from dataclasses import replace
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from mose.data import read_jsonl
    from mose.train.run import StageData, _check_images_under_sharding

    samples = list(read_jsonl(world))[:4]
    text_only = [replace(s, images=[]) for s in samples]
    data = {"images": samples, "text": text_only, "mixed": samples[:3] + text_only[3:]}
    refusal = r"r.yaml: stage 'sft': mixed.jsonl mixes records with images and 1 without \(the first: "
    for kind, processes in ((DistributedType.FSDP, 2), (DistributedType.DEEPSPEED, 8),
                            (DistributedType.MULTI_GPU, 2), (DistributedType.FSDP, 1)):
        accelerator = SimpleNamespace(distributed_type=kind, num_processes=processes)
        for name, records in data.items():
            stage_data = StageData(records, [], f"{name}.jsonl")
            if name == "mixed" and kind != DistributedType.MULTI_GPU and processes > 1:
                with pytest.raises(RecipeError, match=refusal + re.escape(samples[3].id)):
                    _check_images_under_sharding(stage_data, accelerator, "r.yaml: stage 'sft'")
            else:
                _check_images_under_sharding(stage_data, accelerator, "r.yaml: stage 'sft'")
