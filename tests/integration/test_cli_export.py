"""`mose export` and `mose route` on a saved tiny MoSE model, through the command line."""

import json

import pytest
from typer.testing import CliRunner

import mose
from mose.cli import app
from mose.data.world import generate
from mose.models.processor import save_processor

runner = CliRunner()
SMALL = {"name": "small", "levels": [{"name": "perception", "skills": ["general", "vehicle"]},
                                     {"name": "planning", "skills": ["general", "stop", "keep"]}]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-export")
    model, processor = mose.tiny_model("qwen2_vl", seed=0)
    model = mose.convert(model, mose.MoSEConfig(experts="lora", lora_rank=4, taxonomy=SMALL))
    model.save_pretrained(root / "model")
    save_processor(processor, root / "model")
    full, _ = mose.tiny_model("qwen2_vl", seed=0)
    mose.convert(full, mose.MoSEConfig(taxonomy=SMALL)).save_pretrained(root / "full")
    save_processor(processor, root / "full")
    return root


def test_export_route_and_merge(saved):
    out = saved / "export"
    result = runner.invoke(app, ["export", "--model", str(saved / "model"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["chains"]) == 6 and (out / "base" / "config.json").is_file()

    only = saved / "two"
    result = runner.invoke(app, ["export", "--model", str(saved / "model"), "--out", str(only),
                                 "--chain", "planning=stop", "--chain", "perception=vehicle,planning=keep",
                                 "--no-base"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (only / "adapters").iterdir()) == ["general-stop", "vehicle-keep"]

    data = generate("driving", n=4, seed=0, out=saved / "world")
    routes = saved / "routes.jsonl"
    result = runner.invoke(app, ["route", "--model", str(saved / "model"), "--data", str(data),
                                 "--out", str(routes), "--manifest", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in routes.read_text().splitlines()]
    assert len(rows) == 4 and all((out / "adapters" / r["adapter"]).is_dir() for r in rows)

    merged = saved / "merged"
    result = runner.invoke(app, ["export", "--model", str(saved / "model"), "--out", str(merged),
                                 "--merge", "perception=vehicle,planning=stop", "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    config = json.loads((merged / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl"
    assert "bfloat16" in (config.get("dtype"), config.get("torch_dtype"))


def test_refusals_are_clear_errors(saved):
    result = runner.invoke(app, ["export", "--model", str(saved / "full"), "--out", str(saved / "x")])
    assert result.exit_code == 2 and "sum of two gated MLPs" in result.output
    result = runner.invoke(app, ["export", "--model", str(saved / "model"), "--out", str(saved / "y"),
                                 "--chain", "planning=fly"])
    assert result.exit_code == 2 and "unknown skill 'fly'" in result.output
    result = runner.invoke(app, ["export", "--model", str(saved / "model"), "--out", str(saved / "y"),
                                 "--dtype", "fp8"])
    said = " ".join(result.output.replace("│", " ").split())  # typer checks the choices, in a box
    assert result.exit_code == 2 and "'fp8' is not one of 'float32', 'bfloat16', 'float16'" in said
    assert not (saved / "x").exists() and not (saved / "y").exists()
