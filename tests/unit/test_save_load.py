"""save_pretrained / from_pretrained round trip, with safetensors only."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import mose
from conftest import distinct_experts, sharpen_routers, text_batch, vl_batch


@pytest.mark.parametrize("kind, cfg", [
    ("qwen2_vl", mose.MoSEConfig(modality_groups=True)),
    ("qwen2_5_vl", mose.MoSEConfig(taxonomy="robot", top_k=2)),
    ("qwen2", mose.TokenMoEConfig(num_experts=4, shared_expert=True)),
])
def test_round_trip_gives_identical_logits_and_generations(tiny, tmp_path, kind, cfg):
    model, processor = tiny(kind)
    model = mose.convert(model, cfg)
    distinct_experts(model)
    sharpen_routers(model)
    if kind == "qwen2":
        inputs = text_batch(processor, [0, 1])
    else:
        inputs = vl_batch(processor, [0, 1])
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    model.save_pretrained(tmp_path)

    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == f"mose_{kind}" and saved["mose"]["kind"] == cfg.kind

    loaders = [mose.from_pretrained,
               (AutoModelForCausalLM if kind == "qwen2" else AutoModelForImageTextToText)
               .from_pretrained]
    for load in loaders:
        loaded = load(tmp_path).eval()
        assert loaded.mose_config == cfg  # skill order included: it is the expert index
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(loaded.generate(**inputs, max_new_tokens=5, do_sample=False),
                           generated)


def test_from_pretrained_refuses_dense_checkpoints_and_mismatched_weights(tiny, tmp_path):
    model, _ = tiny("qwen2")
    model.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="not a converted mose model"):
        mose.from_pretrained(tmp_path / "dense")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        mose.from_pretrained(tmp_path / "nowhere")
    # A MoSE config over dense weights: transformers would only warn; mose refuses.
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    config.update(model_type="mose_qwen2", mose=mose.MoSEConfig().to_dict())
    (tmp_path / "dense" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="weights do not match"):
        mose.from_pretrained(tmp_path / "dense")


def test_a_converted_checkpoint_loaded_from_disk_saves_and_reloads(tiny, tmp_path):
    """A dense model read from a legacy-layout checkpoint, converted, saves in names it loads back."""
    from transformers import Qwen2VLForConditionalGeneration

    dense, processor = tiny("qwen2_vl")
    dense.save_pretrained(tmp_path / "dense")
    loaded = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "dense")
    model = mose.convert(loaded, mose.MoSEConfig())
    model.save_pretrained(tmp_path / "mose")
    again = mose.from_pretrained(tmp_path / "mose")
    inputs = vl_batch(processor, [0, 1])
    with torch.no_grad():
        assert torch.allclose(again(**inputs).logits, model(**inputs).logits, atol=1e-5)
