"""Decoding in route groups (`mose.eval.regroup`): the answers of each prompt alone, one route
per decode step, slots refilled as answers end, no routing pass."""

import copy
from collections import Counter

import pytest
import torch

import mose
from conftest import distinct_experts, mose_blocks, sharpen_routers
from mose.eval.batching import current_route_keys, plain_batches
from mose.eval.regroup import RouteGroupDecoder

NEW_TOKENS = 8
LENGTHS = (5, 9, 3, 12, 7, 4, 10, 6, 8)  # prompt lengths: decode batches mix caches of every length


@pytest.fixture(scope="module")
def model():
    """A text MoSE model with distinct experts: a prompt decoded with another's expert shows."""
    dense, _ = mose.tiny_model("qwen2", seed=0)
    converted = mose.convert(dense, mose.MoSEConfig(taxonomy="robot")).eval()
    distinct_experts(converted)
    return converted


def prompts() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(10, 600, (n,), generator=generator) for n in LENGTHS]


def left_padded(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    longest = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([r.new_zeros(longest - len(r)), r]) for r in rows])  # (B, T)
    mask = torch.stack([torch.cat([r.new_zeros(longest - len(r)), torch.ones_like(r)]) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def alone(model, prompt: torch.Tensor, config) -> list[int]:
    """Greedy tokens of one prompt generated on its own, up to and with its end token."""
    with torch.no_grad():
        out = model.generate(**left_padded([prompt]), generation_config=config)
    tokens = out[0, len(prompt):].tolist()
    ends = [i for i, t in enumerate(tokens) if t in config.eos_token_id]
    return tokens[: ends[0] + 1] if ends else tokens


def end_token_config(model, rows: list[torch.Tensor]):
    """Greedy decoding whose end token is one that answers reach at different steps, so decode
    slots free up unevenly (the tiny model's own end token never comes from random weights)."""
    config = copy.deepcopy(model.generation_config)
    config.update(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    config.eos_token_id = []  # none: full answers first, to choose the end token from
    counts = Counter(t for prompt in rows for t in set(alone(model, prompt, config)[1:]))
    config.eos_token_id = [counts.most_common(1)[0][0]]
    return config


def decode_all(model, rows, config, batch_size):
    """Every prompt through the decoder; (tokens per prompt, the routes of each decode step)."""
    decoder = RouteGroupDecoder(model, config, batch_size)
    steps = []
    hook = model.register_forward_hook(
        lambda _m, args, kwargs, _out: steps.append(current_route_keys(model))
        if kwargs["input_ids"].shape[1] == 1 else None, with_kwargs=True)
    answers = {}
    try:
        batches = ((idx, left_padded([rows[i] for i in idx])) for idx in plain_batches(len(rows), batch_size))
        with torch.no_grad():
            decoder.run(batches, lambda i, tokens, chain: answers.__setitem__(i, (list(tokens), chain)))
    finally:
        hook.remove()
    return decoder, answers, steps


def test_route_groups_answer_as_each_prompt_alone_with_one_route_per_step(model):
    rows = prompts()
    sharpen_routers(model, seed=1, spread=left_padded(rows))
    config = end_token_config(model, rows)
    decoder, answers, steps = decode_all(model, rows, config, batch_size=3)
    assert sorted(answers) == list(range(len(rows)))
    for i, prompt in enumerate(rows):
        assert answers[i][0] == alone(model, prompt, config), i
    assert len(decoder.routes) >= 3  # the prompts really spread over routes
    assert steps and all(len(set(keys)) == 1 for keys in steps)  # one route per decode step
    lengths = {len(tokens) for tokens, _ in answers.values()}
    assert len(lengths) > 1  # answers ended at different steps


def test_route_groups_of_lora_experts_answer_as_each_prompt_alone():
    """LoRA-MoSE decode batches run their one route's deltas without per-sample gathers."""
    dense, _ = mose.tiny_model("qwen2", seed=0)
    model = mose.convert(dense, mose.MoSEConfig(taxonomy="robot", experts="lora", lora_rank=4)).eval()
    distinct_experts(model, scale=5.0)  # LoRA's B starts at zero: deltas big enough to show
    rows = prompts()
    sharpen_routers(model, seed=1, spread=left_padded(rows))
    config = end_token_config(model, rows)
    decoder, answers, _ = decode_all(model, rows, config, batch_size=3)
    assert len(decoder.routes) >= 3
    for i, prompt in enumerate(rows):
        assert answers[i][0] == alone(model, prompt, config), i


def test_a_finished_slot_is_refilled_from_its_route_queue(model):
    rows = prompts()
    for block in mose_blocks(model):  # every prompt on one route: a single queue, longer than a batch
        torch.nn.init.zeros_(block.router.weight)
    config = end_token_config(model, rows)
    decoder, answers, steps = decode_all(model, rows, config, batch_size=2)
    assert len(decoder.routes) == 1
    for i, prompt in enumerate(rows):
        assert answers[i][0] == alone(model, prompt, config), i
    batches = decoder.compositions
    assert all(len(b) == 2 for b in batches[:-1]) and max(len(keys) for keys in steps) == 2
    # A prompt still decoding beside one that joined when its mate's answer ended.
    assert any(set(a) & set(b) and set(b) - set(a) for a, b in zip(batches, batches[1:], strict=False))


def test_no_routing_pass_one_prefill_per_plain_batch(model):
    rows = prompts()
    sharpen_routers(model, seed=1, spread=left_padded(rows))
    config = end_token_config(model, rows)
    prefills = []
    hook = model.register_forward_hook(
        lambda _m, args, kwargs, _out: prefills.append(kwargs["input_ids"].shape)
        if kwargs["input_ids"].shape[1] > 1 else None, with_kwargs=True)
    try:
        decode_all(model, rows, config, batch_size=4)
    finally:
        hook.remove()
    assert [shape[0] for shape in prefills] == [4, 4, 1]  # each prompt's forward over it once


def test_sampling_goes_through_generates_warpers(model):
    rows = prompts()
    sharpen_routers(model, seed=1, spread=left_padded(rows))
    greedy = end_token_config(model, rows)
    nucleus = copy.deepcopy(greedy)
    nucleus.update(do_sample=True, top_p=1e-6)  # a nucleus this small holds the top token alone
    hot = copy.deepcopy(greedy)
    hot.update(do_sample=True, temperature=5.0)

    def tokens(config, seed=0):
        torch.manual_seed(seed)
        return {i: t for i, (t, _) in decode_all(model, rows, config, batch_size=3)[1].items()}

    assert tokens(nucleus) == tokens(greedy)
    assert tokens(hot) == tokens(hot) != tokens(greedy)  # seeded, and really sampled


def test_a_repetition_penalty_reads_every_token_as_generate_does(model):
    """Processors that read the tokens so far (prompt and answer) see them in route groups too."""
    rows = prompts()
    sharpen_routers(model, seed=1, spread=left_padded(rows))
    config = end_token_config(model, rows)
    config.repetition_penalty = 5.0  # strong enough to change what greedy decoding says
    plain = copy.deepcopy(config)
    plain.repetition_penalty = 1.0
    _, answers, _ = decode_all(model, rows, config, batch_size=3)
    assert any(answers[i][0] != alone(model, r, plain) for i, r in enumerate(rows))  # it bites
    for i, prompt in enumerate(rows):
        assert answers[i][0] == alone(model, prompt, config), i
