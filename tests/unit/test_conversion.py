"""Conversion preserves the dense model's function, and refuses what does not fit."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mose
from conftest import mose_blocks, sharpen_routers, text_batch, vl_batch
from mose.layers import Experts, MoSEBlock, Router
from mose.routing import Route, RoutingState

CONFIGS = {
    "mose": mose.MoSEConfig(),
    "mose_groups": mose.MoSEConfig(modality_groups=True),
    "mose_top2": mose.MoSEConfig(top_k=2),
    "token_moe": mose.TokenMoEConfig(num_experts=4, top_k=1),
    "token_moe_shared_top2": mose.TokenMoEConfig(num_experts=8, top_k=2, shared_expert=True),
}


def inputs_for(kind, processor):
    if kind == "qwen2":
        return text_batch(processor, [0, 1, 2])
    return vl_batch(processor, [0, 1, 2])


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen2"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_model_computes_what_the_dense_model_computed(tiny, kind, name):
    model, processor = tiny(kind)
    inputs = inputs_for(kind, processor)
    assert inputs["attention_mask"].min() == 0, "the batch must contain padding"
    with torch.no_grad():
        dense = model(**inputs).logits
        converted = mose.convert(model, CONFIGS[name])
        sharpen_routers(converted)  # routes differ per sample and token, output must not
        logits = converted(**inputs).logits
    assert len(mose_blocks(converted)) == 3  # even layers 0, 2, 4 of 6
    assert (logits - dense).abs().max().item() <= 1e-4


def test_llama_converts_through_the_same_table():
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        logits = mose.convert(model, mose.MoSEConfig(taxonomy="robot"))(input_ids=ids).logits
    assert (logits - dense).abs().max().item() <= 1e-4


def test_one_skill_block_without_shared_expert_equals_the_dense_ffn(tiny):
    model, _ = tiny("qwen2")
    mlp = model.model.layers[0].mlp
    state = RoutingState()
    block = MoSEBlock(router=Router(128, 1), experts=Experts.upcycle(mlp, 1), shared=None,
                      state=state, layer_idx=0, level=0, top_k=1, modality_groups=False)
    x = torch.randn(3, 7, 128)
    block.observe(x)
    assert state.routes[0].experts.eq(0).all()
    torch.testing.assert_close(block(x), mlp(x), atol=1e-5, rtol=1e-5)


def test_experts_by_sample_and_by_token_agree(tiny):
    model, _ = tiny("qwen2")
    experts = Experts.upcycle(model.model.layers[0].mlp, 4)
    with torch.no_grad():
        experts.down_proj.normal_()  # make the experts differ
    x = torch.randn(5, 6, 128)
    chosen = torch.tensor([[2, 0], [1, 3], [2, 1], [0, 0], [3, 2]])
    weights = torch.rand(5, 2)
    by_sample = experts.by_sample(x, chosen, weights)
    per_token = chosen[:, None, :].expand(-1, 6, -1).reshape(-1, 2)  # (B*T, 2)
    by_token = experts.by_token(x.reshape(-1, 128), per_token,
                                weights[:, None, :].expand(-1, 6, -1).reshape(-1, 2))
    torch.testing.assert_close(by_sample, by_token.view(5, 6, 128), atol=1e-5, rtol=1e-5)
    manual = sum(weights[b, j] * experts.expert(int(chosen[b, j]), x[b])
                 for b in [1] for j in range(2))
    torch.testing.assert_close(by_sample[1], manual, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("chosen", [[[2], [2], [2]], [[1, 3], [3, 1], [1, 3]]], ids=["top1", "top2"])
def test_experts_shared_by_the_whole_batch_run_without_dispatch_as_by_sample(tiny, chosen, autocast):
    """A decode batch of one route (its experts known on the host) takes the plain-FFN path;
    with top-2 the slots' order differs between samples and each keeps its own weights.
    Under bf16 autocast (CUDA's rule for linear layers, emulated on the CPU) both paths give
    bf16 from fp32 weights and inputs."""
    model, _ = tiny("qwen2")
    experts = Experts.upcycle(model.model.layers[0].mlp, 4)
    with torch.no_grad():
        experts.down_proj.normal_()  # make the experts differ
    x = torch.randn(3, 2, 128)
    chosen = torch.tensor(chosen)
    weights = torch.rand(chosen.shape) if chosen.shape[1] > 1 else torch.ones(3, 1)
    common = tuple(sorted(set(chosen[0].tolist())))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got, want = experts.by_common(x, common, chosen, weights), experts.by_sample(x, chosen, weights)
    assert got.dtype == want.dtype == (torch.bfloat16 if autocast else torch.float32)
    tol = 2e-2 if autocast else 1e-5
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_parameter_counts_match_the_design(tiny):
    """Per MoSE layer: a shared expert + one expert per skill (x2 with groups) + router."""
    model, _ = tiny("qwen2")
    ffn = sum(p.numel() for p in model.model.layers[0].mlp.parameters())
    dense = sum(p.numel() for p in model.parameters())
    for cfg, experts_per_layer in [(mose.MoSEConfig(), 5), (mose.MoSEConfig(modality_groups=True), 10)]:
        converted = mose.convert(copy.deepcopy(model), cfg)
        added = sum(p.numel() for p in converted.parameters()) - dense
        routers = 3 * 5 * (128 + 1)  # driving: 5 skills per level, hidden 128, a bias per skill
        assert added == 3 * experts_per_layer * ffn + routers  # shared replaces the FFN


@pytest.mark.parametrize("cfg, match", [
    (mose.MoSEConfig(layers=[0, 2, 9]), "out of range: the model has 6"),
    (mose.MoSEConfig(layers=[0, 2]), "cannot cover the 3 levels"),
])
def test_configs_that_do_not_fit_the_model_raise(tiny, cfg, match):
    model, _ = tiny("qwen2")
    with pytest.raises(ValueError, match=match):
        mose.convert(model, cfg)


def test_unsupported_architecture_and_double_conversion_raise(tiny):
    model, _ = tiny("qwen2")
    with pytest.raises(ValueError, match="unsupported architecture Qwen2Model"):
        mose.convert(model.model, mose.MoSEConfig())
    mose.convert(model, mose.MoSEConfig())
    with pytest.raises(ValueError, match="already converted"):
        mose.convert(model, mose.MoSEConfig())


def test_calling_a_block_outside_the_model_explains_itself():
    state = RoutingState()
    block = MoSEBlock(router=Router(8, 2), experts=Experts(2, 8, 16, torch.nn.SiLU()),
                      shared=None, state=state, layer_idx=3, level=0, top_k=1,
                      modality_groups=False)
    with pytest.raises(RuntimeError, match="MoSE layer 3 has no route"):
        block(torch.zeros(1, 2, 8))
    state.routes[3] = Route(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1), torch.ones(1, 2))
    state.token_mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="does not match hidden states"):
        block.observe(torch.zeros(1, 2, 8))
