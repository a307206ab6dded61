"""The routing side of serving: requests that arrive together are routed in one batch.

A `ChatRouter` runs the routing pass (the forward stops after the last MoSE layer's
router) over a batch of chats. A `RouteBatcher` gathers the requests that arrive
within a short window (or up to a batch size) and routes them together on a worker
thread, so the event loop keeps taking requests meanwhile.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mose.data.collate import IGNORE, Collator, SampleEncoder
from mose.eval.batching import is_mose
from mose.export import chain_adapter
from mose.models.device import model_device, to_device
from mose.routing import SkillChain
from mose.serving.requests import Chat


@dataclass(frozen=True)
class Routed:
    """A request's skill chain, its adapter's name, and whether that adapter is exact."""

    chain: SkillChain
    adapter: str
    exact: bool


class ChatRouter:
    """The MoSE model's routers over chat prompts."""

    def __init__(self, model: Any, processor: Any) -> None:
        if not is_mose(model):
            raise TypeError(f"{type(model).__name__} is not a MoSE model: it has no skill chains to route")
        self.model = model.eval()
        self.encoder = SampleEncoder(processor)
        pad = self.encoder.tokenizer.pad_token_id
        self.collate = Collator(self.encoder.tokenizer.eos_token_id if pad is None else pad, "right")

    def route(self, chats: Sequence[Chat]) -> list[Routed]:
        items = []
        for chat in chats:
            item = self.encoder.encode_prompt(chat.text, chat.images)
            items.append(item | {"labels": torch.full_like(item["input_ids"], IGNORE)})
        batch = self.collate(items)
        batch.pop("labels")
        with torch.no_grad(), self.model.routing_only():  # the routes are all we read
            self.model(**to_device(batch, model_device(self.model)), use_cache=False)
        cfg = self.model.mose_config
        return [Routed(chain, *chain_adapter(cfg, chain)) for chain in self.model.skill_chains()]


@dataclass
class _Waiting:
    chat: Chat
    done: asyncio.Future


class RouteBatcher:
    """Routes concurrent requests in batches: the first request waits `window_s` for company."""

    def __init__(self, router: ChatRouter, max_batch: int = 16, window_s: float = 0.01) -> None:
        self.router = router
        self.max_batch = max_batch
        self.window_s = window_s
        self.batches = 0  # routing passes run (for /health)
        self.routed = 0  # requests routed
        self._queue: asyncio.Queue[_Waiting] | None = None
        self._worker: asyncio.Task | None = None

    async def route(self, chat: Chat) -> Routed:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._work())
        done = asyncio.get_running_loop().create_future()
        await self._queue.put(_Waiting(chat, done))
        return await done

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            waiting = [await self._queue.get()]
            deadline = asyncio.get_running_loop().time() + self.window_s
            while len(waiting) < self.max_batch:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    waiting.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
            await self._route(waiting)

    async def _route(self, waiting: list[_Waiting]) -> None:
        """Route a batch; if it fails, route its requests one by one, so that only the request
        the failure came from gets it."""
        try:
            routes = await asyncio.to_thread(self.router.route, [w.chat for w in waiting])
        except Exception as error:  # the failing request is not known yet: keep serving the rest
            if len(waiting) > 1:
                for w in waiting:
                    await self._route([w])
            elif not waiting[0].done.done():
                waiting[0].done.set_exception(error)
            return
        self.batches += 1
        self.routed += len(waiting)
        for w, routed in zip(waiting, routes, strict=True):
            if not w.done.done():
                w.done.set_result(routed)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
