"""Decoding in route groups, with no routing pass.

A MoSE model decides a prompt's whole route during its prefill (each MoSE
layer routes on the mean hidden state of the prompt), and keeps it while it
decodes ("once" routing). So prompts are prefilled in plain batches, in input
order, and each prefilled prompt (its KV cache, its route, its first token)
waits in the queue of its full route. Decode batches are drawn from one queue,
so every decode step of a batch reads one skill expert per MoSE layer; when an
answer ends, the next prompt of the same queue takes its slot.

A decode batch holds prompts of different lengths, from different prefill
batches: their caches are left-padded to a common length, with an attention
mask, and each keeps its own positions (as `generate` counts them: the real
tokens before it, plus Qwen2-VL's per-prompt m-RoPE offset). Tokens are chosen
by the logits processors `generate` would use (greedy: the argmax), so greedy
answers are those of plain batching.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig

from mose.eval.batching import RouteKey, current_route_keys
from mose.routing import Route, SkillChain

# Per decoder layer: keys and values of one prompt's real tokens, (1, heads, n, head_dim) each.
KV = list[tuple[torch.Tensor, torch.Tensor]]
Done = Callable[[int, list[int], SkillChain], None]  # (prompt index, its tokens, its skill chain)


@dataclass
class Prompt:
    """A prefilled prompt: what it needs to decode, apart from the batch it prefilled in."""

    index: int  # its place in the caller's list
    key: RouteKey
    chain: SkillChain
    route: dict[int, Route]  # layer → its row of the prefill batch's route, (1, ·) tensors
    cache: KV  # its real tokens only (never padding)
    prompt_ids: torch.Tensor  # (n,) its prompt's real token ids
    offset: int  # Qwen2-VL's m-RoPE offset (0 for 1-D positions): position = text position + offset
    tokens: list[int] = field(default_factory=list)  # generated so far (the first, from the prefill)

    @property
    def length(self) -> int:
        """Tokens in its cache: the prompt and every generated token fed back so far."""
        return self.cache[0][0].shape[2]

    @property
    def next_position(self) -> int:
        """The text position of the token it feeds next (its last generated one)."""
        return len(self.prompt_ids) + len(self.tokens) - 1

    def ids(self) -> torch.Tensor:
        """(n + generated,) every token so far, as `generate`'s logits processors read them."""
        return torch.cat([self.prompt_ids, self.prompt_ids.new_tensor(self.tokens)])


class RouteGroupDecoder:
    """Prefill plain batches, decode route groups; see the module's docstring.

    `generation_config` is what `generate` would run with (the model's, updated by the
    caller's options); its logits processors choose every token.
    """

    def __init__(self, model: Any, generation_config: GenerationConfig, batch_size: int,
                 max_waiting: int | None = None) -> None:
        self.model = model
        self.config = generation_config
        self.batch_size = batch_size
        # Prefilled prompts held at once (their caches): a queue fills to a batch before this.
        self.max_waiting = max_waiting or 4 * batch_size
        eos = generation_config.eos_token_id
        self.eos = set([eos] if isinstance(eos, int) else (eos or []))
        self.pad = generation_config.pad_token_id if generation_config.pad_token_id is not None else 0
        # generate's own processors and warpers (repetition penalty, temperature, top-p, ...);
        # a private method, but transformers is pinned and there is no public one.
        self.processors = model._get_logits_processor(generation_config, device=model.device)
        self.first_token = copy.deepcopy(generation_config)  # the prefill: generate's first token
        self.first_token.update(max_new_tokens=1, return_dict_in_generate=True)
        # Qwen2-VL and Qwen2.5-VL keep each prompt's m-RoPE offset after a prefill.
        self.mrope = hasattr(getattr(model, "model", None), "rope_deltas")
        self.compositions: list[tuple[int, ...]] = []  # each decode batch's prompts (a new one per refill)
        self.routes: set[RouteKey] = set()  # the distinct full routes prefilled
        self.queues: dict[RouteKey, deque[Prompt]] = {}  # prefilled prompts waiting, per route
        self.pending: Iterator[tuple[list[int], Mapping[str, torch.Tensor]]] = iter(())
        self.on_done: Done = lambda *_: None

    def run(self, batches: Iterable[tuple[list[int], Mapping[str, torch.Tensor]]], on_done: Done) -> None:
        """Prefill each (indices, inputs) batch; call `on_done(index, tokens, chain)` per answer."""
        self.queues, self.pending, self.on_done = {}, iter(batches), on_done
        while True:
            while max(map(len, self.queues.values()), default=0) < self.batch_size and self._prefill_next():
                pass
            if not self.queues:
                return
            self.decode(max(self.queues, key=lambda k: len(self.queues[k])))

    def _prefill_next(self) -> bool:
        """Prefill the next plain batch into the queues; False if none is left or enough wait."""
        if sum(map(len, self.queues.values())) >= self.max_waiting:
            return False
        batch = next(self.pending, None)
        if batch is None:
            return False
        for prompt in self.prefill(*batch):
            if self.finished(prompt):
                self.on_done(prompt.index, prompt.tokens, prompt.chain)
            else:
                self.queues.setdefault(prompt.key, deque()).append(prompt)
        return True

    def _take(self, key: RouteKey, count: int) -> list[Prompt]:
        """Up to `count` prompts of a route's queue, prefilling more input while it is short."""
        queue = self.queues.setdefault(key, deque())
        while len(queue) < count and self._prefill_next():
            pass
        taken = [queue.popleft() for _ in range(min(count, len(queue)))]
        if not queue:
            del self.queues[key]
        return taken

    def prefill(self, indices: list[int], inputs: Mapping[str, torch.Tensor]) -> list[Prompt]:
        """One plain batch through `generate` for its first token: the prefill plain batching runs."""
        model = self.model
        out = model.generate(**inputs, generation_config=self.first_token)
        mask = inputs.get("attention_mask")  # (B, T), left-padded; none: no padding
        real = [inputs["input_ids"].shape[1]] * len(indices) if mask is None else mask.sum(dim=1).tolist()
        offsets = model.model.rope_deltas.view(-1).tolist() if self.mrope else [0] * len(indices)
        first = out.sequences[:, -1].tolist()
        routes = model.mose_state.routes
        keys, chains = current_route_keys(model), model.skill_chains()
        self.routes.update(keys)
        layers = out.past_key_values.layers
        prompts = []
        for b, index in enumerate(indices):
            n = real[b]
            cache = [(layer.keys[b:b + 1, :, -n:], layer.values[b:b + 1, :, -n:]) for layer in layers]
            route = {i: Route(r.experts[b:b + 1], r.weights[b:b + 1], r.probs[b:b + 1])
                     for i, r in routes.items()}
            prompts.append(Prompt(index, keys[b], chains[b], route, cache, inputs["input_ids"][b, -n:],
                                  int(offsets[b]), [first[b]]))
        return prompts

    def finished(self, prompt: Prompt) -> bool:
        return prompt.tokens[-1] in self.eos or len(prompt.tokens) >= self.config.max_new_tokens

    def decode(self, key: RouteKey) -> None:
        """Decode one route's queue, a batch at a time, refilling a slot as its answer ends."""
        slots = self._take(key, self.batch_size)
        while slots:
            cache, mask, routes = self._assemble(slots)
            self.compositions.append(tuple(s.index for s in slots))
            steps = 0
            while not any(self.finished(s) for s in slots):
                mask = torch.cat([mask, mask.new_ones(len(slots), 1)], dim=1)  # (B, L + steps + 1)
                self._step(slots, cache, mask, routes)
                steps += 1
            for b, slot in enumerate(slots):  # its own columns back out of the batch cache
                n = slot.length + steps
                slot.cache = [(layer.keys[b:b + 1, :, -n:], layer.values[b:b + 1, :, -n:])
                              for layer in cache.layers]
            for slot in slots:
                if self.finished(slot):
                    self.on_done(slot.index, slot.tokens, slot.chain)
            slots = [s for s in slots if not self.finished(s)]
            slots += self._take(key, self.batch_size - len(slots))

    def _assemble(self, slots: list[Prompt]) -> tuple[DynamicCache, torch.Tensor, dict[int, Route]]:
        """The slots' caches left-padded into one batch cache, (B, heads, L, d) per layer; its
        mask (B, L); their routes, stacked."""
        longest = max(s.length for s in slots)
        layers = []
        for i in range(len(slots[0].cache)):
            keys = torch.cat([_left_pad(s.cache[i][0], longest) for s in slots])
            values = torch.cat([_left_pad(s.cache[i][1], longest) for s in slots])
            layers.append((keys, values))
        device = layers[0][0].device
        lengths = torch.tensor([s.length for s in slots], device=device)
        mask = (torch.arange(longest, device=device) >= longest - lengths[:, None]).long()  # (B, L)
        # Every slot came from one route's queue: its key says, on the host, which experts
        # each layer runs for the whole batch (the key lists layers in order, experts sorted).
        key = slots[0].key
        routes = {i: Route(torch.cat([s.route[i].experts for s in slots]),
                           torch.cat([s.route[i].weights for s in slots]),
                           torch.cat([s.route[i].probs for s in slots]),
                           common=key[j])
                  for j, i in enumerate(sorted(slots[0].route))}
        cache = DynamicCache(ddp_cache_data=layers, config=self.model.config.get_text_config())
        return cache, mask, routes

    def _step(self, slots: list[Prompt], cache: DynamicCache, mask: torch.Tensor,
              routes: dict[int, Route]) -> None:
        """Feed each slot's last token, on the slots' routes; append the next one it chooses.
        `mask` (B, L + 1) covers the cache and the token fed."""
        state = self.model.mose_state
        # Set before every step: a prefill between two steps (a refill) leaves its own routes.
        # "Once" routing keeps these; no running mean is read.
        state.routes, state.running = routes, {}
        device = mask.device
        tokens = torch.tensor([[s.tokens[-1]] for s in slots], device=device)  # (B, 1)
        text = torch.tensor([[s.next_position] for s in slots], device=device)  # (B, 1)
        if self.mrope:
            offsets = torch.tensor([[s.offset] for s in slots], device=device)  # (B, 1)
            positions = torch.stack([text, *[text + offsets] * 3])  # (4, B, 1): text row, then t, h, w
        else:
            positions = text
        with torch.no_grad():
            logits = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=True).logits[:, -1]  # (B, V)
        scores = logits.float()
        if self.processors:  # they read every token so far (a repetition penalty, say)
            scores = self.processors(_left_pad_ids([s.ids() for s in slots], self.pad), scores)
        if self.config.do_sample:
            chosen = torch.multinomial(scores.softmax(dim=-1), 1).squeeze(1)  # (B,)
        else:
            chosen = scores.argmax(dim=-1)  # (B,)
        for slot, token in zip(slots, chosen.tolist(), strict=True):
            slot.tokens.append(token)


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """(1, h, n, d) → (1, h, length, d), zeros before."""
    pad = length - t.shape[2]
    return t if pad == 0 else torch.cat([t.new_zeros(t.shape[0], t.shape[1], pad, t.shape[3]), t], dim=2)


def _left_pad_ids(rows: Sequence[torch.Tensor], pad: int) -> torch.Tensor:
    longest = max(len(r) for r in rows)
    return torch.stack([torch.cat([r.new_full((longest - len(r),), pad), r]) for r in rows])  # (B, N)
