"""The engine behind `mose serve`: a vLLM OpenAI server holding a MoSE model's exported adapters.

`Backend` asks it over HTTP (each adapter is one of its models, named as the chain's
adapter folder); every failure becomes a `BackendError` with the HTTP status `mose
serve` answers with: 502 when the backend is unreachable or fails, 504 when it is
too slow, 503 when it lacks the adapter a request was routed to. `start_vllm_server`
starts one on loopback for a `mose export` folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from mose.export import ADAPTERS, read_manifest
from mose.serving.engine import cpu_kv_cache_env, engine_args

ADAPTER_CACHE_S = 30.0  # how long the backend's adapter list is trusted before it is asked again


class BackendError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Backend:
    """An OpenAI-compatible engine server at `url` (its /v1 routes)."""

    def __init__(self, url: str, timeout_s: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=5.0))
        self._adapters: set[str] = set()
        self._asked = float("-inf")

    async def adapters(self, refresh: bool = False) -> set[str]:
        """The model names the backend serves (cached a little: asked per request it would double
        the backend's load); `refresh` asks again."""
        if refresh or time.monotonic() - self._asked > ADAPTER_CACHE_S:
            data = await self._json(await self._send("GET", "/v1/models"))
            self._adapters = {m["id"] for m in data.get("data", [])}
            self._asked = time.monotonic()
        return self._adapters

    async def has_adapter(self, name: str) -> bool:
        return name in await self.adapters() or name in await self.adapters(refresh=True)

    async def complete(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return await self._json(await self._send("POST", "/v1/chat/completions", json=body))

    async def stream(self, body: Mapping[str, Any]) -> AsyncIterator[bytes]:
        """The backend's server-sent events, line by line; the request is sent (and its status
        checked) before the first line is yielded, so a failure to start is a BackendError."""
        response = await self._send("POST", "/v1/chat/completions", json=body, stream=True)
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            await self._json(response)  # raises with the backend's message

        async def lines() -> AsyncIterator[bytes]:
            try:
                async for line in response.aiter_lines():
                    yield (line + "\n").encode()
            finally:
                await response.aclose()

        return lines()

    async def _send(self, method: str, path: str, stream: bool = False, **kwargs: Any) -> httpx.Response:
        try:
            request = self.client.build_request(method, path, **kwargs)
            return await self.client.send(request, stream=stream)
        except httpx.TimeoutException:
            raise BackendError(504, f"the backend at {self.url} did not answer {path} in time") from None
        except httpx.HTTPError as error:
            raise BackendError(502, f"the backend at {self.url} is unreachable "
                                    f"({type(error).__name__}: {error})") from None

    async def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except json.JSONDecodeError:
            data = {"error": {"message": response.text[:500]}}
        if response.status_code >= 400:
            message = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else data
            status = response.status_code if response.status_code < 500 else 502
            raise BackendError(status, f"the backend answered {response.status_code}: {message}")
        return data

    async def close(self) -> None:
        await self.client.aclose()


def vllm_server_command(export: str | Path, port: int, dtype: str = "auto",
                        overrides: Mapping[str, Any] | None = None) -> list[str]:
    """The command line of a vLLM OpenAI server on 127.0.0.1:`port` holding every adapter of an export."""
    export = Path(export)
    manifest = read_manifest(export)
    args = engine_args(export, manifest, dtype, overrides=overrides)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
               "--port", str(port), "--lora-modules",
               *[f"{c['name']}={export / ADAPTERS / c['name']}" for c in manifest["chains"]]]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is not False:
            command += [flag, json.dumps(value) if isinstance(value, (dict, list)) else str(value)]
    return command


def start_vllm_server(export: str | Path, port: int, dtype: str = "auto",
                      overrides: Mapping[str, Any] | None = None, log: Path | None = None,
                      ready_timeout_s: float = 900.0) -> subprocess.Popen:
    """Start a vLLM OpenAI server for an export and wait until its /health answers.

    Its output goes to `log` (or is discarded). Raises BackendError (with the log's tail) if it
    exits or is not ready in time; the caller terminates the process it gets."""
    command = vllm_server_command(export, port, dtype, overrides)
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115 (the process owns it)
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                               env=os.environ | cpu_kv_cache_env())
    begin = time.monotonic()
    while time.monotonic() - begin < ready_timeout_s:
        if process.poll() is not None:
            tail = Path(log).read_text(errors="replace")[-3000:] if log is not None else ""
            raise BackendError(502, f"the vLLM server exited with {process.returncode} while "
                                    f"starting:\n{tail}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2.0).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    process.terminate()
    raise BackendError(504, f"the vLLM server was not ready within {ready_timeout_s:.0f} s")
