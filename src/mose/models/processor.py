"""Saving and loading a model's processor without torchvision.

Qwen2-VL's processor insists on a video processor, which needs torchvision,
and `processor.save_pretrained` fails without one. A processor is therefore
saved as its parts (tokenizer with its chat template, image processor) and
rebuilt from them; a real checkpoint's directory loads the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor

IMAGE_PROCESSOR_FILE = "preprocessor_config.json"


class ImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without a video processor (that one needs torchvision)."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> None:
        if argument_name == "video_processor" and argument is None:
            return
        super().check_argument_for_proper_class(argument_name, argument)


def save_processor(processor: Any, path: str | Path) -> None:
    """Write the tokenizer (with its chat template) and, for a VL model, the image processor."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.chat_template is None and getattr(processor, "chat_template", None):
        tokenizer.chat_template = processor.chat_template
    tokenizer.save_pretrained(path)
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None:
        image_processor.save_pretrained(path)


def load_processor(path: str | Path) -> Any:
    """The processor of a saved or downloaded model directory: an image-only Qwen2-VL
    processor when the directory has an image processor, else the tokenizer."""
    path = Path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: no loadable tokenizer ({error})") from None
    if tokenizer.chat_template is None:
        tokenizer.chat_template = _processor_chat_template(path)
    if not (path / IMAGE_PROCESSOR_FILE).is_file():
        return tokenizer
    # Falls back to the PIL image processor even where the config names the fast one.
    image_processor = AutoImageProcessor.from_pretrained(path)
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                              video_processor=None, chat_template=tokenizer.chat_template)


def _processor_chat_template(path: Path) -> str | None:
    """Real Qwen2-VL checkpoints keep the chat template beside the processor, not the tokenizer."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    legacy = path / "chat_template.json"
    if legacy.is_file():
        return json.loads(legacy.read_text()).get("chat_template")
    return None
