"""torch.compile over the routed blocks: one graph per block, whatever the routes.

Dispatch sorts rows by expert on the device and runs grouped matmuls (`mose.routing.dispatch`,
`mose.layers.experts.grouped_linear`), so nothing in a block reads a route on the host:
`fullgraph=True` (any graph break is an error) compiles every block kind, a new routing
decision reuses the compiled graph, and the compiled outputs equal eager ones. The "aot_eager"
backend traces forward and backward like inductor does, without a C++ compiler.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

import mose
from conftest import distinct_experts, mose_blocks, sharpen_routers, text_batch
from mose.inject import mose_block, token_moe_block
from mose.routing import RoutingState

HIDDEN, FFN, BATCH, SEQ = 32, 64, 4, 6

BLOCKS = {
    "top1": mose.MoSEConfig(),
    "top2": mose.MoSEConfig(top_k=2),
    "groups": mose.MoSEConfig(modality_groups=True),
    "lora": mose.MoSEConfig(experts="lora", lora_rank=4),
    "lora-groups": mose.MoSEConfig(experts="lora", lora_rank=4, modality_groups=True),
    "token-moe": mose.TokenMoEConfig(num_experts=4, top_k=2, shared_expert=True),
    # rank 3: strides torch._grouped_mm refuses, so the grouped matmul's loop runs (inside the op)
    "lora-token-moe": mose.TokenMoEConfig(num_experts=4, experts="lora", lora_rank=3),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def block_for(name: str):
    torch.manual_seed(0)
    mlp = Qwen2MLP(Qwen2Config(hidden_size=HIDDEN, intermediate_size=FFN))
    cfg = BLOCKS[name]
    block = (mose_block(mlp, cfg, RoutingState(), 0, 0) if isinstance(cfg, mose.MoSEConfig)
             else token_moe_block(mlp, cfg, RoutingState(), 0))
    with torch.no_grad():
        for param in block.experts.parameters():  # distinct experts (LoRA's B starts at zero)
            param.normal_(std=0.3)
        block.router.weight.normal_(std=2.0)  # confident routes that differ between inputs
    return block


def begin(block, x: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    """One forward's routing state: left padding on sample 0, a third image tokens."""
    batch, seq, _ = x.shape
    mask = torch.ones(batch, seq)
    mask[0, :2] = 0
    block.state.begin(seq_len=seq, attention_mask=mask, past_length=0, decode_routing="once",
                      image_mask=torch.arange(seq).expand(batch, -1) >= 2 * seq // 3,
                      skill_labels=labels)


def step(block, x: torch.Tensor) -> torch.Tensor:
    """What a decoder layer does with a block: route on its input (MoSE), then the FFN."""
    if hasattr(block, "observe"):
        block.observe(x)
    return block(x)


def chosen(block) -> torch.Tensor:
    experts, _, _ = block.state.assignments[block.layer_idx]
    return experts.clone()


def inputs(seed: int) -> torch.Tensor:
    return torch.randn(BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(seed)) * 3


def labels_for(seed: int) -> torch.Tensor:
    return torch.randperm(BATCH, generator=torch.Generator().manual_seed(seed))[:, None] % 5


CASES = [(name, forced) for name in BLOCKS for forced in (False, True)
         if not forced or isinstance(BLOCKS[name], mose.MoSEConfig)]  # forced routes are MoSE's


@pytest.mark.parametrize("name, forced", CASES, ids=[f"{n}-{'forced' if f else 'routed'}" for n, f in CASES])
def test_a_block_compiles_to_one_graph_that_serves_every_route(name, forced):
    block = block_for(name)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=backend, fullgraph=True)  # a graph break raises
    routes = []
    for seed in range(3):
        x, labels = inputs(seed), labels_for(seed) if forced else None
        with torch.no_grad():
            begin(block, x, labels)
            got = compiled(block, x)
            routes.append(chosen(block))
            begin(block, x, labels)
            want = step(block, x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(chosen(block), routes[-1])
    assert backend.frame_count == 1, "a new routing decision recompiled"
    assert not counters["graph_break"]
    assert any(not torch.equal(routes[0], r) for r in routes[1:]), "routes never changed"


@pytest.mark.parametrize("name", ["top1", "top2", "groups", "token-moe", "lora-token-moe"])
def test_compiled_training_steps_give_eager_gradients(name):
    """Backward through the grouped matmuls (their own autograd): the experts' gradients and
    the router's (top-1's p / stopgrad(p) weight) equal eager's."""
    block = block_for(name)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    for seed in range(2):
        x = inputs(seed).requires_grad_()
        grads = []
        for fn in (compiled, step):
            block.zero_grad(set_to_none=True)
            x.grad = None
            begin(block, x)
            fn(block, x).square().mean().backward()
            grads.append({"x": x.grad, **{n: p.grad for n, p in block.named_parameters()
                                           if p.grad is not None}})
        assert grads[0].keys() == grads[1].keys() and "router.weight" in grads[0]
        for key, grad in grads[1].items():
            torch.testing.assert_close(grads[0][key], grad, atol=1e-5, rtol=1e-4, msg=key)
        assert grads[1]["router.weight"].abs().sum() > 0
    assert backend.frame_count == 1


@pytest.mark.parametrize("name", ["top1", "top2", "groups", "token-moe", "lora-groups"])
def test_the_eager_dispatch_never_reads_the_device(name, monkeypatch):
    """No .tolist(), .item(), int(), bool() of a tensor in an eager forward (CUDA would sync)."""
    block = block_for(name)
    x = inputs(0)
    begin(block, x)
    for attr in ("tolist", "item", "__int__", "__bool__", "__float__"):
        def refuse(*_args, _attr=attr, **_kwargs):
            raise AssertionError(f"host sync: Tensor.{_attr}")
        monkeypatch.setattr(torch.Tensor, attr, refuse)
    with torch.no_grad():
        step(block, x)


def prefill_and_decode(model, blocks, inputs: dict, steps: int = 3):
    """Logits of the prefill and of each decode step, and each block's experts per prompt token."""
    from transformers import DynamicCache

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    out = model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(), use_cache=True)
    logits, routes = [out.logits], [chosen(block) for block in blocks]
    for _ in range(steps):
        token = out.logits[:, -1:].argmax(-1)  # (B, 1)
        mask = torch.cat([mask, torch.ones_like(token)], dim=1)
        out = model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values,
                    use_cache=True)
        logits.append(out.logits)
    return logits, routes


@pytest.mark.parametrize("cfg", [mose.MoSEConfig(), mose.TokenMoEConfig(num_experts=4, top_k=2)],
                         ids=["mose", "token-moe"])
def test_a_compiled_model_prefills_and_decodes_without_breaks_or_recompiling_for_new_routes(tiny, cfg):
    model, tokenizer = tiny("qwen2")
    model = mose.convert(model, cfg)
    if isinstance(cfg, mose.MoSEConfig):
        distinct_experts(model)
        sharpen_routers(model)
    model.eval()
    first, second = text_batch(tokenizer, [0, 1, 2, 3]), text_batch(tokenizer, [3, 2, 1, 0])
    assert first["input_ids"].shape == second["input_ids"].shape
    blocks = mose_blocks(model)
    with torch.no_grad():
        backend = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=backend)
        _, routes = prefill_and_decode(compiled, blocks, first)
        frames = backend.frame_count  # prefill, decode, decode at a dynamic length
        got, new_routes = prefill_and_decode(compiled, blocks, second)
        want, eager_routes = prefill_and_decode(model, blocks, second)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert backend.frame_count == frames, "new routes recompiled"
    assert any(not torch.equal(a, b) for a, b in zip(routes, new_routes, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(new_routes, eager_routes, strict=True))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["top1", "lora"])
def test_a_compiled_block_ignores_a_route_told_on_the_host(name):
    """Route groups tell a decode batch's experts on the host (`Route.common`); eagerly the
    block runs them without the dispatch, compiled it keeps the dispatch: the same outputs,
    and no recompiling per route."""
    block = block_for(name)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=backend, fullgraph=True)
    for skill in range(3):
        x = inputs(skill)
        with torch.no_grad():
            begin(block, x, torch.full((BATCH, 1), skill))
            block.observe(x)
            block.state.routes[0].common = (skill,)
            got, want = compiled(x), block(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert backend.frame_count == 1, "a route told on the host recompiled"
    assert not counters["graph_break"]
