"""transformers' activation checkpointing by the name the installed version gives it.

transformers renamed `gradient_checkpointing_enable` / `_disable` to
`activation_checkpointing_enable` / `_disable` (the old names stay as deprecated
aliases) after 5.19, the last version vLLM 0.32 admits. mose supports both, so these
call whichever the installed version has as its own.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

RENAMED = hasattr(PreTrainedModel, "activation_checkpointing_enable")


def enable_checkpointing(model: Any, kwargs: dict | None = None) -> None:
    """Checkpoint every decoder layer; `kwargs` go to `torch.utils.checkpoint.checkpoint`."""
    if RENAMED:
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(kwargs)


def disable_checkpointing(model: Any) -> None:
    if RENAMED:
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
