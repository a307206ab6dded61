"""Route once: the prompt's route is kept for every generated token."""

import pytest
import torch

import mose
from conftest import (
    assert_route_once_equals_uncached_decoding,
    distinct_experts,
    mose_blocks,
    sharpen_routers,
    vl_batch,
)


def converted(tiny, **cfg):
    model, processor = tiny("qwen2_vl")
    model = mose.convert(model, mose.MoSEConfig(**cfg))
    distinct_experts(model)  # a sample sent through another's expert must show
    sharpen_routers(model)
    return model, processor


def count_router_calls(model) -> list[int]:
    calls = [0]
    for block in mose_blocks(model):
        block.router.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def generate(model, inputs, n):
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def test_first_generated_token_equals_the_full_forward_argmax(tiny):
    model, processor = converted(tiny)
    inputs = vl_batch(processor, [0, 1, 2])
    with torch.no_grad():
        expected = model(**inputs).logits[:, -1].argmax(dim=-1)
    tokens = generate(model, inputs, 1)[:, -1]
    assert torch.equal(tokens, expected)


def test_route_once_decodes_without_recomputing_routes(tiny):
    model, processor = converted(tiny)
    inputs = vl_batch(processor, [0, 1])
    with torch.no_grad():
        model(**inputs)
    prompt_routes = {i: r.experts.clone() for i, r in model.mose_state.routes.items()}
    calls = count_router_calls(model)
    generate(model, inputs, 6)
    assert calls[0] == len(prompt_routes)  # the prefill only: one call per MoSE layer
    for layer, experts in prompt_routes.items():
        assert torch.equal(model.mose_state.routes[layer].experts, experts)


def test_running_routing_recomputes_every_step(tiny):
    model, processor = converted(tiny, decode_routing="running")
    assert model.mose_config.decode_routing == "running"
    calls = count_router_calls(model)
    generate(model, vl_batch(processor, [0, 1]), 6)
    assert calls[0] == 3 * 6  # three MoSE layers, prefill + 5 decode steps


def test_route_once_generation_equals_uncached_greedy_decoding(tiny):
    assert_route_once_equals_uncached_decoding(*converted(tiny))


@pytest.mark.parametrize("cfg", [mose.MoSEConfig(modality_groups=True), mose.TokenMoEConfig()])
def test_other_blocks_generate_like_the_dense_model(tiny, cfg):
    model, processor = tiny("qwen2_vl")
    inputs = vl_batch(processor, [0, 2])
    dense = generate(model, inputs, 5)
    assert torch.equal(generate(mose.convert(model, cfg), inputs, 5), dense)


def test_decode_routing_can_be_switched_and_is_saved(tiny, tmp_path):
    model, processor = converted(tiny)
    model.set_decode_routing("running")
    calls = count_router_calls(model)
    generate(model, vl_batch(processor, [0]), 3)
    assert calls[0] == 3 * 3
    model.save_pretrained(tmp_path)
    assert mose.from_pretrained(tmp_path).mose_config.decode_routing == "running"
    with pytest.raises(ValueError, match="decode_routing"):
        model.set_decode_routing("sometimes")
