"""LoRA skill experts: the frozen FFN plus a shared and a routed low-rank delta per sample."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import mose
from conftest import (
    assert_route_once_equals_uncached_decoding,
    assert_routes_and_logits_ignore_batch_mates,
    mose_blocks,
    routed_run,
    sharpen_routers,
    text_batch,
    vl_batch,
)
from mose.arch import arch_of
from mose.layers import LoRAExperts, LoRAMoSEBlock, LoRATokenMoEBlock, expert_blocks, top_k
from mose.routing import Route
from mose.train.loop import freeze_all_but

TARGETS = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
HIDDEN, INTERMEDIATE = 128, 256  # the tiny models' text dimensions


def lora(**cfg) -> mose.MoSEConfig:
    return mose.MoSEConfig(experts="lora", lora_rank=cfg.pop("lora_rank", 4), **cfg)


def converted(tiny, kind="qwen2_vl", cfg=None, spread=None, sharpen=True):
    """(dense copy, converted model, processor), routers sharpened, LoRA deltas still zero."""
    model, processor = tiny(kind)
    dense = copy.deepcopy(model)
    model = mose.convert(model, cfg or lora())
    if sharpen:
        sharpen_routers(model, spread=None if spread is None else spread(processor))
    return dense, model, processor


def randomise_deltas(model, seed: int = 0, std: float = 0.3, which=None) -> None:
    """Random B matrices, distinct per expert (and shared), so every delta shows in the output.

    A is drawn again from the same seed, so a test does not depend on the global RNG state
    that conversion drew A from. `which(e)` chooses the routed experts to perturb (all by
    default); the others stay zero.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in mose_blocks(model):
            parts = [(block.experts, lambda e: which is None or which(e))]
            if block.shared_expert is not None:
                parts.append((block.shared_expert, lambda e: which is None))
            for deltas, chosen in parts:
                for target in deltas.targets:
                    a, b = deltas.A(target), deltas.B(target)  # (E, r, in), (E, out, r)
                    a.copy_((torch.rand(a.shape, generator=generator) * 2 - 1) / a.shape[-1] ** 0.5)
                    for e in range(deltas.num_experts):
                        if chosen(e):
                            b[e] = torch.randn(b[e].shape, generator=generator) * std



def real_logits(out, inputs, row):
    mask = inputs["attention_mask"][row].bool()
    return out.logits[row][mask]  # (real tokens, V)


def merged_reference(dense, model, experts: dict, weights: dict):
    """The dense model with, at each MoSE layer, W + ΔW_shared + Σ_j w_j ΔW[e_j] merged in.

    experts, weights: layer → (k,) for one sample. Computed densely, with no LoRA code path.
    """
    ref = copy.deepcopy(dense)
    layers = arch_of(ref).layers(ref)
    with torch.no_grad():
        for block in mose_blocks(model):
            mlp = layers[block.layer_idx].mlp
            for target in block.experts.targets:
                delta = torch.zeros_like(getattr(mlp, TARGETS[target]).weight)  # (out, in)
                if block.shared_expert is not None:
                    delta += block.shared_expert.delta_weight(target, 0)
                layer = block.layer_idx
                for e, w in zip(experts[layer].tolist(), weights[layer].tolist(), strict=True):
                    delta += w * block.experts.delta_weight(target, e)
                getattr(mlp, TARGETS[target]).weight += delta
    return ref


def sample_reference(dense, model, routes, row, processor, index):
    """Logits of sample `index` alone, through the dense model merged with its own route."""
    ref = merged_reference(dense, model, {i: r.experts[row] for i, r in routes.items()},
                           {i: r.weights[row] for i, r in routes.items()})
    with torch.no_grad():
        return ref(**vl_batch(processor, [index])).logits[0]


def spread4(processor):
    return vl_batch(processor, [0, 1, 2, 3])


# --- conversion -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, cfg", [
    ("qwen2_vl", lora()),
    ("qwen2_vl", lora(modality_groups=True, lora_targets=("down",))),
    ("qwen2_5_vl", lora(taxonomy="robot", top_k=2, shared_expert=False)),
    ("qwen2", lora(lora_rank=16, lora_alpha=8)),
    ("qwen2", mose.TokenMoEConfig(num_experts=4, top_k=2, experts="lora", lora_rank=4)),
])
def test_conversion_computes_exactly_the_dense_model(tiny, kind, cfg):
    model, processor = tiny(kind)
    inputs = text_batch(processor, [0, 1]) if kind == "qwen2" else vl_batch(processor, [0, 1])
    with torch.no_grad():
        dense = model(**inputs).logits
        out = mose.convert(model, cfg)(**inputs).logits
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    assert all(b.base is not None and isinstance(b.experts, LoRAExperts) for b in mose_blocks(model))


# --- per-sample deltas ----------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_each_sample_computes_w_plus_shared_plus_its_own_skill_delta(tiny, k):
    dense, model, processor = converted(tiny, cfg=lora(top_k=k), spread=spread4)
    randomise_deltas(model)
    indices = [1, 0, 3, 2]
    inputs = vl_batch(processor, indices)  # left padded
    out, routes = routed_run(model, inputs)
    chosen = torch.cat([r.experts for r in routes.values()], dim=1)  # (B, layers·k)
    assert len({tuple(row.tolist()) for row in chosen}) > 1  # samples take different routes
    for row, index in enumerate(indices):
        expected = sample_reference(dense, model, routes, row, processor, index)
        torch.testing.assert_close(real_logits(out, inputs, row), expected, atol=1e-4, rtol=1e-4)
    # The reference can tell routes apart: a sample sent through its neighbour's deltas differs.
    row, other = next((r, o) for r in range(4) for o in range(4)
                      if not torch.equal(chosen[r], chosen[o]))
    neighbour = {i: r.experts[other] for i, r in routes.items()}
    weights = {i: r.weights[other] for i, r in routes.items()}
    with torch.no_grad():
        wrong = merged_reference(dense, model, neighbour, weights)(
            **vl_batch(processor, [indices[row]])).logits[0]
    assert (real_logits(out, inputs, row) - wrong).abs().max() > 1e-3


def test_batched_deltas_equal_each_samples_dense_delta():
    """LoRAExperts.by_sample on a batch = Σ_j w_j ΔW[e_j] z per sample (k = 2, random weights)."""
    torch.manual_seed(0)
    deltas = LoRAExperts(5, 16, 24, rank=3, alpha=6.0)
    with torch.no_grad():
        for target in deltas.targets:
            deltas.B(target).normal_()
    experts = torch.tensor([[0, 4], [2, 1], [4, 0]])  # (B, k)
    weights = torch.rand(3, 2)  # (B, k)
    delta = deltas.by_sample(experts, weights)
    for target, d_in in (("gate", 16), ("up", 16), ("down", 24)):
        z = torch.randn(3, 7, d_in)  # (B, T, in)
        got = delta(target, z)
        for b in range(3):
            w = sum(weights[b, j] * deltas.delta_weight(target, int(experts[b, j])) for j in range(2))
            torch.testing.assert_close(got[b], z[b] @ w.T, atol=1e-5, rtol=1e-5)
        by_token = deltas.by_token(experts.repeat_interleave(7, 0), weights.repeat_interleave(7, 0))
        torch.testing.assert_close(by_token(target, z.reshape(-1, d_in)).view_as(got), got,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("experts", [[[3], [3], [3]], [[0, 4], [4, 0], [0, 4]]], ids=["top1", "top2"])
def test_deltas_shared_by_the_whole_batch_equal_by_sample(experts, autocast):
    """A decode batch of one route (its experts known on the host) applies plain LoRA deltas;
    with top-2 the slots' order differs between samples and each keeps its own weights; under
    bf16 autocast (CUDA's rule, emulated on the CPU) both give bf16."""
    torch.manual_seed(0)
    deltas = LoRAExperts(5, 16, 24, rank=3, alpha=6.0)
    with torch.no_grad():
        for target in deltas.targets:
            deltas.B(target).normal_()
    experts = torch.tensor(experts)  # (B, k)
    weights = torch.rand(experts.shape) if experts.shape[1] > 1 else torch.ones(3, 1)
    common = tuple(sorted(set(experts[0].tolist())))
    got, want = deltas.by_common(common, experts, weights), deltas.by_sample(experts, weights)
    tol = 3e-2 if autocast else 1e-5
    for target, d_in in (("gate", 16), ("up", 16), ("down", 24)):
        z = torch.randn(3, 7, d_in)  # (B, T, in)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            a, b = got(target, z), want(target, z)
        assert a.dtype == b.dtype == (torch.bfloat16 if autocast else torch.float32)
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_routes_and_logits_ignore_batch_mates_padding_length_and_side(tiny, kind):
    _, model, processor = converted(tiny, kind, spread=spread4)
    randomise_deltas(model)
    assert_routes_and_logits_ignore_batch_mates(model, processor)


def test_forced_skill_labels_route_to_those_deltas_and_explain_themselves(tiny):
    dense, model, processor = converted(tiny)
    randomise_deltas(model)
    indices = [0, 1, 2]
    inputs = vl_batch(processor, indices)
    labels = [{"perception": "vru", "prediction": "crossing", "planning": "yield"},
              {"perception": "obstacle"},
              None]
    out, routes = routed_run(model, inputs, skill_labels=labels)
    expected = model.mose_config.taxonomy.encode_batch(labels)  # (B, L)
    for layer, level in model.level_of_layer.items():
        assert torch.equal(routes[layer].experts[:, 0], expected[:, level])
    assert model.skill_chains()[0].as_dict() == labels[0]
    assert out.router_loss.item() > 0
    for row, index in enumerate(indices):
        reference = sample_reference(dense, model, routes, row, processor, index)
        torch.testing.assert_close(real_logits(out, inputs, row), reference, atol=1e-4, rtol=1e-4)


def test_route_once_generation_equals_uncached_decoding_with_forced_routes(tiny):
    _, model, processor = converted(tiny)
    randomise_deltas(model)
    assert_route_once_equals_uncached_decoding(model, processor)


# --- modality groups ------------------------------------------------------------------------


def test_modality_groups_apply_the_image_delta_to_image_tokens_and_the_text_delta_to_text(tiny):
    """Block level: token t of sample b uses W + ΔW_shared + ΔW[2 s_b + is_text(t)]."""
    _, model, _ = converted(tiny, cfg=lora(modality_groups=True))
    randomise_deltas(model)
    block = mose_blocks(model)[0]
    assert isinstance(block, LoRAMoSEBlock) and block.experts.num_experts == 10
    torch.manual_seed(0)
    x = torch.randn(3, 6, HIDDEN)  # (B, T, H)
    image = torch.rand(3, 6) < 0.5  # (B, T)
    skills = torch.tensor([[0], [3], [4]])  # (B, 1)
    state = model.mose_state
    state.token_mask, state.image_mask = None, image
    state.routes[block.layer_idx] = Route(skills, torch.ones(3, 1), torch.full((3, 5), 0.2))
    with torch.no_grad():
        got = block(x)
        for b in range(3):
            for t in range(6):
                e = 2 * int(skills[b, 0]) + int(not image[b, t])
                weights = {n: getattr(block.base, p).weight + block.shared_expert.delta_weight(n, 0)
                           + block.experts.delta_weight(n, e) for n, p in TARGETS.items()}
                hidden = block.base.act_fn(weights["gate"] @ x[b, t]) * (weights["up"] @ x[b, t])
                torch.testing.assert_close(got[b, t], weights["down"] @ hidden, atol=1e-4, rtol=1e-4)
    assert state.tokens_per_expert[block.layer_idx].sum() == 18


def test_modality_groups_route_image_and_text_tokens_to_their_own_deltas(tiny):
    """Model level: with only the image deltas non-zero, a text-only prompt is the dense model's
    and an image prompt is not; with only the text deltas, the image tokens' logits change less."""
    dense, model, processor = converted(tiny, cfg=lora(modality_groups=True, shared_expert=False))
    text_only = vl_batch(processor, [0, 1], with_image=False)
    with_image = vl_batch(processor, [0, 1])
    randomise_deltas(model, which=lambda e: e % 2 == 0)  # image experts only
    with torch.no_grad():
        torch.testing.assert_close(model(**text_only).logits, dense(**text_only).logits,
                                   atol=1e-5, rtol=1e-5)
        assert (model(**with_image).logits - dense(**with_image).logits).abs().max() > 1e-3
    chains = model.skill_chains()
    assert len(chains) == 2 and all(len(c.choices) == 3 for c in chains)


# --- training -------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg, routed_per_layer", [
    (lora(), 5), (lora(modality_groups=True), 10),
    (lora(lora_targets=("gate", "down"), shared_expert=False, lora_rank=8), 5),
])
def test_trainable_parameters_of_a_lora_block_are_the_deltas_and_the_router(tiny, cfg, routed_per_layer):
    model, _ = tiny("qwen2")
    model = mose.convert(model, cfg)
    dims = {"gate": HIDDEN + INTERMEDIATE, "up": HIDDEN + INTERMEDIATE, "down": INTERMEDIATE + HIDDEN}
    per_delta = cfg.lora_rank * sum(dims[t] for t in cfg.lora_targets)
    router = 5 * (HIDDEN + 1)  # driving: 5 skills per level, a bias per skill
    freeze_all_but(model, expert_blocks(model))  # what the SFT stage does to the blocks
    for block in mose_blocks(model):
        trainable = sum(p.numel() for p in block.parameters() if p.requires_grad)
        assert trainable == (cfg.shared_expert + routed_per_layer) * per_delta + router
        assert not any(p.requires_grad for p in block.base.parameters())
    everything = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert everything == 3 * ((cfg.shared_expert + routed_per_layer) * per_delta + router)


def test_gradients_reach_only_the_deltas_and_the_router(tiny):
    _, model, processor = converted(tiny, sharpen=False)  # unsaturated routers: a real gradient
    randomise_deltas(model)
    freeze_all_but(model, expert_blocks(model))
    inputs = vl_batch(processor, [0, 1])
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    lora_names = []
    for name, param in model.named_parameters():
        if ".mlp.router." in name or ".mlp.experts." in name or ".mlp.shared_expert." in name:
            lora_names.append(name)
            if "router" in name or "shared_expert" in name:
                assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name  # the base FFN and everything outside the blocks
    assert any(".mlp.base." in n for n, _ in model.named_parameters())
    for block in mose_blocks(model):
        used = model.mose_state.routes[block.layer_idx].experts.unique()
        for target in block.experts.targets:
            grad = block.experts.B(target).grad  # (E, out, r)
            assert grad[used].abs().sum() > 0
            unused = [e for e in range(block.experts.num_experts) if e not in used.tolist()]
            assert grad[unused].abs().sum() == 0


def test_token_moe_over_lora_deltas_routes_each_token_and_trains(tiny):
    model, processor = tiny("qwen2_vl")
    cfg = mose.TokenMoEConfig(num_experts=4, top_k=2, shared_expert=True, experts="lora", lora_rank=4)
    model = mose.convert(model, cfg)
    block = mose_blocks(model)[0]
    assert isinstance(block, LoRATokenMoEBlock)
    randomise_deltas(model)
    # Block level: token n uses W + ΔW_shared + Σ_j w_nj ΔW[e_nj] with its own top-2.
    torch.manual_seed(0)
    x = torch.randn(2, 5, HIDDEN)  # (B, T, H)
    model.mose_state.token_mask = None
    with torch.no_grad():
        got = block(x).reshape(-1, HIDDEN)  # (N, H)
        experts, weights, _ = top_k(block.router(x.reshape(-1, HIDDEN)), 2)  # (N, 2) each
        assert len(set(experts[:, 0].tolist())) > 1
        for n, z in enumerate(x.reshape(-1, HIDDEN)):
            w = {t: getattr(block.base, p).weight + block.shared_expert.delta_weight(t, 0)
                 + sum(weights[n, j] * block.experts.delta_weight(t, int(experts[n, j])) for j in range(2))
                 for t, p in TARGETS.items()}
            expected = w["down"] @ (block.base.act_fn(w["gate"] @ z) * (w["up"] @ z))
            torch.testing.assert_close(got[n], expected, atol=1e-4, rtol=1e-4)
    # Training: the loss falls, the base FFNs do not move, the balance loss reaches the routers.
    base = {n: p.clone() for n, p in model.named_parameters() if ".mlp.base." in n}
    trainable = [p for _, p in freeze_all_but(model, expert_blocks(model))]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    inputs = vl_batch(processor, [0, 1])
    losses = []
    for _ in range(4):
        out = model(**inputs, labels=inputs["input_ids"])
        loss = out.loss + cfg.aux_loss_coef * out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        assert block.router.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if name in base:
            assert torch.equal(param, base[name]), name


# --- save / load and config -----------------------------------------------------------------


@pytest.mark.parametrize("kind, cfg", [
    ("qwen2_vl", lora(modality_groups=True)),
    ("qwen2_5_vl", lora(taxonomy="robot", top_k=2, lora_targets=("up", "gate"), lora_alpha=3)),
    ("qwen2", mose.TokenMoEConfig(num_experts=4, shared_expert=True, experts="lora", lora_rank=4)),
])
def test_round_trip_gives_identical_logits_and_generations(tiny, tmp_path, kind, cfg):
    model, processor = tiny(kind)
    model = mose.convert(model, cfg)
    sharpen_routers(model)
    randomise_deltas(model)
    inputs = text_batch(processor, [0, 1]) if kind == "qwen2" else vl_batch(processor, [0, 1])
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["mose"]["experts"] == "lora" and saved["mose"]["lora_targets"] == list(cfg.lora_targets)
    loaders = [mose.from_pretrained,
               (AutoModelForCausalLM if kind == "qwen2" else AutoModelForImageTextToText).from_pretrained]
    for load in loaders:
        loaded = load(tmp_path).eval()
        assert loaded.mose_config == cfg
        state = loaded.state_dict()
        assert set(state) == set(model.state_dict())
        for name, tensor in model.state_dict().items():
            assert torch.equal(state[name], tensor), name
        # transformers loads every weight trainable; training the blocks leaves their bases frozen.
        freeze_all_but(loaded, expert_blocks(loaded))
        assert all(not p.requires_grad for b in mose_blocks(loaded) for p in b.base.parameters())
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(loaded.generate(**inputs, max_new_tokens=5, do_sample=False), generated)


def test_config_round_trips_and_validates_the_lora_fields():
    cfg = lora(lora_targets=["down", "gate"], lora_alpha=8)
    assert cfg.lora_targets == ("gate", "down") and cfg.lora_alpha == 8.0
    again = mose.MoSEConfig.from_json(cfg.to_json())
    assert again == cfg and again.lora_targets == ("gate", "down")
    token = mose.TokenMoEConfig(experts="lora", lora_rank=2)
    assert mose.TokenMoEConfig.from_dict(json.loads(token.to_json())) == token
    old = {k: v for k, v in mose.MoSEConfig().to_dict().items() if not k.startswith(("experts", "lora"))}
    assert mose.MoSEConfig.from_dict(old).experts == "full"  # configs saved before LoRA load as full
    for bad, match in [({"experts": "tiny"}, "experts must be"), ({"lora_rank": 0}, "lora_rank"),
                       ({"lora_rank": 2.5}, "lora_rank"), ({"lora_alpha": -1}, "lora_alpha"),
                       ({"lora_targets": ()}, "lora_targets"), ({"lora_targets": ["q_proj"]}, "lora_targets"),
                       ({"lora_targets": ["up", "up"]}, "lora_targets")]:
        with pytest.raises(ValueError, match=match):
            mose.MoSEConfig(**bad)
        with pytest.raises(ValueError, match=match):
            mose.TokenMoEConfig(**bad)


def test_expert_similarity_compares_the_deltas_and_trainable_counts_leave_the_base_out(tiny):
    from mose.eval.analysis import expert_similarity
    from mose.study.measure import trainable_params

    _, model, _ = converted(tiny)
    randomise_deltas(model)  # distinct deltas: what the similarity of LoRA experts compares
    layer = expert_similarity(model)[0]
    assert layer.labels[0] == "shared" and layer.matrix.shape == (6, 6)
    off_diagonal = layer.matrix[~torch.eye(6, dtype=torch.bool).numpy()]
    assert (abs(off_diagonal) < 0.9).all() and layer.matrix.diagonal() == pytest.approx(1.0)
    deltas = sum(p.numel() for b in mose_blocks(model) for n, p in b.named_parameters()
                 if not n.startswith("base."))
    everything = sum(p.numel() for b in mose_blocks(model) for p in b.parameters())
    assert trainable_params(model) == deltas < everything


def test_a_loaded_lora_model_keeps_its_base_frozen(tiny, tmp_path):
    _, model, _ = converted(tiny)
    model.save_pretrained(tmp_path)
    loaded = mose.from_pretrained(tmp_path)
    bases = [b.base for b in mose_blocks(loaded)]
    assert bases and not any(p.requires_grad for base in bases for p in base.parameters())
    assert all(p.requires_grad for b in mose_blocks(loaded) for p in b.experts.parameters())
