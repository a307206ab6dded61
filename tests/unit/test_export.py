"""`mose export`: per-chain PEFT adapters and merged checkpoints equal the MoSE model's forced chain."""

import copy
import json

import pytest
import torch
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

import mose
from conftest import mose_blocks, prompt_batch, randomise_deltas, sharpen_routers, vl_batch
from mose.data import read_jsonl
from mose.data.world import generate
from mose.export import (
    ExportError,
    chain_name,
    export_adapters,
    export_merged,
    parse_chain,
    read_manifest,
    route_records,
)

DRIVING = mose.load_taxonomy("driving")
CHAINS = [("vehicle", "crossing", "yield"), ("general", "stationary", "stop")]
SMALL = {"name": "small", "levels": [{"name": "scene", "skills": ["general", "road"]},
                                     {"name": "act", "skills": ["general", "go", "halt"]}]}


def perturb_full_experts(model, seed: int = 0, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in mose_blocks(model):
            for weight in (block.experts.gate_up_proj, block.experts.down_proj):
                weight += torch.randn(weight.shape, generator=generator) * weight.std() * scale


def lora_model(tiny, **cfg):
    """(dense copy, converted model with random deltas, processor)."""
    model, processor = tiny("qwen2_vl")
    dense = copy.deepcopy(model).eval()
    model = mose.convert(model, mose.MoSEConfig(experts="lora", lora_rank=4, **cfg)).eval()
    randomise_deltas(model)
    return dense, model, processor


def forced_logits(model, inputs, chain, taxonomy=DRIVING):
    labels = [dict(zip(taxonomy.level_names, chain, strict=True))] * inputs["input_ids"].shape[0]
    with torch.no_grad():
        return model(**inputs, skill_labels=labels).logits


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    dense, model, processor = lora_model(tiny)
    out = tmp_path_factory.mktemp("export") / "adapters-out"
    manifest = export_adapters(model, out, CHAINS, processor=processor, progress=False)
    return dense, model, processor, out, manifest


# --- adapters --------------------------------------------------------------------------------


def test_peft_adapter_gives_the_mose_logits_of_its_chain(exported):
    dense, model, processor, out, manifest = exported
    inputs = vl_batch(processor, [0, 1, 2])  # left padded, images of three sizes
    per_chain = []
    for chain in CHAINS:
        expected = forced_logits(model, inputs, chain)
        peft = PeftModel.from_pretrained(copy.deepcopy(dense), out / "adapters" / chain_name(chain)).eval()
        got = logits(peft, inputs)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        per_chain.append(got)
    assert (per_chain[0] - per_chain[1]).abs().max() > 1e-2  # the two chains really differ
    assert (per_chain[0] - logits(dense, inputs)).abs().max() > 1e-2  # and differ from the base
    assert [c["name"] for c in manifest["chains"]] == ["vehicle-crossing-yield", "general-stationary-stop"]


def test_adapter_files_are_rank_2r_with_alpha_doubled(exported):
    _, model, _, out, manifest = exported
    folder = out / "adapters" / "vehicle-crossing-yield"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 64.0, "LORA")
    projections = ("gate_proj", "up_proj", "down_proj")
    assert sorted(config["target_modules"]) == sorted(
        f"model.language_model.layers.{i}.mlp.{p}" for i in (0, 2, 4) for p in projections)
    weights = load_file(folder / "adapter_model.safetensors")
    a = weights["base_model.model.model.language_model.layers.0.mlp.down_proj.lora_A.weight"]
    b = weights["base_model.model.model.language_model.layers.0.mlp.down_proj.lora_B.weight"]
    assert a.shape == (8, 256) and b.shape == (128, 8)
    block = mose_blocks(model)[0]
    skill = DRIVING.levels[0].index("vehicle")
    expected = block.shared_expert.delta_weight("down", 0) + block.experts.delta_weight("down", skill)
    torch.testing.assert_close(64.0 / 8 * b @ a, expected.detach())
    assert manifest["layers"][0]["level"] == "perception"


def test_base_folder_is_the_dense_model_and_takes_the_adapter(exported):
    dense, model, processor, out, _ = exported
    inputs = vl_batch(processor, [3, 1])
    base = AutoModelForImageTextToText.from_pretrained(out / "base").eval()
    assert type(base).__name__ == "Qwen2VLForConditionalGeneration"
    torch.testing.assert_close(logits(base, inputs), logits(dense, inputs), atol=1e-5, rtol=1e-5)
    peft = PeftModel.from_pretrained(base, out / "adapters" / "general-stationary-stop").eval()
    torch.testing.assert_close(logits(peft, inputs), forced_logits(model, inputs, CHAINS[1]),
                               atol=1e-4, rtol=1e-4)


def test_adapters_name_their_base_which_peft_loads_by_that_name(exported):
    _, model, processor, out, manifest = exported
    folder = out / "adapters" / "general-stationary-stop"
    named = PeftConfig.from_pretrained(folder).base_model_name_or_path
    assert named == str((out / "base").resolve()) == manifest["base_model_name_or_path"]
    base = AutoModelForImageTextToText.from_pretrained(named).eval()
    peft = PeftModel.from_pretrained(base, folder).eval()
    inputs = vl_batch(processor, [2])
    torch.testing.assert_close(logits(peft, inputs), forced_logits(model, inputs, CHAINS[1]),
                               atol=1e-4, rtol=1e-4)


def test_a_bfloat16_export_casts_adapters_and_base_but_not_the_routers(exported, tmp_path):
    _, model, processor, _, _ = exported
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "bf16"
    manifest = export_adapters(model, out, CHAINS[:1], processor=processor, base_name="org/base-2b",
                               dtype=torch.bfloat16, progress=False)
    folder = out / "adapters" / chain_name(CHAINS[0])
    assert PeftConfig.from_pretrained(folder).base_model_name_or_path == "org/base-2b"
    assert (manifest["dtype"], manifest["base_model_name_or_path"]) == ("bfloat16", "org/base-2b")
    weights = load_file(folder / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert {t.dtype for t in load_file(out / "routers.safetensors").values()} == {torch.float32}
    base = AutoModelForImageTextToText.from_pretrained(out / "base")
    assert {p.dtype for p in base.parameters()} == {torch.bfloat16}
    # the model exported is untouched: same dtype, same values
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # bf16 weights compute what the float32 chain does, up to bf16 rounding
    peft = PeftModel.from_pretrained(base.float(), folder).eval()
    inputs = vl_batch(processor, [0])
    expected = forced_logits(model, inputs, CHAINS[0])
    error = (logits(peft, inputs) - expected).abs().max() / expected.abs().max()
    assert error < 0.05


def test_manifest_lists_every_chain_and_the_routers(tiny, tmp_path):
    _, model, _ = lora_model(tiny, taxonomy=SMALL)
    manifest = export_adapters(model, tmp_path / "out", progress=False, with_base=False)
    assert len(manifest["chains"]) == 2 * 3
    assert {c["name"] for c in manifest["chains"]} == {f"{a}-{b}" for a in ("general", "road")
                                                       for b in ("general", "go", "halt")}
    assert read_manifest(tmp_path / "out") == json.loads((tmp_path / "out/manifest.json").read_text())
    for entry in manifest["chains"]:
        assert (tmp_path / "out" / entry["adapter"] / "adapter_model.safetensors").is_file()
    assert [(layer["layer"], layer["level"]) for layer in manifest["layers"]] == [
        (0, "scene"), (2, "scene"), (4, "act")]
    assert manifest["base_config"]["model_type"] == "qwen2_vl" and "mose" not in manifest["base_config"]
    assert manifest["taxonomy"]["name"] == "small" and not (tmp_path / "out/base").exists()
    routers = load_file(tmp_path / "out/routers.safetensors")
    block = mose_blocks(model)[2]
    torch.testing.assert_close(routers["layers.4.weight"], block.router.weight.detach())
    assert routers["layers.4.input_scale"].shape == (128,)


# --- merged checkpoints ----------------------------------------------------------------------


def test_merged_lora_checkpoint_loads_in_plain_transformers(exported, tmp_path):
    _, model, processor, _, _ = exported
    out = export_merged(model, tmp_path / "merged", CHAINS[0], processor=processor)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and "mose" not in config
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    inputs = vl_batch(processor, [0, 2])
    torch.testing.assert_close(logits(merged, inputs), forced_logits(model, inputs, CHAINS[0]),
                               atol=1e-4, rtol=1e-4)
    assert (logits(merged, inputs) - forced_logits(model, inputs, CHAINS[1])).abs().max() > 1e-2


def test_full_experts_without_shared_merge_exactly_and_refuse_adapters(tiny, tmp_path):
    model, processor = tiny("qwen2_vl")
    model = mose.convert(model, mose.MoSEConfig(shared_expert=False)).eval()
    perturb_full_experts(model)
    with pytest.raises(ExportError, match="full experts cannot be exported as LoRA adapters.*--merge"):
        export_adapters(model, tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    out = export_merged(model, tmp_path / "m", CHAINS[1])
    inputs = vl_batch(processor, [1, 3])
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    torch.testing.assert_close(logits(merged, inputs), forced_logits(model, inputs, CHAINS[1]),
                               atol=1e-4, rtol=1e-4)


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg, merge, message", [
    (mose.MoSEConfig(), False, "sum of two gated MLPs"),
    (mose.MoSEConfig(), True, "sum of two gated MLPs"),
    (mose.MoSEConfig(experts="lora", lora_rank=4, modality_groups=True), False, "modality groups"),
    (mose.MoSEConfig(experts="lora", lora_rank=4, modality_groups=True), True, "modality groups"),
    (mose.TokenMoEConfig(experts="lora", lora_rank=4), False, "token-MoE"),
])
def test_what_cannot_be_exported_exactly_is_refused(tiny, tmp_path, cfg, merge, message):
    model, _ = tiny("qwen2_vl")
    model = mose.convert(model, cfg)
    with pytest.raises(ExportError, match=message):
        if merge:
            export_merged(model, tmp_path / "out", CHAINS[0])
        else:
            export_adapters(model, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary folder


def test_chain_parsing_names_the_bad_part():
    assert parse_chain("planning=stop", DRIVING) == ("general", "general", "stop")
    assert parse_chain("perception=vru, prediction=oncoming,planning=keep", DRIVING) == (
        "vru", "oncoming", "keep")
    for text, message in [("planning=fly", "unknown skill 'fly' at level 'planning'"),
                          ("steering=keep", "unknown level"), ("planning", "not LEVEL=SKILL"),
                          ("planning=stop,planning=keep", "given twice")]:
        with pytest.raises(ExportError, match=message):
            parse_chain(text, DRIVING)


def test_a_failed_export_leaves_nothing_and_an_existing_folder_is_kept(exported, tmp_path, monkeypatch):
    _, model, _, _, _ = exported
    (tmp_path / "kept").mkdir()
    with pytest.raises(ExportError, match="exists already"):
        export_adapters(model, tmp_path / "kept", CHAINS, progress=False)
    import mose.export as export

    original, calls = export.adapter_tensors, []

    def broken(model, chain, dtype=None):  # the second adapter fails to write
        calls.append(chain)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return original(model, chain, dtype)

    monkeypatch.setattr(export, "adapter_tensors", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_adapters(model, tmp_path / "out", CHAINS, progress=False, with_base=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


# --- routing ---------------------------------------------------------------------------------


def test_route_gives_the_models_own_chains_and_their_adapters(exported, tmp_path):
    _, model, processor, out, manifest = exported
    model = copy.deepcopy(model)
    samples = list(read_jsonl(generate("driving", n=8, seed=0, out=tmp_path / "world")))
    sharpen_routers(model, spread=prompt_batch(processor, samples))
    rows = route_records(model, processor, samples, batch_size=3, progress=False)
    with torch.no_grad():
        model(**prompt_batch(processor, samples))
    chains = [c.as_dict() for c in model.skill_chains()]
    assert [r["skill_chain"] for r in rows] == chains
    assert len({tuple(c.values()) for c in chains}) > 1  # the routers tell the samples apart
    assert [r["adapter"] for r in rows] == [chain_name(list(c.values())) for c in chains]
    assert [r["id"] for r in rows] == [s.id for s in samples]
    with_manifest = route_records(model, processor, samples, manifest=manifest, progress=False)
    exported_names = {c["name"] for c in manifest["chains"]}
    assert [r["adapter"] for r in with_manifest] == [
        r["adapter"] if r["adapter"] in exported_names else None for r in rows]
    other = {**manifest, "taxonomy": {**manifest["taxonomy"], "name": "other"}}
    with pytest.raises(ExportError, match="another model"):
        route_records(model, processor, samples[:1], manifest=other, progress=False)
