"""An OpenAI-compatible chat endpoint, asked with retries and backoff.

The only network mose ever uses is an endpoint the user names (LLM annotation,
LLM judging). Transient failures (connection, timeout, rate limit, 5xx) are
retried with exponential backoff; anything else fails at once, clearly.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any


class EndpointError(RuntimeError):
    """The endpoint could not answer (after retries, or for a non-transient reason).

    `transient` says the retries ran out on failures that may pass (a judge counts
    that sample as failed and goes on); `status` is the HTTP status when there was
    one (401, 403, 404 mean the settings are wrong, not the sample).
    """

    def __init__(self, message: str, status: int | None = None, transient: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.transient = transient


@dataclass
class ChatEndpoint:
    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    max_retries: int = 4
    backoff_s: float = 1.0
    timeout_s: float = 60.0
    temperature: float = 0.0

    def __post_init__(self) -> None:
        from openai import OpenAI

        # Our own retry loop (below) decides what is transient; the client's is off.
        self._client = OpenAI(base_url=self.base_url, api_key=os.environ.get(self.api_key_env) or "none",
                              max_retries=0, timeout=self.timeout_s)

    def ask(self, messages: list[dict[str, Any]]) -> str:
        """The assistant's reply text."""
        import openai

        transient = (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError,
                     openai.InternalServerError)
        for attempt in range(self.max_retries + 1):
            try:
                reply = self._client.chat.completions.create(
                    model=self.model, messages=messages, temperature=self.temperature)
                return reply.choices[0].message.content or ""
            except transient as error:
                if attempt == self.max_retries:
                    raise EndpointError(f"{self.base_url}: no answer after {attempt + 1} tries: "
                                        f"{error}", status=getattr(error, "status_code", None),
                                        transient=True) from None
                time.sleep(self.backoff_s * 2**attempt)
            except openai.APIError as error:
                raise EndpointError(f"{self.base_url}: {error}",
                                    status=getattr(error, "status_code", None)) from None
        raise AssertionError("unreachable")
