"""What a GPU run meets and an fp32 CPU run does not: autocast dtypes, bf16 weights,
checkpointing, forced routes a fitted router disagrees with, generation from a filled cache."""

import contextlib

import pytest
import torch

import mose
from conftest import distinct_experts, mose_blocks, sharpen_routers, text_batch, vl_batch
from mose.layers import Experts
from mose.models.checkpointing import enable_checkpointing

BF16 = torch.bfloat16


@pytest.fixture
def cuda_scatter_rules(monkeypatch):
    """CUDA's rule for index_copy / index_add under autocast: no promoting kernel, so self and
    source must have one dtype (CPU autocast promotes, which hid a crash of every bf16 run)."""
    for name in ("index_copy", "index_add"):
        original = getattr(torch.Tensor, name)

        def strict(self, dim, index, source, *args, _original=original, _name=name, **kwargs):
            if self.dtype != source.dtype:
                raise RuntimeError(f"{_name}: self is {self.dtype} but source is {source.dtype}")
            with torch.autocast("cpu", enabled=False):
                return _original(self, dim, index, source, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, strict)


def test_the_cuda_rule_is_emulated(cuda_scatter_rules):
    with pytest.raises(RuntimeError, match="source is torch.bfloat16"):
        torch.zeros(2, 3).index_copy(0, torch.tensor([0]), torch.ones(1, 3, dtype=BF16))


def routed(tiny, cfg, kind="qwen2_vl"):
    model, processor = tiny(kind)
    model = mose.convert(model, cfg)
    distinct_experts(model)
    sharpen_routers(model)
    return model, processor


# Every dispatch kind. The experts now gather (index_select) rather than scatter, so the CUDA
# rule guards against a scatter coming back; the autocast casts are what each kind must get right.
BLOCK_KINDS = [
    mose.MoSEConfig(),  # top-1 by sample
    mose.MoSEConfig(top_k=2),  # top-2 by sample: weighted sum of two slots
    mose.MoSEConfig(modality_groups=True),  # by token
    mose.TokenMoEConfig(num_experts=4, top_k=2, shared_expert=True),
    mose.MoSEConfig(experts="lora", lora_rank=4),  # batched per-sample deltas
    mose.MoSEConfig(experts="lora", lora_rank=4, modality_groups=True),  # per-token grouped deltas
    mose.TokenMoEConfig(num_experts=4, top_k=2, experts="lora", lora_rank=4),
]
BLOCK_IDS = ["top1", "top2", "groups", "token-moe", "lora", "lora-groups", "lora-token-moe"]


def skill_labels_for(cfg, batch: int = 4) -> torch.Tensor | None:
    """Every sample its own skill, so each sample's experts differ (MoSE only)."""
    if not isinstance(cfg, mose.MoSEConfig):
        return None
    return torch.tensor([[b % 5, b % 3, b % 4] for b in range(batch)])


@pytest.mark.parametrize("cfg", BLOCK_KINDS, ids=BLOCK_IDS)
def test_blocks_run_under_bf16_autocast_by_cuda_rules(tiny, cuda_scatter_rules, cfg):
    model, processor = routed(tiny, cfg)
    inputs = vl_batch(processor, [0, 1, 2, 3])
    labels = skill_labels_for(cfg)
    with torch.no_grad():
        full = model(**inputs, skill_labels=labels).logits
        with torch.autocast("cpu", dtype=BF16):
            mixed = model(**inputs, skill_labels=labels).logits
    assert (mixed.float() - full).abs().max() < 0.05 * full.abs().max()


@pytest.mark.parametrize("grouped", ["native", "loop"])
@pytest.mark.parametrize("cfg", BLOCK_KINDS, ids=BLOCK_IDS)
def test_a_bf16_autocast_backward_gives_float32_gradients_close_to_float32_training(
        tiny, cuda_scatter_rules, monkeypatch, cfg, grouped):
    """A training step under bf16 autocast, through torch._grouped_mm or the loop that replaces
    it where the GPU lacks it (CUDA's grouped GEMM is sm90+ only): the trained weights' gradients
    arrive in their own dtype (float32) and agree with a float32 step within bf16's precision."""
    if grouped == "loop":
        monkeypatch.setattr("mose.layers.experts._NATIVE_DTYPES", {})
    model, processor = routed(tiny, cfg)
    inputs, labels = vl_batch(processor, [0, 1, 2, 3]), skill_labels_for(cfg)
    trained = {n: p for n, p in model.named_parameters() if ".experts." in n and p.requires_grad}
    assert trained
    grads = []
    for autocast in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            loss = model(**inputs, skill_labels=labels).logits.float().square().mean()
        loss.backward()
        grads.append({n: p.grad for n, p in trained.items()})
    for name, full in grads[0].items():
        mixed = grads[1][name]
        assert mixed is not None and mixed.dtype == torch.float32, name
        assert torch.isfinite(mixed).all(), name
        scale = full.abs().max()
        if scale > 0:  # an expert no sample reached has no gradient to compare
            assert (mixed - full).abs().max() < 0.1 * scale, name


def test_routers_stay_float32_when_the_model_is_cast_and_when_it_loads_in_bf16(tiny, tmp_path):
    model, _ = routed(tiny, mose.MoSEConfig())
    router = mose_blocks(model)[0].router
    with torch.no_grad():
        router.input_scale.fill_(0.3337)  # not a bf16 number
    saved = {k: v.clone() for k, v in router.state_dict().items()}
    model.save_pretrained(tmp_path)
    loaded = mose.from_pretrained(tmp_path, dtype=BF16)
    model.to(BF16)
    for m in (model, loaded):
        block = mose_blocks(m)[0]
        assert block.experts.gate_up_proj.dtype == BF16
        for key, value in block.router.state_dict().items():
            assert value.dtype == torch.float32 and torch.equal(value, saved[key]), key


def test_bf16_weights_with_float32_routers_answer(tiny):
    model, processor = routed(tiny, mose.MoSEConfig())
    model.to(BF16)
    with torch.no_grad():
        out = model(**vl_batch(processor, [0, 1]))
    assert out.logits.dtype == BF16 and torch.isfinite(out.logits).all()
    assert all(r.probs.dtype == torch.float32 for r in model.mose_state.routes.values())


def test_a_forced_route_the_router_gives_probability_zero_stays_finite(tiny):
    model, processor = routed(tiny, mose.MoSEConfig())
    for block in mose_blocks(model):
        with torch.no_grad():
            block.router.bias.copy_(torch.tensor([1e4] + [0.0] * (len(block.router.bias) - 1)))
    inputs = vl_batch(processor, [0, 1])
    labels = torch.tensor([[1, 1, 1], [2, 2, 2]])  # skills the routers give probability 0
    out = model(**inputs, skill_labels=labels)
    assert all(float(r.probs[:, 1:].max()) == 0.0 for r in model.mose_state.routes.values())
    assert torch.isfinite(out.logits).all()
    out.logits.float().square().mean().backward()
    assert torch.isfinite(mose_blocks(model)[1].experts.down_proj.grad).all()


def train_grads(model, inputs, labels):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**inputs, skill_labels=labels)
    (out.logits.float().square().mean() + out["router_loss"]).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_gives_the_gradients_of_a_plain_backward(tiny):
    model, processor = routed(tiny, mose.MoSEConfig())
    model.requires_grad_(False)
    for block in mose_blocks(model):
        block.requires_grad_(True)
    inputs, labels = vl_batch(processor, [0, 1]), torch.tensor([[0, 1, 2], [3, 0, 1]])
    plain = train_grads(model, inputs, labels)
    enable_checkpointing(model)
    checkpointed = train_grads(model, inputs, labels)
    assert plain.keys() == checkpointed.keys() and any("router" in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_reentrant_checkpointing_is_refused_with_the_reason(tiny):
    model, _ = routed(tiny, mose.MoSEConfig())
    with pytest.raises(ValueError, match="use_reentrant=True"):
        enable_checkpointing(model, {"use_reentrant": True})


def expert_out(experts, x, rows):
    return torch.stack([experts.expert(e, x[b]) for b, e in enumerate(rows)])  # (B, T, H)


def test_each_sample_goes_through_its_own_expert():
    """by_sample against a per-sample loop, with distinct experts: a sample sent through its
    batch mate's expert fails here (with upcycled copies it would not)."""
    torch.manual_seed(0)
    experts = Experts(4, 8, 16, torch.nn.SiLU())
    torch.nn.init.normal_(experts.gate_up_proj)
    torch.nn.init.normal_(experts.down_proj)
    x = torch.randn(5, 3, 8)
    chosen = torch.tensor([2, 0, 2, 3, 1])
    out = experts.by_sample(x, chosen[:, None], torch.ones(5, 1))
    torch.testing.assert_close(out, expert_out(experts, x, chosen.tolist()))
    assert not torch.allclose(out, expert_out(experts, x, chosen.roll(1).tolist()))


def continued_generation(model, processor, first, then):
    """Generate after `first`, then continue its cache with the tokens of `then`."""
    tok = getattr(processor, "tokenizer", processor)
    inputs = text_batch(tok, [first])
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    more = tok([" " + then], return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = torch.cat([out.sequences, more], dim=1)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=out.past_key_values,
                   max_new_tokens=1, do_sample=False)
    continued = {i: r.experts.clone() for i, r in model.mose_state.routes.items()}
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))  # the whole sequence, no cache
    return continued, {i: r.experts for i, r in model.mose_state.routes.items()}


def test_generate_from_a_filled_cache_routes_on_the_whole_sequence(tiny):
    model, processor = routed(tiny, mose.MoSEConfig(), kind="qwen2")
    for first in range(4):
        for then in ("describe the red box and the cone", "what is ahead of the car?"):
            continued, whole = continued_generation(model, processor, first, then)
            assert continued == whole or all(torch.equal(continued[i], whole[i]) for i in whole)


def test_generate_after_a_filled_cache_does_not_keep_the_last_prompts_route(tiny):
    """Guards the test above: some continuation routes differently from its first prompt."""
    model, processor = routed(tiny, mose.MoSEConfig(), kind="qwen2")
    differs = False
    for first in range(4):
        with torch.no_grad():
            model(**text_batch(processor, [first]))
        before = {i: r.experts.clone() for i, r in model.mose_state.routes.items()}
        continued, _ = continued_generation(model, processor, first, "describe the red box and the cone")
        differs |= any(not torch.equal(before[i], continued[i]) for i in before)
    assert differs


def test_a_cache_the_model_did_not_fill_is_refused(tiny):
    model, processor = routed(tiny, mose.MoSEConfig(), kind="qwen2")
    tok = getattr(processor, "tokenizer", processor)
    out = model.generate(**text_batch(tok, [0]), max_new_tokens=2, do_sample=False,
                         return_dict_in_generate=True)
    with torch.no_grad():
        model(**text_batch(tok, [1]))  # another sequence: the state no longer matches that cache
    ids = out.sequences
    with pytest.raises(RuntimeError, match="routing state covers"):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                       past_key_values=out.past_key_values, max_new_tokens=1, do_sample=False)


def test_chunked_prefill_is_refused(tiny):
    model, processor = routed(tiny, mose.MoSEConfig(), kind="qwen2")
    with pytest.raises(ValueError, match="prefill_chunk_size=None"):
        model.generate(**text_batch(processor, [1]), max_new_tokens=2, prefill_chunk_size=4)


@pytest.mark.parametrize("error, refused", [
    (RuntimeError("grouped gemm is only supported on CUDA devices with compute capability 9.0"), True),
    (NotImplementedError("Could not run 'aten::_grouped_mm' with arguments from the 'CUDA' backend"), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    (RuntimeError("CUDA error: device-side assert triggered"), False),
])
def test_a_grouped_matmul_the_device_refuses_falls_back_loudly_and_a_device_error_is_raised(
        monkeypatch, caplog, error, refused):
    import logging

    from mose.layers import experts

    monkeypatch.setattr(experts, "_NO_NATIVE", set())

    def fails(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(torch, "_grouped_mm", fails)
    x, w = torch.randn(6, 8), torch.randn(3, 8, 4)  # rows 0-1 to group 0, none to 1, 2-5 to 2
    ends = torch.tensor([2, 2, 6], dtype=torch.int32)
    if not refused:  # the device is broken: the loop must not hide it
        with pytest.raises(type(error), match="CUDA error"):
            experts._grouped_mm_impl(x, w, ends)
        assert not experts._NO_NATIVE
        return
    with caplog.at_level(logging.WARNING, logger="mose.layers.experts"):
        got = experts._grouped_mm_impl(x, w, ends)
        experts._grouped_mm_impl(x, w, ends)  # the loop from now on, without asking again
    torch.testing.assert_close(got, torch.cat([x[:2] @ w[0], x[2:] @ w[2]]))
    assert experts._NO_NATIVE == {("cpu", torch.float32)}
    assert len(caplog.records) == 1 and "does not support cpu torch.float32" in caplog.text


@contextlib.contextmanager
def partitioned_like_zero3(model):
    """DeepSpeed ZeRO-3's contract, emulated: every weight is an empty tensor (its partition lives
    elsewhere) except while the module that owns it runs: its forward pre-hook gathers the module's
    own weights (not its children's), its forward hook frees them again. A weight read anywhere
    else is empty, and the forward fails."""
    whole = {p: p.data for p in model.parameters()}

    def gather(module, *_):
        for p in module.parameters(recurse=False):
            p.data = whole[p]

    def free(module, *_):
        for p in module.parameters(recurse=False):
            p.data = torch.empty(0, dtype=p.dtype)

    handles = [h for m in model.modules() for h in (m.register_forward_pre_hook(gather),
                                                     m.register_forward_hook(free, always_call=True))]
    for module in model.modules():
        free(module)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for p, data in whole.items():
            p.data = data


def test_the_zero3_emulation_catches_a_weight_read_outside_its_module(tiny):
    model, processor = tiny("qwen2_vl")
    head = model.lm_head
    with partitioned_like_zero3(model), pytest.raises(RuntimeError):
        torch.nn.functional.linear(torch.ones(1, head.in_features), head.weight)


@pytest.mark.parametrize("cfg", BLOCK_KINDS, ids=BLOCK_IDS)
def test_every_expert_weight_is_read_inside_its_own_modules_call_as_zero3_needs(tiny, cfg):
    """ZeRO-3 gathers a module's partitioned weights (with prefetch) when the module is called;
    experts read from their block's forward would be read empty, or gathered late one by one."""
    model, processor = routed(tiny, cfg)
    inputs, labels = vl_batch(processor, [0, 1, 2, 3]), skill_labels_for(cfg)
    with torch.no_grad():
        want = model(**inputs, skill_labels=labels).logits
        with partitioned_like_zero3(model):
            got = model(**inputs, skill_labels=labels).logits
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cfg", [mose.MoSEConfig(top_k=2), mose.MoSEConfig(experts="lora", lora_rank=4)],
                         ids=["full", "lora"])
def test_a_decode_batch_of_one_route_reads_its_experts_inside_their_call_too(tiny, cfg):
    model, _ = routed(tiny, cfg)
    block = mose_blocks(model)[0]
    x = torch.randn(3, 2, model.config.text_config.hidden_size)  # (B, T, H)
    chosen, weights = torch.tensor([[1, 3]] * 3)[:, :cfg.top_k], torch.full((3, cfg.top_k), 1 / cfg.top_k)
    if cfg.experts == "lora":
        run = lambda: block.experts.by_common((1, 3), chosen, weights)("gate", x)  # noqa: E731
    else:
        run = lambda: block.experts.by_common(x, (1, 3), chosen, weights)  # noqa: E731
    with torch.no_grad():
        want = run()
        with partitioned_like_zero3(block):
            got = run()
    torch.testing.assert_close(got, want)
