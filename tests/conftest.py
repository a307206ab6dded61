"""Shared fixtures: tiny models and batches of images + text with padding."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

import mose

QUESTIONS = [
    "what is ahead?",
    "which object will cross the ego lane and what should the ego car do?",
    "is the cone on the left?",
    "describe the red box",
]
COLORS = ["red", "blue", "green", "yellow"]
SIZES = [(56, 56), (112, 112), (56, 112), (84, 84)]


def vl_batch(processor, indices, padding_side: str = "left", with_image: bool = True):
    """Chat-formatted inputs for the chosen questions, each with its own image."""
    messages = []
    for i in indices:
        content = ([{"type": "image"}] if with_image else []) + [
            {"type": "text", "text": QUESTIONS[i]}]
        messages.append([{"role": "user", "content": content}])
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
             for m in messages]
    processor.tokenizer.padding_side = padding_side
    images = [Image.new("RGB", SIZES[i], COLORS[i]) for i in indices] if with_image else None
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def text_batch(tokenizer, indices, padding_side: str = "left"):
    tokenizer.padding_side = padding_side
    return tokenizer([QUESTIONS[i] for i in indices], return_tensors="pt", padding=True)


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) per kind, built once; tests deep-copy what they change."""
    cache = {}

    def get(kind: str):
        if kind not in cache:
            cache[kind] = mose.tiny_model(kind, seed=0)
        model, processor = cache[kind]
        return copy.deepcopy(model), processor

    return get


def sharpen_routers(model, seed: int = 0, std: float = 2.0, spread: dict | None = None) -> None:
    """Random, confident routers so that samples really take different routes.

    Mean hidden states of a random model share most of their direction, so random routers
    may send every sample to one skill. With `spread` (a batch of model inputs) each router
    is made blind to the batch's mean input: the samples' differences decide their routes.
    """
    generator = torch.Generator().manual_seed(seed)
    for block in mose_blocks(model):
        with torch.no_grad():
            weight = block.router.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * std)
    if spread is None:
        return
    with torch.no_grad():
        model(**spread)  # upcycled experts are copies: router inputs do not depend on the routes
        for block in mose_blocks(model):
            mean = model.mose_state.router_inputs[block.layer_idx].mean(dim=0)  # (H,)
            direction = mean / mean.norm()
            block.router.weight -= (block.router.weight @ direction)[:, None] * direction[None, :]


def distinct_experts(model, seed: int = 0, scale: float = 0.5) -> None:
    """Perturb every expert differently, so that which expert a token went through shows.

    Upcycled experts are exact copies of one FFN: a sample sent through its batch mate's
    expert would give the same output, and a test of routing would pass with routing broken.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in mose_blocks(model):
            # Full experts: gate_up_proj, down_proj; LoRA experts: their A and B (B starts at 0).
            for weight in block.experts.parameters():
                noise = torch.randn(weight.shape, generator=generator)  # (E, out, in)
                size = float(weight.std()) or 0.02
                weight += noise.to(weight.dtype) * size * scale


def randomise_deltas(model, seed: int = 0, std: float = 0.3) -> None:
    """Random A and B for every LoRA delta (routed and shared), distinct per expert."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in mose_blocks(model):
            for deltas in filter(None, (block.experts, block.shared_expert)):
                for target in deltas.targets:
                    a, b = deltas.A(target), deltas.B(target)  # (E, r, in), (E, out, r)
                    a.copy_((torch.rand(a.shape, generator=generator) * 2 - 1) / a.shape[-1] ** 0.5)
                    b.copy_(torch.randn(b.shape, generator=generator) * std)


def prompt_batch(processor, samples) -> dict:
    """The model inputs of the samples' prompts (left padded, as generation takes them)."""
    from mose.data.collate import Collator, SampleEncoder

    encoder = SampleEncoder(processor)
    items = [encoder(s, with_answer=False) for s in samples]
    batch = Collator(processor.tokenizer.pad_token_id, "left")(items)
    return {k: v for k, v in batch.items() if k != "labels"}


def mose_blocks(model):
    from mose.layers import ExpertBlock

    return [m for m in model.modules() if isinstance(m, ExpertBlock)]


def routed_run(model, inputs, **kwargs):
    """(output, routes per layer) of one no-grad forward."""
    with torch.no_grad():
        out = model(**inputs, **kwargs)
    return out, dict(model.mose_state.routes)


def assert_routes_and_logits_ignore_batch_mates(model, processor) -> None:
    """A sample's routes and real-token logits alone = beside shorter and longer mates,
    left or right padded (meaningful only once experts differ: `distinct_experts`)."""
    out_alone, routes_alone = routed_run(model, vl_batch(processor, [0]))
    variants = {
        "left, short mate": (vl_batch(processor, [0, 2], "left"), 0),
        "left, long mates": (vl_batch(processor, [3, 1, 0], "left"), 2),
        "right, long mates": (vl_batch(processor, [1, 0, 3], "right"), 1),
    }
    for name, (inputs, row) in variants.items():
        assert inputs["attention_mask"][row].min() == 0 or name == "left, short mate"
        out, routes = routed_run(model, inputs)
        for layer, route in routes.items():
            assert torch.equal(route.experts[row], routes_alone[layer].experts[0]), name
            torch.testing.assert_close(route.probs[row], routes_alone[layer].probs[0],
                                       atol=1e-5, rtol=1e-5)
        real = inputs["attention_mask"][row].bool()
        torch.testing.assert_close(out.logits[row][real], out_alone.logits[0], atol=1e-4, rtol=1e-4)


def assert_route_once_equals_uncached_decoding(model, processor, steps: int = 4) -> None:
    """Decoding with a cache and the prompt's route = re-running the whole sequence with the
    prompt's route forced at every step (EOS masked, as min_new_tokens bans it)."""
    inputs = vl_batch(processor, [1])
    generated = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    with torch.no_grad():
        model(**inputs)
    forced = torch.stack([model.mose_state.routes[i].experts[:, 0]
                          for i in sorted(model.mose_state.routes)], dim=1)  # (1, L)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    eos = torch.tensor(model.generation_config.eos_token_id).reshape(-1)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, skill_labels=forced,
                           use_cache=False, **extra).logits
        logits[..., eos] = float("-inf")
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
        mask = torch.cat([mask, mask[:, -1:]], dim=1)
        types = extra["mm_token_type_ids"]  # (B, T): 0 marks a text token
        extra["mm_token_type_ids"] = torch.cat([types, torch.zeros_like(types[:, :1])], dim=1)
    assert torch.equal(generated, ids)


# --- the engine tier (tests/engine) ------------------------------------------------------------


@pytest.fixture(scope="session")
def lora_mose(tmp_path_factory, questions):
    """A saved tiny LoRA-MoSE Qwen2-VL whose experts all differ and whose routers spread `questions`
    over several chains, so that an answer generated with the wrong chain's adapter (or none) shows."""
    from mose.data import read_jsonl
    from mose.models.processor import save_processor

    model, processor = mose.tiny_model("qwen2_vl", seed=0)
    model = mose.convert(model, mose.MoSEConfig(experts="lora", lora_rank=4)).eval()
    randomise_deltas(model)
    samples = [s for path in questions for s in read_jsonl(path)]
    sharpen_routers(model, std=4.0, spread=prompt_batch(processor, samples))
    folder = tmp_path_factory.mktemp("model") / "lora-mose"
    model.save_pretrained(folder)
    save_processor(processor, folder)
    return folder


@pytest.fixture(scope="session")
def questions(tmp_path_factory):
    """(driving world questions with their images, the same questions without images) as JSONL."""
    import json

    from mose.data import read_jsonl
    from mose.data.world import generate

    root = tmp_path_factory.mktemp("world")
    with_images = generate("driving", 10, seed=0, out=root, split="test")
    text_only = root / "text.jsonl"
    text_only.write_text("".join(json.dumps(s.to_dict() | {"images": [], "id": s.id + "/text"}) + "\n"
                                 for s in read_jsonl(with_images)))
    return with_images, text_only

