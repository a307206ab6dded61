"""Per-sample routing: invariant to padding and batch mates, forceable, explainable."""

import pytest
import torch

import mose
from conftest import (
    assert_routes_and_logits_ignore_batch_mates,
    distinct_experts,
    mose_blocks,
    routed_run,
    sharpen_routers,
    vl_batch,
)
from mose.routing import skill_label_tensor


def converted(tiny, kind="qwen2_vl", **cfg):
    model, processor = tiny(kind)
    model = mose.convert(model, mose.MoSEConfig(**cfg))
    distinct_experts(model)  # a sample sent through another's expert must show
    sharpen_routers(model)
    return model, processor




@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_route_and_logits_ignore_batch_mates_padding_length_and_side(tiny, kind):
    assert_routes_and_logits_ignore_batch_mates(*converted(tiny, kind))


def test_samples_really_take_different_routes(tiny):
    """Guards the invariance test: with sharpened routers, routes depend on the sample."""
    model, processor = converted(tiny)
    _, routes = routed_run(model, vl_batch(processor, [0, 1, 2, 3]))
    chosen = torch.cat([r.experts for r in routes.values()], dim=1)  # (B, layers)
    assert len({tuple(row.tolist()) for row in chosen}) > 1


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_what_padding_positions_hold_never_reaches_a_route(tiny, poison):
    """NaN or Inf in the padding entering the first MoSE layer (a kernel that leaves padded
    rows uninitialised, a masked softmax of an all-padding row) leaves its routes as they were."""
    model, processor = converted(tiny)
    inputs = vl_batch(processor, [0, 1, 2, 3], "left")  # three of them padded
    padding = ~inputs["attention_mask"].bool()  # (B, T)
    assert padding.any(dim=1).sum() == 3
    first = min(model.level_of_layer)
    _, clean = routed_run(model, inputs)

    def poisoned(_layer, args, kwargs):
        key = "hidden_states" if "hidden_states" in kwargs else None
        hidden = (kwargs[key] if key else args[0]).masked_fill(padding[..., None], poison)  # (B, T, H)
        return (args, {**kwargs, key: hidden}) if key else ((hidden, *args[1:]), kwargs)

    layer = model.mose_arch.layers(model)[first]
    handle = layer.register_forward_pre_hook(poisoned, with_kwargs=True, prepend=True)
    try:
        _, routes = routed_run(model, inputs)
    finally:
        handle.remove()
    assert torch.equal(routes[first].experts, clean[first].experts)
    torch.testing.assert_close(routes[first].probs, clean[first].probs, atol=1e-6, rtol=1e-6)


def test_modality_groups_send_image_and_text_tokens_to_different_experts(tiny):
    model, processor = converted(tiny, modality_groups=True)
    inputs = vl_batch(processor, [0, 1])
    _, routes = routed_run(model, inputs)
    image_ids = torch.tensor([model.config.image_token_id])
    real = inputs["attention_mask"].bool()
    images = torch.isin(inputs["input_ids"], image_ids) & real  # (B, T)
    texts = ~torch.isin(inputs["input_ids"], image_ids) & real
    for layer, route in routes.items():
        counts = model.mose_state.tokens_per_expert[layer]
        expected = torch.zeros_like(counts)
        for b in range(2):
            skill = int(route.experts[b, 0])
            expected[2 * skill] += images[b].sum()  # the skill's image expert
            expected[2 * skill + 1] += texts[b].sum()  # the skill's text expert
        assert torch.equal(counts, expected)
        assert counts[0::2].sum() == images.sum() > 0
        assert counts[1::2].sum() == texts.sum() > 0


def test_modality_groups_change_the_output_once_image_and_text_experts_differ(tiny):
    model, processor = converted(tiny, modality_groups=True)
    inputs = vl_batch(processor, [0])
    forced = torch.tensor([[1, 2, 0]])  # the route stays put while the image experts change
    before, _ = routed_run(model, inputs, skill_labels=forced)
    for block in mose_blocks(model):
        with torch.no_grad():
            block.experts.down_proj[0::2].mul_(3.0)  # only the image experts
    after, _ = routed_run(model, inputs, skill_labels=forced)
    image = torch.isin(inputs["input_ids"][0], torch.tensor([model.config.image_token_id]))
    changed = (after.logits[0] - before.logits[0]).abs().amax(dim=-1) > 1e-4  # (T,)
    # Image positions change directly; text before the image is untouched by causality.
    assert changed[image].all()
    assert not changed[: int(image.nonzero()[0])].any()


def test_forced_skill_labels_route_to_exactly_those_experts(tiny):
    model, processor = converted(tiny)
    inputs = vl_batch(processor, [0, 1, 2])
    labels = [{"perception": "vru", "prediction": "crossing", "planning": "yield"},
              {"perception": "obstacle"},
              None]
    out, routes = routed_run(model, inputs, skill_labels=labels)
    taxonomy = model.mose_config.taxonomy
    expected = taxonomy.encode_batch(labels)  # (B, L)
    for layer, level in model.level_of_layer.items():
        assert torch.equal(routes[layer].experts[:, 0], expected[:, level])
        tokens = model.mose_state.tokens_per_expert[layer]
        real = inputs["attention_mask"].sum(dim=1)
        for skill in range(len(taxonomy.levels[level].skills)):
            assert tokens[skill] == real[expected[:, level] == skill].sum()
    chains = model.skill_chains()
    assert chains[0].as_dict() == {"perception": "vru", "prediction": "crossing",
                                   "planning": "yield"}
    assert chains[2].as_dict() == {"perception": "general", "prediction": "general",
                                   "planning": "general"}
    assert out.router_loss.item() > 0


@pytest.mark.parametrize("labels, match", [
    ([{"perception": "unicorn"}] * 2, "unknown skill 'unicorn'"),
    ([{"reasoning": "general"}] * 2, "unknown level"),
    ([{}], r"shape \(1, 3\); expected \(2, 3\)"),
    (torch.tensor([[0, 0, 9], [0, 0, 0]]), "level 'planning' hold index"),
])
def test_wrong_skill_labels_raise(tiny, labels, match):
    model, processor = converted(tiny)
    with pytest.raises(ValueError, match=match):
        model(**vl_batch(processor, [0, 1]), skill_labels=labels)


class OnDevice(torch.Tensor):
    """A tensor that counts what reads it to the host, each of which syncs a GPU's stream:
    .cpu(), .item(), .tolist(), int(), float(), bool()."""

    reads = 0
    HOST_READS = {torch.Tensor.cpu, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
                  torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.numpy}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.HOST_READS:
            cls.reads += 1
            with torch._C.DisableTorchFunctionSubclass():
                result = func(*args, **(kwargs or {}))
            return result.as_subclass(torch.Tensor) if isinstance(result, torch.Tensor) else result
        return super().__torch_function__(func, types, args, kwargs)


def test_skill_chains_and_label_checks_read_the_device_once_per_batch(tiny):
    model, processor = converted(tiny)
    routed_run(model, vl_batch(processor, [0, 1, 2, 3]))
    expected = model.skill_chains()
    for route in model.mose_state.routes.values():
        route.experts, route.probs = route.experts.as_subclass(OnDevice), route.probs.as_subclass(OnDevice)
    OnDevice.reads = 0
    assert model.skill_chains() == expected
    assert OnDevice.reads == 1  # not one per sample, layer and skill

    taxonomy = model.mose_config.taxonomy
    labels = taxonomy.encode_batch([c.as_dict() for c in expected] * 4).as_subclass(OnDevice)  # (16, L)
    OnDevice.reads = 0
    assert torch.equal(skill_label_tensor(labels, taxonomy, 16), labels)
    assert OnDevice.reads == 1


def test_routing_losses_survive_the_rebuild_ddp_makes_of_an_output(tiny):
    """DDP with find_unused_parameters flattens a forward's output and rebuilds it from its keys."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    model, processor = converted(tiny)
    token_moe = mose.convert(tiny("qwen2_vl")[0], mose.TokenMoEConfig())
    inputs = vl_batch(processor, [0, 1])
    outputs = {"router_loss": model(**inputs, skill_labels=[{}, {}]), "aux_loss": token_moe(**inputs)}
    for key, out in outputs.items():
        rebuilt = tree_unflatten(*tree_flatten(out))
        assert type(rebuilt) is type(out) and torch.equal(rebuilt[key], out[key])


def test_skill_labels_are_refused_by_the_token_moe_baseline(tiny):
    model, processor = tiny("qwen2_vl")
    model = mose.convert(model, mose.TokenMoEConfig())
    with pytest.raises(ValueError, match="token-MoE"):
        model(**vl_batch(processor, [0]), skill_labels=[{}])


def test_skill_chain_reports_router_choice_and_probability_per_level_and_layer(tiny):
    model, processor = converted(tiny)
    _, routes = routed_run(model, vl_batch(processor, [0, 1]))
    chains = model.skill_chains()
    taxonomy = model.mose_config.taxonomy
    assert [c.level for c in chains[1].choices] == list(taxonomy.level_names)
    for layer, level in model.level_of_layer.items():  # one layer per level here
        choice = chains[1].choices[level]
        skill = int(routes[layer].experts[1, 0])
        assert choice.skill == taxonomy.levels[level].skills[skill]
        assert choice.prob == pytest.approx(float(routes[layer].probs[1].max()))
        assert choice.layers == ((layer, choice.skill, pytest.approx(choice.prob)),)
    assert " → " in str(chains[1]) and "perception: " in str(chains[1])


def test_router_learns_from_the_skill_loss_and_from_the_task_loss(tiny):
    model, processor = converted(tiny)
    inputs = vl_batch(processor, [0, 1])
    router = mose_blocks(model)[0].router
    forced = model(**inputs, labels=inputs["input_ids"], skill_labels=[{"perception": "vru"}] * 2)
    # A forced route is the label's choice, not the router's: its weight is the constant 1.
    assert not any(r.weights.requires_grad for r in model.mose_state.routes.values())
    (skill_grad,) = torch.autograd.grad(forced.router_loss, router.weight)
    routed = model(**inputs, labels=inputs["input_ids"])
    (task_grad,) = torch.autograd.grad(routed.loss, router.weight)
    assert skill_grad.abs().sum() > 0
    assert task_grad.abs().sum() > 0  # renormalised top-1 weight keeps a gradient


def test_token_moe_exposes_a_balance_loss_with_gradient(tiny):
    model, processor = tiny("qwen2_vl")
    model = mose.convert(model, mose.TokenMoEConfig(num_experts=4))
    out = model(**vl_batch(processor, [0, 1]))
    assert torch.isfinite(out.aux_loss) and out.aux_loss.item() > 0
    (grad,) = torch.autograd.grad(out.aux_loss, mose_blocks(model)[0].router.weight)
    assert grad.abs().sum() > 0


def test_balance_loss_is_one_when_balanced_and_num_experts_when_collapsed():
    from mose.layers import load_balancing_loss

    uniform = torch.full((8, 4), 0.25)
    spread = torch.arange(8).remainder(4)[:, None]  # (8, 1): two tokens per expert
    assert load_balancing_loss(uniform, spread).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, 4)
    collapsed[:, 2] = 1.0
    assert load_balancing_loss(collapsed, torch.full((8, 1), 2)).item() == pytest.approx(4.0)
    mask = torch.tensor([1, 1, 0, 0, 0, 0, 0, 0])  # padding does not count
    assert load_balancing_loss(collapsed, torch.full((8, 1), 2), mask).item() == pytest.approx(4.0)


def test_a_model_copies_after_a_training_forward(tiny):
    import copy

    model, processor = tiny("qwen2_vl")
    model = mose.convert(model, mose.MoSEConfig())
    model(**vl_batch(processor, [0, 1]), skill_labels=[{}, {}]).router_loss.backward()
    clone = copy.deepcopy(model)
    states = {id(block.state) for block in mose_blocks(clone)}
    assert states == {id(clone.mose_state)} and clone.mose_state is not model.mose_state
    inputs = vl_batch(processor, [0])
    with torch.no_grad():
        assert torch.allclose(clone(**inputs).logits, model(**inputs).logits)
