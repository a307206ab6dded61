"""Where inference runs: --device / --dtype resolution, loading in a dtype, batches on the model's device."""

from __future__ import annotations

import json
from contextlib import nullcontext

import pytest
import torch
from typer.testing import CliRunner

import mose
from mose.cli import app
from mose.data import read_jsonl
from mose.data.world import generate
from mose.eval.analysis import route_with_inputs
from mose.eval.predict import Answerer
from mose.models import loading
from mose.models.device import Placement, model_device, model_dtype, resolve_placement
from mose.models.loading import load_for_inference
from mose.models.processor import load_processor, save_processor
from mose.study import StudyError, study_from_dict
from mose.study.measure import expert_tokens, placement_settings

runner = CliRunner()
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
STUDY = {"name": "t", "output_dir": "runs/t", "world": {"domain": "driving"},
         "pretrain": {"max_steps": 2}, "experiments": {"main": {"methods": ["dense_sft"]}}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate("robot", 4, seed=0, out=tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A converted tiny Qwen2-VL, saved as a checkpoint (float32)."""
    model, processor = mose.tiny_model("qwen2_vl", seed=0)
    model = mose.convert(model, mose.MoSEConfig(taxonomy="robot"))
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    save_processor(processor, path)
    return path


def fake_cuda(monkeypatch, bf16: bool = True, count: int = 1) -> None:
    """This CPU machine, as torch would describe one with `count` CUDA GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def no_cuda(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# resolution


def test_auto_is_cuda_in_bfloat16_on_a_gpu_machine(monkeypatch):
    fake_cuda(monkeypatch)
    assert resolve_placement() == Placement(CUDA, torch.bfloat16)
    assert resolve_placement("auto", "auto") == Placement(CUDA, torch.bfloat16)
    assert resolve_placement("cuda:0", "float16") == Placement(torch.device("cuda:0"), torch.float16)
    assert resolve_placement("cpu") == Placement(CPU, torch.float32)  # auto dtype follows the device


def test_auto_is_float32_on_a_gpu_without_bfloat16(monkeypatch):
    fake_cuda(monkeypatch, bf16=False)
    assert resolve_placement() == Placement(CUDA, torch.float32)


def test_auto_is_the_cpu_in_float32_without_cuda(monkeypatch):
    no_cuda(monkeypatch)
    assert resolve_placement() == Placement(CPU, torch.float32)
    assert resolve_placement(None, None) == Placement(CPU, torch.float32)
    assert resolve_placement("cpu", "bfloat16") == Placement(CPU, torch.bfloat16)
    assert str(resolve_placement("cpu", "bfloat16")) == "cpu bfloat16"


def test_bad_device_or_dtype_is_a_clear_error(monkeypatch):
    no_cuda(monkeypatch)
    with pytest.raises(ValueError, match=r"--device 'cuda': CUDA is not available.*--device cpu"):
        resolve_placement("cuda", device_name="--device")
    with pytest.raises(ValueError, match=r"--dtype 'fp8'.*auto, float32, bfloat16, float16"):
        resolve_placement("cpu", "fp8", dtype_name="--dtype")
    with pytest.raises(ValueError, match=r"device 'tpu' is not a device.*auto, cpu, cuda, cuda:N"):
        resolve_placement("tpu")
    fake_cuda(monkeypatch, count=1)
    with pytest.raises(ValueError, match=r"'cuda:1': there are 1 CUDA device"):
        resolve_placement("cuda:1")


# the commands


class Stop(Exception):
    """Raised where the model would be moved: the test has seen what it needs."""


@pytest.fixture
def loader_spy(monkeypatch):
    """What `load_model` is asked for and where its model is sent, in place of loading anything."""
    seen = {}

    class Unmovable:
        def to(self, device):
            seen["device"] = device
            raise Stop

    def load_model(spec, seed=0, dtype=None):
        seen["dtype"] = dtype
        return Unmovable(), None

    monkeypatch.setattr(loading, "load_model", load_model)
    return seen


@pytest.mark.parametrize("command", ["predict", "chat", "analyze"])
def test_commands_pick_cuda_and_bfloat16_on_a_gpu_machine(command, loader_spy, monkeypatch, model_dir,
                                                          world, tmp_path):
    fake_cuda(monkeypatch)
    args = {"predict": ["predict", "--model", str(model_dir), "--data", str(world),
                        "--out", str(tmp_path / "pred.jsonl")],
            "chat": ["chat", "--model", str(model_dir), "hello?"],
            "analyze": ["analyze", "--model", str(model_dir), "--out", str(tmp_path / "report")]}[command]
    result = runner.invoke(app, args)
    assert isinstance(result.exception, Stop), result.output
    assert loader_spy == {"dtype": torch.bfloat16, "device": CUDA}


@pytest.mark.parametrize("command", ["predict", "chat", "analyze"])
def test_device_cuda_without_cuda_names_the_flag(command, monkeypatch, model_dir, world, tmp_path):
    no_cuda(monkeypatch)
    out = tmp_path / "pred.jsonl"
    args = {"predict": ["predict", "--model", str(model_dir), "--data", str(world), "--out", str(out)],
            "chat": ["chat", "--model", str(model_dir), "hello?"],
            "analyze": ["analyze", "--model", str(model_dir), "--out", str(tmp_path / "report")]}[command]
    result = runner.invoke(app, [*args, "--device", "cuda"])
    assert result.exit_code == 2, result.output
    assert "--device 'cuda'" in result.output and "CUDA is not available" in result.output
    result = runner.invoke(app, [*args, "--device", "cpu", "--dtype", "half"])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.replace("│", " ").split())  # typer checks the choices, in a box
    assert "'--dtype'" in said and "'half' is not one of 'auto', 'float32', 'bfloat16', 'float16'" in said
    assert not out.exists() and not (tmp_path / "report").exists()


def test_predict_in_bfloat16_on_the_cpu(monkeypatch, model_dir, world, tmp_path):
    loaded, logits = [], []
    original = loading.load_model

    def load_model(spec, seed=0, dtype=None):
        model, processor = original(spec, seed=seed, dtype=dtype)
        model.get_output_embeddings().register_forward_hook(lambda m, i, out: logits.append(out.dtype))
        loaded.append(model)
        return model, processor

    monkeypatch.setattr(loading, "load_model", load_model)
    out = tmp_path / "pred.jsonl"
    result = runner.invoke(app, ["predict", "--model", str(model_dir), "--data", str(world),
                                 "--out", str(out), "--max-new-tokens", "3", "--batch-size", "2",
                                 "--device", "cpu", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert "on cpu bfloat16" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [s.id for s in read_jsonl(world)]
    assert all(set(r["skill_chain"]) == {"perception", "interpretation", "planning"} for r in rows)
    (model,) = loaded
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model_dtype(model) == torch.bfloat16
    assert model_device(model) == CPU
    assert logits and set(logits) == {torch.bfloat16}  # the answers were computed in bfloat16


def test_load_for_inference_loads_in_the_dtype_on_the_device(model_dir):
    model, _ = load_for_inference(str(model_dir), Placement(CPU, torch.bfloat16))
    assert model_dtype(model) == torch.bfloat16 and model_device(model) == CPU and not model.training
    model, _ = load_for_inference("tiny:qwen2_vl", Placement(CPU, torch.float32))
    assert model_dtype(model) == torch.float32


# batches on the model's device


class MetaModel(torch.nn.Module):
    """A stand-in MoSE model whose weights are on the meta device and that has no `device`
    attribute: it records the device of every tensor it is given, then stops."""

    def __init__(self, mose_config):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.empty(1, device="meta"))
        self.mose_config = mose_config
        self.seen: dict[str, torch.device] = {}

    def routing_only(self):
        return nullcontext()

    def forward(self, **inputs):
        self.seen = {k: v.device for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        raise Stop


@pytest.fixture(scope="module")
def meta_model(model_dir):
    return MetaModel(mose.from_pretrained(model_dir).mose_config)


def test_every_batch_goes_to_the_models_device(meta_model, model_dir, world):
    processor = load_processor(str(model_dir))
    samples = list(read_jsonl(world))
    inputs = Answerer(meta_model, processor, force_skills=True).inputs(samples[:2])
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "skill_labels"} <= set(inputs)
    assert {k: v.device.type for k, v in inputs.items()} == {k: "meta" for k in inputs}

    for run in (lambda: route_with_inputs(meta_model, processor, samples, batch_size=2, progress=False),
                lambda: expert_tokens(meta_model, processor, samples, batch_size=2, force_skills=True)):
        meta_model.seen = {}
        with pytest.raises(Stop):
            run()
        assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"} <= set(meta_model.seen)
        assert {d.type for d in meta_model.seen.values()} == {"meta"}
    assert "skill_labels" in meta_model.seen  # expert_tokens with forced routes


# studies


def test_study_evaluates_on_the_gpu_by_default_and_checks_its_device_before_any_work(monkeypatch):
    fake_cuda(monkeypatch)
    study = study_from_dict(STUDY, source="t.yaml")
    assert (study.device, study.dtype) == ("auto", "auto")
    assert study.placement() == Placement(CUDA, torch.bfloat16)
    assert study_from_dict({**STUDY, "dtype": "float32"}).placement() == Placement(CUDA, torch.float32)
    no_cuda(monkeypatch)
    assert study_from_dict(STUDY).placement() == Placement(CPU, torch.float32)
    with pytest.raises(StudyError, match=r"t.yaml: device 'cuda': CUDA is not available"):
        study_from_dict({**STUDY, "device": "cuda"}, source="t.yaml")
    with pytest.raises(StudyError, match=r"t.yaml: dtype 'fp8'.*auto, float32, bfloat16, float16"):
        study_from_dict({**STUDY, "dtype": "fp8"}, source="t.yaml")


def test_timing_settings_name_a_placement_other_than_the_cpu_in_float32(model_dir):
    model, _ = load_for_inference(str(model_dir), Placement(CPU, torch.float32))
    assert placement_settings(model) == {}  # as every earlier study's predictions were made: reused
    assert placement_settings(model.to(torch.bfloat16)) == {"device": "cpu", "dtype": "bfloat16"}
