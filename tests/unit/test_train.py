"""Training stages on the tiny model: each stage, freezing, checkpoints, reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import mose
from conftest import distinct_experts, prompt_batch, sharpen_routers
from mose.data.world import generate
from mose.models.checkpointing import enable_checkpointing
from mose.models.loading import load_model
from mose.models.processor import save_processor
from mose.train import RecipeError, load_recipe, train
from mose.train.recipe import recipe_from_dict

FAST = {"batch_size": 4, "log_every": 1, "save_every": 0}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """48 labelled driving samples with images."""
    return str(generate("driving", n=48, seed=0, out=tmp_path_factory.mktemp("world")))


def recipe(tmp_path, world, stages, **top):
    data = {"model": "tiny:qwen2_vl", "output_dir": str(tmp_path / "run"),
            "data": {"train": world}, "stages": stages, **top}
    return recipe_from_dict(data, source="test.yaml")


def mose_stages(router=None, sft=None):
    return {"convert": {"mose": {"taxonomy": "driving"}},
            "router": {**FAST, "max_steps": 3, "lr": 1e-2, "eval_size": 8, **(router or {})},
            "sft": {**FAST, "max_steps": 3, "lr": 1e-3, **(sft or {})}}


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_mose_recipe_trains_only_what_each_stage_owns(tmp_path, world):
    results = train(recipe(tmp_path, world, mose_stages(sft={"skill_loss_weight": 0.1})), progress=False)
    run = tmp_path / "run"
    converted, _ = load_model(str(run / "convert"))
    routed, _ = load_model(str(run / "router"))
    tuned, _ = load_model(str(run / "sft"))
    before, after_router, after_sft = params(converted), params(routed), params(tuned)
    router_names = {n for n in before if ".router." in n}
    block_names = {n for n in before if ".mlp." in n and any(f"layers.{i}.mlp" in n for i in (0, 2, 4))}
    assert router_names and block_names > router_names
    for name in before:
        router_changed = not torch.equal(before[name], after_router[name])
        assert router_changed == (name in router_names), name  # routers all move, nothing else does
        if name not in block_names:
            assert torch.equal(after_router[name], after_sft[name]), name  # frozen: bit-identical
    assert any(not torch.equal(after_router[n], after_sft[n]) for n in block_names - router_names)
    levels = [k for k in results["router"] if k.startswith("router_acc/")]
    # per level and chain in float32 and in bfloat16, and how often the two agree
    assert len(levels) == 2 * 4 + 1 and all(0 <= results["router"][k] <= 1 for k in levels)
    assert results["sft"]["loss"] > 0


def test_backbone_then_token_moe_and_dense_ffn(tmp_path, world):
    stages = {"pretrain": {"stage": "backbone", **FAST, "max_steps": 2, "trainable": "language"},
              "convert": {"token_moe": {"num_experts": 4}},
              "sft": {**FAST, "max_steps": 2}}
    train(recipe(tmp_path, world, stages), progress=False)
    base, _ = mose.tiny_model("qwen2_vl", seed=0)
    pretrained, _ = load_model(str(tmp_path / "run" / "pretrain"))
    old, new = params(base), params(pretrained)
    vision = [n for n in old if n.startswith("model.visual.")]
    assert vision and all(torch.equal(old[n], new[n]) for n in vision)  # the vision tower stays frozen
    assert not torch.equal(old["lm_head.weight"], new["lm_head.weight"])
    moe, _ = load_model(str(tmp_path / "run" / "sft"))
    assert isinstance(moe.mose_config, mose.TokenMoEConfig)

    ffn_only = {"dense_sft": {"stage": "backbone", **FAST, "max_steps": 2, "trainable": "ffn"}}
    train(recipe(tmp_path / "ffn", world, ffn_only), progress=False)
    tuned = params(load_model(str(tmp_path / "ffn" / "run" / "dense_sft"))[0])
    changed = {n for n in old if not torch.equal(old[n], tuned[n])}
    layers = {n.split(".layers.")[1].split(".")[0] for n in changed}
    assert changed and all(".mlp." in n for n in changed) and layers == {"0", "2", "4"}


def test_the_vision_tower_trains_at_its_own_lr(tmp_path, world):
    # AdamW's first step moves every weight with a gradient by about its lr (m / sqrt(v) is
    # the gradient's sign), so the largest move in each part is that part's lr.
    lr, vision_lr = 1e-3, 1e-6
    stages = {"pretrain": {"stage": "backbone", **FAST, "max_steps": 1, "schedule": "constant",
                           "warmup_ratio": 0.0, "lr": lr, "trainable": "all", "vision_lr": vision_lr}}
    train(recipe(tmp_path, world, stages), progress=False)
    old = params(mose.tiny_model("qwen2_vl", seed=0)[0])
    new = params(load_model(str(tmp_path / "run" / "pretrain"))[0])

    def largest_move(vision: bool) -> float:
        names = [n for n in old if n.startswith("model.visual.") == vision]
        return max((new[n] - old[n]).abs().max().item() for n in names)

    assert largest_move(vision=True) == pytest.approx(vision_lr, rel=0.02)
    assert largest_move(vision=False) == pytest.approx(lr, rel=0.02)


def test_trained_directory_reloads_and_generates_with_skill_chains(tmp_path, world):
    train(recipe(tmp_path, world, mose_stages()), progress=False)
    model, processor = load_model(str(tmp_path / "run" / "sft"))
    recipe_file = tmp_path / "run" / "sft" / "recipe.yaml"
    assert "finished_stage: sft" in recipe_file.read_text()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is ahead?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    from PIL import Image
    inputs = processor(text=[text], images=[Image.new("RGB", (56, 56))], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4 or out[0, -1] == processor.tokenizer.eos_token_id
    chain = model.skill_chains()[0]
    assert [c.level for c in chain.choices] == ["perception", "prediction", "planning"]


def test_a_dense_checkpoint_directory_trains_like_a_download(tmp_path, world):
    model, processor = mose.tiny_model("qwen2_vl", seed=3)
    checkpoint = tmp_path / "Qwen2-VL-tiny"
    model.save_pretrained(checkpoint)
    save_processor(processor, checkpoint)
    train(recipe(tmp_path, world, mose_stages(), model=str(checkpoint)), progress=False)
    trained, _ = load_model(str(tmp_path / "run" / "router"))
    assert torch.equal(trained.lm_head.weight, model.lm_head.weight)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny, world):
    from mose.data import read_jsonl
    from mose.data.collate import Collator, EncodedDataset, SampleEncoder
    from mose.train.stages import answer_objective

    model, processor = tiny("qwen2_vl")
    mose.convert(model, mose.MoSEConfig(taxonomy="driving"))
    samples = list(read_jsonl(world))[:6]
    sharpen_routers(model, spread=prompt_batch(processor, samples))
    dataset = EncodedDataset(samples, SampleEncoder(processor, model.mose_config.taxonomy))
    batch = Collator(processor.tokenizer.pad_token_id)(dataset.items)
    results = []
    for checkpointing in (False, True):
        copy_ = copy.deepcopy(model).train()
        if checkpointing:
            enable_checkpointing(copy_, {"use_reentrant": False})
        loss = answer_objective(copy_, skill_loss_weight=0.5)(copy_, batch)
        loss.backward()
        routes = {i: r.experts.clone() for i, r in copy_.mose_state.routes.items()}
        grads = {n: p.grad.clone() for n, p in copy_.named_parameters() if p.grad is not None}
        results.append((loss.detach(), routes, grads))
    (loss_a, routes_a, grads_a), (loss_b, routes_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert all(torch.equal(routes_a[i], routes_b[i]) for i in routes_a)
    assert any(r[:, 0].unique().numel() > 1 for r in routes_a.values())  # samples really differ
    assert grads_a.keys() == grads_b.keys()
    router_grads = [n for n in grads_a if ".router." in n]
    assert router_grads and all(grads_a[n].abs().sum() > 0 for n in router_grads)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4), name


def test_the_answer_loss_runs_the_lm_head_on_answer_positions_only(tiny, world):
    """The same loss (and gradients) as cross-entropy over full logits, from a head that
    computed one row per answer token: the (B, T, V) logits of a 2B step are never made."""
    import torch.nn.functional as F

    from mose.data import read_jsonl
    from mose.data.collate import IGNORE, Collator, EncodedDataset, SampleEncoder
    from mose.train.stages import answer_objective

    model, processor = tiny("qwen2_vl")
    mose.convert(model, mose.MoSEConfig(taxonomy="driving"))
    distinct_experts(model)
    samples = list(read_jsonl(world))[:5]
    items = EncodedDataset(samples, SampleEncoder(processor, model.mose_config.taxonomy)).items
    batch = Collator(processor.tokenizer.pad_token_id)(items)
    rows = []
    handle = model.lm_head.register_forward_hook(lambda _m, _a, out: rows.append(out.shape[:-1]))
    loss = answer_objective(model, teacher_forcing=True)(model, batch)
    handle.remove()
    answer_tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert rows == [torch.Size([answer_tokens])] and answer_tokens < batch["labels"].numel() / 2
    grads = torch.autograd.grad(loss, model.lm_head.weight)[0]

    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # (B, T, V)
    full = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(loss, full)
    torch.testing.assert_close(grads, torch.autograd.grad(full, model.lm_head.weight)[0])


def test_answer_loss_sums_the_same_however_the_batch_is_split(tiny, world):
    """The loop divides the objective's sum by the global answer-token count; for data-parallel
    runs to equal one process, the sum (skill loss included) must add up over any split."""
    from mose.data import read_jsonl
    from mose.data.collate import Collator, EncodedDataset, SampleEncoder
    from mose.train.stages import answer_objective

    model, processor = tiny("qwen2_vl")
    mose.convert(model, mose.MoSEConfig(taxonomy="driving"))
    samples = list(read_jsonl(world))[:6]
    sharpen_routers(model, spread=prompt_batch(processor, samples))
    items = EncodedDataset(samples, SampleEncoder(processor, model.mose_config.taxonomy)).items
    collate = Collator(processor.tokenizer.pad_token_id)
    objective = answer_objective(model, skill_loss_weight=5.0)
    with torch.no_grad():
        whole = objective(model, collate(items))
        split = objective(model, collate(items[:1])) + objective(model, collate(items[1:]))
    assert torch.allclose(whole, split, rtol=1e-5)


def test_recipe_errors_name_the_key_before_any_work(tmp_path, world):
    with pytest.raises(RecipeError, match="unknown key 'stages.sft.learning_rate'"):
        recipe(tmp_path, world, {"convert": {"mose": {}}, "sft": {"learning_rate": 1}})
    with pytest.raises(RecipeError, match="'stages.sft.batch_size' is 'big'"):
        recipe(tmp_path, world, {"convert": {"mose": {}}, "sft": {"batch_size": "big"}})
    with pytest.raises(RecipeError, match="test.yaml: stages.sft.batch_size is 0; it must be >= 1"):
        recipe(tmp_path, world, {"convert": {"mose": {}}, "sft": {"batch_size": 0}})
    with pytest.raises(RecipeError, match="stages.sft.lr is nan"):
        recipe(tmp_path, world, {"convert": {"mose": {}}, "sft": {"lr": "nan"}})
    with pytest.raises(RecipeError, match="test.yaml: stages.pre.vision_lr is 1e-05 but trainable is 'lang"):
        recipe(tmp_path, world, {"pre": {"stage": "backbone", "vision_lr": 1e-5}})
    with pytest.raises(RecipeError, match="stage 'pre': vision_lr is set, but qwen2 has no vision tower"):
        train(recipe(tmp_path, world, {"pre": {"stage": "backbone", "trainable": "all", "vision_lr": 1e-5}},
                     model="tiny:qwen2"))
    with pytest.raises(RecipeError, match="data.fraction is 0.0"):
        recipe(tmp_path, world, {"convert": {"mose": {}}}, data={"train": world, "fraction": 0})
    with pytest.raises(RecipeError, match="stage 'sft': sft needs a converted model"):
        train(recipe(tmp_path, world, {"sft": {}, "convert": {"mose": {}}}))
    with pytest.raises(RecipeError, match="router pretraining needs a MoSE model"):
        train(recipe(tmp_path, world, {"convert": {"token_moe": {}}, "router": {}}))
    unlabelled = tmp_path / "plain.jsonl"
    rows = [json.loads(line) for line in open(world)]
    unlabelled.write_text("".join(json.dumps({**r, "skills": None}) + "\n" for r in rows))
    with pytest.raises(RecipeError, match="no record of .* has skill labels"):
        train(recipe(tmp_path, str(unlabelled), mose_stages()))
    with pytest.raises(RecipeError, match="no such data file"):
        train(recipe(tmp_path, str(tmp_path / "missing.jsonl"), mose_stages()))
    with pytest.raises(ValueError, match="no such directory"):
        train(recipe(tmp_path, world, mose_stages(), model=str(tmp_path / "nowhere")))
    assert not (tmp_path / "run").exists()  # nothing started


def test_finished_runs_need_resume_and_resume_skips_finished_stages(tmp_path, world):
    r = recipe(tmp_path, world, mose_stages())
    train(r, progress=False)
    with pytest.raises(RecipeError, match="pass --resume"):
        train(r, progress=False)
    results = train(r, resume=True, progress=False)
    assert all(results[n]["skipped"] for n in ("convert", "router", "sft"))
    assert "router_acc/chain" in results["router"]  # the first run's metrics are kept
    changed = recipe(tmp_path, world, mose_stages(sft={"lr": 5e-4}))
    with pytest.raises(RecipeError, match=r"run/sft was trained with other settings \(stages.sft\)"):
        train(changed, resume=True, progress=False)


def test_load_recipe_merges_base_and_applies_overrides(tmp_path, world):
    (tmp_path / "base.yaml").write_text(
        f"model: tiny:qwen2_vl\noutput_dir: {tmp_path}/run\ndata: {{train: {world}}}\n"
        "stages:\n  convert: {mose: {taxonomy: driving}}\n  sft: {lr: 1.0e-4, batch_size: 4}\n")
    (tmp_path / "moe.yaml").write_text("base: base.yaml\nstages:\n  convert: {mose: null, "
                                       "token_moe: {num_experts: 8}}\n  sft: {lr: 2e-4}\n")
    r = load_recipe(tmp_path / "moe.yaml", ["stages.sft.grad_accum=2", "data.fraction=0.5", "seed=3"])
    assert r.stages["sft"].lr == 2e-4 and r.stages["sft"].batch_size == 4
    assert r.stages["sft"].grad_accum == 2 and r.data.fraction == 0.5 and r.seed == 3
    assert r.stages["convert"].config().num_experts == 8
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(tmp_path / "moe.yaml", ["stages.sft.lr"])


def test_every_shipped_recipe_loads(world):
    from pathlib import Path

    root = Path(__file__).parents[2] / "configs"
    recipes = [p for p in root.rglob("*.yaml")
               if p.parent.name != "accelerate" and not p.name.startswith("_") and "study" not in p.parts]
    assert len(recipes) == 13
    for path in recipes:
        loaded = load_recipe(path, [f"data.train={world}"])
        assert loaded.stages, path
    moe = load_recipe(root / "coda-lm" / "moe-8x1.yaml")
    assert list(moe.stages) == ["convert", "sft"] and moe.stages["convert"].config().num_experts == 8
    assert not moe.stages["sft"].teacher_forcing
    for bench in ("coda-lm", "robo2vlm"):  # MoSE skill by skill, then its routers refitted
        lora = load_recipe(root / bench / "mose-lora.yaml")
        assert list(lora.stages) == ["convert", "router", "sft", "refit"]
        assert lora.stages["sft"].teacher_forcing
        assert lora.stages["convert"].config().experts == "lora"


def test_a_hub_id_without_network_is_a_clear_error(tmp_path, world, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="cannot fetch it from the Hugging Face Hub"):
        train(recipe(tmp_path, world, mose_stages(), model="Qwen/Qwen2-VL-2B-Instruct"))


def test_a_resume_state_that_does_not_fit_the_model_is_refused(tmp_path, tiny):
    from mose.train.checkpoint import load_trainable

    model, _ = tiny("qwen2_vl")
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)
    with pytest.raises(ValueError, match="does not match the model"):
        load_trainable(model, {"lm_head.weight": torch.zeros(3, 3)}, tmp_path)
    with pytest.raises(ValueError, match="not trained by both"):
        load_trainable(model, {"model.nothing.weight": torch.zeros(3)}, tmp_path)


def test_training_routes_on_the_prompt_as_answering_does(tiny, tmp_path):
    """A route chosen in training must be the one inference takes: read from the prompt, not the answer."""
    from mose.data import read_jsonl
    from mose.data.collate import Collator, SampleEncoder
    from mose.data.world import general_weights
    from mose.train.stages import answer_objective

    model, processor = tiny("qwen2_vl")
    mose.convert(model, mose.MoSEConfig(taxonomy="driving"))
    # Long answers ("Describe the scene.") move the mean of the whole sequence far from the prompt's.
    weights = general_weights("driving")
    samples = list(read_jsonl(generate("driving", 12, seed=4, out=tmp_path, weights=weights)))
    encoder = SampleEncoder(processor, model.mose_config.taxonomy)
    pad = processor.tokenizer.pad_token_id
    training = Collator(pad, "right")([encoder(s) for s in samples])
    prompts = Collator(pad, "left")([encoder(s, with_answer=False) for s in samples])

    def router_inputs(run) -> torch.Tensor:
        with torch.no_grad():
            run()
        return torch.stack(list(model.mose_state.router_inputs.values()))  # (layers, B, H)

    def plain(batch):
        return {k: v for k, v in batch.items() if k not in ("labels", "skill_labels")}

    in_training = router_inputs(lambda: answer_objective(model)(model, training))
    answering = router_inputs(lambda: model(**plain(prompts)))
    torch.testing.assert_close(in_training, answering, rtol=1e-4, atol=1e-6)
    # The check can fail: averaging over the answer too reads other means.
    whole = router_inputs(lambda: model(**plain(training)))
    assert (whole - answering).abs().max() > 100 * (in_training - answering).abs().max() + 1e-4
