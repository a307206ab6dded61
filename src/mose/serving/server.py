"""`mose serve`: an OpenAI-compatible chat endpoint that routes each request with the MoSE model
and forwards it to the engine's adapter for its skill chain.

    client ──POST /v1/chat/completions──▶ mose serve ──routing pass──▶ skill chain → adapter
                                              │
                                              └──same body, model = adapter──▶ vLLM server

The engine's answer comes back unchanged, with one extension field an OpenAI client
ignores: `"mose": {"skill_chain": {level: {skill, prob}}, "adapter": ..., "exact": ...}`
(streams carry it in their first event, and every response in `x-mose-adapter` /
`x-mose-skill-chain` headers). Errors are OpenAI-shaped `{"error": {...}}` with the status
that says whose fault it is: 400 a malformed request or an image that does not decode,
502 a backend that is down or failing, 503 an adapter the backend lacks, 504 a backend
too slow. The server keeps serving after each.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request  # the `serve` extra: pip install 'mose[serve]'
from fastapi.responses import JSONResponse, StreamingResponse

from mose.eval.predictions import chain_dict
from mose.serving.backend import Backend, BackendError
from mose.serving.requests import RequestError, read_chat
from mose.serving.router import RouteBatcher, Routed


def error_response(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def mose_field(routed: Routed) -> dict[str, Any]:
    return {"skill_chain": chain_dict(routed.chain), "adapter": routed.adapter, "exact": routed.exact}


def create_app(batcher: RouteBatcher, backend: Backend, tokenizer: Any, max_concurrency: int = 32) -> FastAPI:
    """The FastAPI app: /v1/chat/completions, /v1/models and /health."""
    slots = asyncio.Semaphore(max_concurrency)  # requests at the backend at once; the rest wait

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await batcher.close()
        await backend.close()

    app = FastAPI(title="mose serve", lifespan=lifespan)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
            chat = read_chat(body, tokenizer)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "the body is not JSON", "invalid_request_error")
        except RequestError as error:
            return error_response(400, str(error), "invalid_request_error")
        try:
            routed = await batcher.route(chat)
        except Exception as error:  # the processor refused the prompt (an image too small, say)
            return error_response(400, f"mose could not route this request: {type(error).__name__}: "
                                       f"{error}", "invalid_request_error")
        headers = {"x-mose-adapter": routed.adapter,
                   "x-mose-skill-chain": json.dumps(routed.chain.as_dict())}
        forward = dict(body, model=routed.adapter)
        try:
            if not await backend.has_adapter(routed.adapter):
                return error_response(503, f"the request was routed to chain adapter {routed.adapter!r}, "
                                           f"which the backend at {backend.url} does not serve: start it "
                                           "with every chain's adapter (mose export writes them all)",
                                      "adapter_not_served")
            if body.get("stream"):
                await slots.acquire()
                try:
                    events = await backend.stream(forward)
                except BaseException:
                    slots.release()
                    raise
                return StreamingResponse(_with_mose_field(events, routed, slots),
                                         media_type="text/event-stream", headers=headers)
            async with slots:
                answer = await backend.complete(forward)
        except BackendError as error:
            return error_response(error.status, str(error), "backend_error")
        return JSONResponse(answer | {"mose": mose_field(routed)}, headers=headers)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "mose", "object": "model", "owned_by": "mose"}]}

    @app.get("/health")
    async def health():
        routing = {"batches": batcher.batches, "routed": batcher.routed}
        try:
            adapters = len(await backend.adapters(refresh=True))
        except BackendError as error:
            return JSONResponse({"status": "backend unavailable", "backend": str(error), "routing": routing},
                                status_code=503)
        return {"status": "ok", "backend": backend.url, "adapters": adapters, "routing": routing}

    return app


async def _with_mose_field(events: AsyncIterator[bytes], routed: Routed,
                           slots: asyncio.Semaphore) -> AsyncIterator[bytes]:
    """The backend's events, the first data event with the `mose` field added; frees the slot at the end."""
    first = True
    try:
        async for line in events:
            if first and line.startswith(b"data: {"):
                event = json.loads(line[len(b"data: "):])
                line = b"data: " + json.dumps(event | {"mose": mose_field(routed)}).encode() + b"\n"
                first = False
            yield line
    finally:
        slots.release()
