"""Serving benchmark: decode throughput with route-aware batching vs plain batching.

The test set spreads over every skill of every level, as a set of questions
does after router pretraining: five skill chains (chain c takes skill c at
every level, so each level's five skills all occur), the same number of
prompts per chain, in shuffled order. The routers are fitted in closed form
(least squares from each prompt's mean hidden state entering a MoSE layer to
its chain's skill) so that every prompt's own route is its chain: what router
pretraining does, without a training loop inside a benchmark.

Plain batching takes the prompts in input order, so a batch mixes routes and a
decode step reads one skill expert per distinct skill. Route-aware batching
(`mose.eval.batching`) first routes every prompt with a forward that stops
after the last router, then batches prompts sharing their full route; its
routing pass is timed apart. The dense backbone runs the plain batches. Same
Qwen2 text model as `model.py`; decode time is read per step inside generate
(from the first generated token to the last), so one run gives it.

The second table is what `mose predict` runs, end to end (prefill, decode,
and the routing pass where there is one), at several answer lengths: plain
batching; the routing pass then route-aware batches; and route groups
(`mose.eval.regroup`): plain prefill batches, whose prompts then decode in
batches that share their route, with no routing pass.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from common import device_line, medians, param_mib, parser, setup, table
from model import backbone_config, flops_per_token
from transformers import Qwen2ForCausalLM, StoppingCriteria, StoppingCriteriaList

import mose
from mose.eval.batching import plain_batches, route_aware_batches, route_keys
from mose.eval.regroup import RouteGroupDecoder
from mose.layers import MoSEBlock

CHAINS = 5  # skills per level in the driving taxonomy
MARGIN = 8.0  # router logit of a prompt's own skill over the others


def prompts(count: int, length: int, vocab: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(2, vocab, (count, length), generator=generator).to(device)  # (N, T)


def fit_routers(model, ids: torch.Tensor, chains: torch.Tensor, batch: int) -> None:
    """Set each router so that every prompt routes to its chain's skill at the router's level.

    The router input of a prompt (mean hidden state entering the layer) is read
    from the routing state of a forward with the chains forced; least squares
    from those inputs to one-hot targets is exact while prompts ≤ hidden size.
    """
    inputs: dict[int, list[torch.Tensor]] = {}
    with torch.no_grad():
        for rows in plain_batches(len(ids), batch):
            model(input_ids=ids[rows], skill_labels=chains[rows], use_cache=False)
            for layer, (total, count) in model.mose_state.running.items():
                inputs.setdefault(layer, []).append(total / count)  # (b, H)
    blocks = {i: layer.mlp for i, layer in enumerate(model.mose_arch.layers(model))
              if isinstance(layer.mlp, MoSEBlock)}
    for layer, rows in inputs.items():
        block = blocks[layer]
        x = torch.cat(rows).double()  # (N, H)
        skills = block.router.weight.shape[0]
        target = torch.nn.functional.one_hot(chains[:, block.level], skills).double() * MARGIN  # (N, S)
        weight = (torch.linalg.pinv(x) @ target).T  # (S, H)
        block.router.float()  # it casts its input to its own dtype: exact fitted weights even in bf16
        with torch.no_grad():
            block.router.weight.copy_(weight.float())


class DecodeClock(StoppingCriteria):
    """Stamps every generated token: last minus first is the time of the cached decode steps."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--full", action="store_true", help="Qwen2-VL-2B's language model shape")
    args = p.parse_args()
    device, dtype = setup(args)
    cfg = backbone_config(args.full)
    batch, prompt, new = (2, 32, 8) if args.quick else (4, 128, 32)
    count = CHAINS * batch  # one full route-aware batch per chain
    print(f"# Serving benchmark — hidden {cfg.hidden_size}, FFN {cfg.intermediate_size}, "
          f"{cfg.num_hidden_layers} layers, {count} prompts over {CHAINS} skill chains, batch {batch}, "
          f"prompt {prompt}, {new} new tokens; {device_line(device, dtype)}")
    torch.manual_seed(0)
    dense = Qwen2ForCausalLM(cfg).eval()
    moe = mose.convert(copy.deepcopy(dense), mose.MoSEConfig()).eval()
    dense, moe = dense.to(device, dtype), moe.to(device, dtype)
    ids = prompts(count, prompt, cfg.vocab_size, device)
    # Chain c at every level, prompts shuffled so that input order mixes the chains.
    order = torch.randperm(count, generator=torch.Generator().manual_seed(0))
    chains = (torch.arange(count) % CHAINS)[order][:, None].expand(-1, 3).to(device)  # (N, L)
    fit_routers(moe, ids, chains, batch)

    def route_all() -> list:
        return [key for rows in plain_batches(count, batch)
                for key in route_keys(moe, {"input_ids": ids[rows]})]

    keys = route_all()
    layers = len(moe.level_of_layer)
    expected = [((int(chains[i, 0]),),) * layers for i in range(count)]  # the chain's skill everywhere
    if keys != expected:
        raise RuntimeError("fitted routers do not give every prompt its chain's route")
    plans = {"dense": (dense, plain_batches(count, batch)),
             "MoSE, plain batching": (moe, plain_batches(count, batch)),
             "MoSE, route-aware batching": (moe, route_aware_batches(keys, batch))}
    decode: dict[str, list[float]] = {name: [] for name in plans}

    def run(name: str):
        model, batches = plans[name]

        def generate_all() -> None:
            seconds = 0.0
            for rows in batches:
                clock = DecodeClock(device)
                model.generate(input_ids=ids[rows], attention_mask=torch.ones_like(ids[rows]),
                               max_new_tokens=new, min_new_tokens=new, do_sample=False,
                               stopping_criteria=StoppingCriteriaList([clock]))
                if len(clock.stamps) != new:
                    raise RuntimeError(f"expected a stamp per new token, got {len(clock.stamps)}")
                seconds += clock.stamps[-1] - clock.stamps[0]
            decode[name].append(seconds)
        return generate_all

    repeats = max(3, args.repeats // 3)
    with torch.no_grad():
        total = medians({**{name: run(name) for name in plans}, "routing pass": route_all},
                        device, repeats, 1)
    routing = total["routing pass"]
    tokens = count * (new - 1)  # decode steps after the token the prefill gives
    speed = {name: tokens / statistics.median(values[1:]) for name, values in decode.items()}
    context = prompt + new / 2
    ideal = flops_per_token(cfg, context, 0) / flops_per_token(cfg, context, len(moe.level_of_layer))
    rows = []
    for name, (model, batches) in plans.items():
        is_moe = model is moe
        skills = _skills_per_layer(keys, batches) if is_moe else "–"
        route_cost = routing if "route-aware" in name else 0.0
        ideal_speed = ideal if is_moe else 1.0
        ratio = speed[name] / speed["dense"]
        rows.append([name, len(batches), skills, f"{speed[name]:.0f}", ratio, ideal_speed,
                     ratio / ideal_speed, f"{100 * route_cost / total[name]:.1f}",
                     total["dense"] / (total[name] + route_cost), f"{param_mib(model):.1f}"])
    table("decode throughput by batching (a test set spread over every skill)",
          ["batching", "batches", "skill experts per MoSE layer (mean)", "decode tok/s",
           "decode speed × dense", "ideal speed ×", "speed ÷ ideal", "routing pass, % of generate",
           "end-to-end speed × dense", "params MiB"], rows)
    # The routing pass costs about one prefill per prompt; each decode step saves the
    # difference in step time. Past this answer length route-aware batching wins end to end.
    decode_seconds = {name: tokens / speed[name] for name in plans}  # all batches
    saved_per_step = (decode_seconds["MoSE, plain batching"]
                      - decode_seconds["MoSE, route-aware batching"]) / (new - 1)
    if saved_per_step > 0:
        print(f"\nroute-aware batching pays for its routing pass from answers of about "
              f"{routing / saved_per_step:.0f} new tokens (prompt {prompt}); route groups have no "
              "routing pass to pay for")
    with torch.no_grad():
        routing_against_prefill(moe, ids, batch, device, repeats, route_all)
        lengths = [8] if args.quick else [16, 32] if args.full else [4, 16, 32]  # --full: a GPU's time
        end_to_end(moe, ids, batch, lengths, device, repeats)


def routing_against_prefill(moe, ids: torch.Tensor, batch: int, device, repeats: int, route_all) -> None:
    """The routing pass (`mose route`, `predict --engine vllm`, `mose serve`) stops after the last
    MoSE layer's router: no later layer, no LM head. Its time against a full prefill of the same
    batches, beside the share of decoder layers it runs."""
    def prefill_all() -> None:
        for rows in plain_batches(len(ids), batch):
            moe(input_ids=ids[rows], use_cache=False)

    seconds = medians({"full prefill": prefill_all, "routing pass": route_all}, device, repeats, 1)
    layers = moe.config.num_hidden_layers
    last = max(moe.level_of_layer)  # the last MoSE layer's index: layers 0..last-1 run whole
    table("the routing pass against a full prefill (same prompts and batches)",
          ["pass", "ms", "× full prefill", "runs"],
          [["full prefill", f"{1000 * seconds['full prefill']:.1f}", 1.0,
            f"{layers} decoder layers and the LM head"],
           ["routing pass", f"{1000 * seconds['routing pass']:.1f}",
            seconds["routing pass"] / seconds["full prefill"],
            f"{last} decoder layers and layer {last}'s attention (its FFN's router is the last)"]])


def end_to_end(moe, ids: torch.Tensor, batch: int, lengths: list[int], device, repeats: int) -> None:
    """Answers per second of each way `mose predict` could batch, prefill and routing included."""
    rows = []
    for new in lengths:
        seconds = medians(predict_variants(moe, ids, batch, new), device, repeats, 1)
        plain = seconds["plain batching"]
        rows += [[new, name, f"{len(ids) / t:.2f}", plain / t] for name, t in seconds.items()]
    table("end to end, as `mose predict` batches (prefill, decode and any routing pass)",
          ["new tokens", "batching", "answers/s", "speed × plain batching"], rows)


def predict_variants(moe, ids: torch.Tensor, batch: int, new: int) -> dict:
    """Answering every prompt with `new` tokens: plain batches, the routing pass then route-aware
    batches, route groups."""
    count, mask = len(ids), torch.ones_like(ids)
    config = copy.deepcopy(moe.generation_config)
    config.update(max_new_tokens=new, do_sample=False, pad_token_id=0)
    config.eos_token_id = []  # random prompts: every answer runs its full length

    def plain(batches=None):
        for rows in batches or plain_batches(count, batch):
            moe.generate(input_ids=ids[rows], attention_mask=mask[rows], generation_config=config)

    def routing_pass_then_groups():
        keys = [key for rows in plain_batches(count, batch)
                for key in route_keys(moe, {"input_ids": ids[rows]})]
        plain(route_aware_batches(keys, batch))

    def route_groups():
        batches = ((rows, {"input_ids": ids[rows], "attention_mask": mask[rows]})
                   for rows in plain_batches(count, batch))
        RouteGroupDecoder(moe, config, batch).run(batches, lambda *_: None)

    return {"plain batching": plain, "routing pass, then route-aware batches": routing_pass_then_groups,
            "route groups, no routing pass": route_groups}


def _skills_per_layer(keys: list, batches: list[list[int]]) -> float:
    """Distinct skill experts a decode step reads per MoSE layer, averaged over batches and layers."""
    layers = len(keys[0])
    counts = [len({keys[i][layer] for i in rows}) for rows in batches for layer in range(layers)]
    return sum(counts) / len(counts)


if __name__ == "__main__":
    main()
