"""`mose estimate`: exact parameter counts from the meta device, sharding and fit arithmetic."""

from __future__ import annotations

import pytest
import torch
import yaml

import mose
from mose.estimate import (
    MicroBatch,
    activation_bytes,
    estimate_path,
    estimate_recipe,
    model_facts,
    needs_line,
    per_gpu,
    state_bytes,
)
from mose.estimate.sharding import CONTEXT_BYTES, SLACK
from mose.models.shapes import get_shape, shape_model
from mose.train.loop import freeze_all_but
from mose.train.recipe import SFTStage, recipe_from_dict
from mose.train.stages import answer_objective, sft_plan

GIB = 2**30
STAGES = {"convert": {"mose": {"taxonomy": "driving"}}, "router": {"batch_size": 4},
          "sft": {"batch_size": 2, "grad_checkpointing": True}}


def tiny_recipe(stages=STAGES, **data):
    return recipe_from_dict({"model": "tiny:qwen2_vl", "output_dir": "unused",
                             "data": {"max_length": 128, **data}, "stages": stages})


def test_published_shapes_count_their_published_parameters():
    # Qwen2-VL-2B-Instruct: 2.21B on its model card; Qwen2.5-VL-3B-Instruct: 3.75B (tied embeddings).
    counts = {name: sum(p.numel() for p in shape_model(name, device="meta")[0].parameters())
              for name in ("2b", "3b")}
    assert counts == {"2b": 2_208_985_600, "3b": 3_754_622_976}
    assert get_shape("Qwen/Qwen2-VL-2B").layers == 28 and get_shape("3b").hidden == 2048
    with pytest.raises(ValueError, match="unknown model shape"):
        get_shape("Qwen/Qwen2-VL-72B-Instruct")


def test_meta_counts_equal_counting_a_real_tiny_model():
    estimates = {e.name: e for e in estimate_recipe(tiny_recipe())}
    model, _ = mose.tiny_model("qwen2_vl", seed=0)
    mose.convert(model, mose.MoSEConfig(taxonomy="driving"))
    total = sum(p.numel() for p in model.parameters())
    plan = sft_plan("sft", model, SFTStage(), None)
    trainable = sum(p.numel() for _, p in freeze_all_but(model, plan.trainable, plan.frozen))
    routers = sum(p.numel() for n, p in model.named_parameters() if ".router." in n)
    experts = [b.experts for b in plan.trainable]
    unused = sum(e.gate_up_proj.numel() + e.down_proj.numel() for e in experts) * 4 // 5  # 4 of 5 skills idle
    assert estimates["sft"].total == estimates["router"].total == estimates["convert"].total == total
    assert estimates["sft"].trainable == trainable > 0
    assert estimates["router"].trainable == routers > 0
    assert estimates["sft"].active == total - unused
    assert estimates["convert"].trainable == 0


def test_sharding_arithmetic():
    state = state_bytes(total=1000, trainable=100, weight_bytes=4, largest_layer=50, largest_module=30,
                        root=200)
    assert (state.weights, state.gradients, state.optimizer) == (4000, 400, 800)
    ddp, zero2, zero3, fsdp = (per_gpu(state, 10, s, 4) for s in ("DDP", "ZeRO-2", "ZeRO-3", "FSDP"))
    assert (ddp.weights, ddp.gradients, ddp.optimizer, ddp.gathered) == (4000, 400, 800, 0)
    assert (zero2.weights, zero2.gradients, zero2.optimizer) == (4000, 100, 200)
    assert (zero3.weights, zero3.gradients, zero3.optimizer, zero3.gathered) == (1000, 100, 200, 240)
    assert (fsdp.weights, fsdp.gathered) == (1000, 2 * 200 + 800)
    assert ddp.total == 4000 + 400 + 800 + 10
    assert per_gpu(state, 0, "ZeRO-3", 1).total == per_gpu(state, 0, "DDP", 1).total  # one GPU shards nothing
    assert per_gpu(state_bytes(10, 1, 4), 0, "FSDP", 3).weights == 14  # shards round up
    with pytest.raises(ValueError, match="unknown strategy"):
        per_gpu(state, 0, "ZeRO-1", 4)


def test_fits_at_the_boundary():
    room = int((24 * GIB - CONTEXT_BYTES) / SLACK)
    state = state_bytes(total=room // 4, trainable=0, weight_bytes=4)
    assert per_gpu(state, 0, "DDP", 1).fits(24)
    assert not per_gpu(state, 64, "DDP", 1).fits(24)
    assert per_gpu(state, 64, "DDP", 1).fits(40)


def test_activations_match_what_autograd_saves_on_a_tiny_model():
    model, processor = mose.tiny_model("qwen2_vl", seed=0)
    model = mose.convert(model.to(torch.bfloat16), mose.MoSEConfig(taxonomy="driving"))
    plan = sft_plan("sft", model, SFTStage(), None)
    freeze_all_but(model, plan.trainable, plan.frozen)
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
        "type": "text", "text": q}]}], add_generation_prompt=True, tokenize=False) + " the car stops."
        for q in ("what is ahead?", "which object will cross the ego lane and what should we do?")]
    from PIL import Image
    processor.tokenizer.padding_side = "right"
    batch = dict(processor(text=texts, images=[Image.new("RGB", (112, 112))] * 2, return_tensors="pt",
                           padding=True))
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        answer_objective(model)(model, batch)
    predicted = activation_bytes(model_facts(model), MicroBatch.of(batch, 2)).saved
    assert 0.85 <= predicted / sum(seen.values()) <= 1.15


def test_activations_grow_with_the_batch_and_shrink_with_checkpointing():
    facts = model_facts(shape_model("2b", device="meta")[0])
    small, large = (activation_bytes(facts, MicroBatch(b, 1024, 256)) for b in (1, 2))
    assert large.saved == pytest.approx(2 * small.saved, rel=0.01)
    assert small.checkpointed < small.saved / 2
    assert small.logits == 4 * 1023 * 151936  # the fp32 log-softmax over Qwen's vocabulary
    assert activation_bytes(facts, MicroBatch(1, 1024), trained_from=None).saved == 0


def test_overrides_reach_the_estimate_as_mose_train_reads_them(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny:qwen2_vl", "output_dir": "x", "data": {"max_length": 128},
                                    "stages": STAGES}))
    base = {e.name: e for e in estimate_path(path, gpus=2)}
    doubled = {e.name: e for e in estimate_path(path, gpus=2, overrides=["stages.sft.batch_size=4",
                                                                         "stages.sft.grad_checkpointing=false"])}
    assert doubled["sft"].shape.batch == 4 and not doubled["sft"].checkpointing
    assert doubled["sft"].gpus[0].activations > 2 * base["sft"].gpus[0].activations
    assert base["sft"].gpus[0].gpus == 2
    line = needs_line(list(base.values()), 2)
    assert "router" in line and "sft" in line and "convert" not in line


def test_an_unknown_hub_model_is_a_clear_error():
    recipe = recipe_from_dict({"model": "someone/unknown-vl", "output_dir": "x", "stages": STAGES})
    with pytest.raises(ValueError, match="no shape known offline"):
        estimate_recipe(recipe)


def test_frozen_weights_held_in_bf16_are_counted_as_the_stage_holds_them():
    """The estimate's weight bytes for a LoRA-MoSE SFT stage under bf16 mixed precision equal the
    bytes of the model's parameters while the stage holds its frozen weights in bf16."""
    from mose.train.precision import held_in, weights

    recipe = tiny_recipe({"convert": {"mose": {"taxonomy": "driving", "experts": "lora", "lora_rank": 4}},
                          "sft": {"batch_size": 2}}, max_pixels=112 * 112)
    recipe.mixed_precision = "bf16"
    sft = next(e for e in estimate_recipe(recipe) if e.name == "sft")
    model, _ = mose.tiny_model("qwen2_vl", seed=0)
    mose.convert(model, mose.MoSEConfig(taxonomy="driving", experts="lora", lora_rank=4))
    plan = sft_plan("sft", model, SFTStage(), None)
    freeze_all_but(model, plan.trainable, plan.frozen)
    with held_in(weights(model, frozen_only=True), torch.bfloat16):
        measured = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    ddp, fsdp = (next(g for g in sft.gpus if g.strategy == s) for s in ("DDP", "FSDP"))
    assert ddp.weights == measured < sft.state.partitioned == fsdp.weights == 4 * sft.total


def test_the_coda_lm_lora_recipes_sft_fits_12_gib_per_gpu():
    """What the answer-only LM head and frozen weights in bf16 bring (15.7 GiB before them)."""
    from pathlib import Path

    config = Path(__file__).parents[2] / "configs" / "coda-lm" / "mose-lora.yaml"
    sft = next(e for e in estimate_path(config) if e.name == "sft")
    ddp = next(g for g in sft.gpus if g.strategy == "DDP")
    assert ddp.total <= 12 * GIB
    assert ddp.weights < 0.55 * sft.state.partitioned  # the frozen base in bf16
