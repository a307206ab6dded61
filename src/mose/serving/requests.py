"""OpenAI chat requests as mose reads them: the messages in the model's chat template, and their images.

mose routes on the same prompt the engine will read: the request's messages with each
image part as the template's image placeholder, and the images decoded from their
`data:` URLs. Anything mose cannot read is a `RequestError` (HTTP 400) naming the
message and part.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError

ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A request mose cannot route: malformed, or an image that does not decode."""


@dataclass
class Chat:
    """One request's prompt as the model reads it, and its images in order."""

    text: str
    images: list[Image.Image] = field(default_factory=list)


def read_chat(body: Any, tokenizer: Any) -> Chat:
    """The request body's messages → the chat-formatted prompt and its images, or a RequestError."""
    if not isinstance(body, Mapping):
        raise RequestError("the body must be a JSON object with 'messages'")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content}")
    images: list[Image.Image] = []
    converted = [_message(m, i, images) for i, m in enumerate(messages)]
    if converted[-1]["role"] != "user":
        raise RequestError(f"messages[{len(messages) - 1}]: the last message must be the user's "
                           "(the answer continues it)")
    text = tokenizer.apply_chat_template(converted, add_generation_prompt=True, tokenize=False)
    return Chat(text, images)


def _message(message: Any, index: int, images: list[Image.Image]) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping) or message.get("role") not in ROLES:
        raise RequestError(f"{where}: needs 'role' ({', '.join(ROLES)}) and 'content'")
    content = message.get("content")
    if isinstance(content, str):
        return {"role": message["role"], "content": content}
    if not isinstance(content, list):
        raise RequestError(f"{where}.content: a string or a list of text and image_url parts")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            images.append(decode_image(part.get("image_url"), f"{where}.content[{j}]"))
            parts.append({"type": "image"})
        else:
            raise RequestError(f"{where}.content[{j}]: a part is {{type: text, text}} or "
                               "{type: image_url, image_url: {url}}")
    return {"role": message["role"], "content": parts}


def decode_image(image_url: Any, where: str) -> Image.Image:
    """An image from a base64 `data:` URL (mose routes on the image itself, so it must travel
    in the request), or a RequestError."""
    url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
    if not isinstance(url, str) or not url.startswith("data:"):
        raise RequestError(f"{where}: images must come as data: URLs (data:image/png;base64,...); "
                           "mose routes on the image before the engine sees it")
    header, _, payload = url.partition(",")
    if ";base64" not in header:
        raise RequestError(f"{where}: the data: URL is not base64")
    try:
        with Image.open(io.BytesIO(base64.b64decode(payload, validate=True))) as image:
            return image.convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError) as error:
        raise RequestError(f"{where}: the image does not decode ({type(error).__name__}: {error})") from None


def image_data_url(image: Image.Image) -> str:
    """A PNG data: URL of an image (what a client sends)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
