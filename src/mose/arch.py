"""Per-architecture facts: where the decoder layers are, which tokens are images.

This table is the only place that knows model types; everything else asks it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    LlamaForCausalLM,
    PretrainedConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2ForCausalLM,
    Qwen2VLForConditionalGeneration,
)


@dataclass(frozen=True)
class Arch:
    name: str  # the base model_type
    model_class: type[nn.Module]
    auto_class: type  # the transformers Auto class a user loads it with
    layers_path: str  # attribute path from the model to its decoder layers
    text_config_attr: str | None  # where the language model's config sits, if nested
    image_token_attrs: tuple[str, ...] = ()  # config attributes holding image/video token ids
    vision_path: str | None = None  # attribute path from the model to its vision tower

    def vision_tower(self, model: nn.Module) -> nn.Module | None:
        return _get(model, self.vision_path) if self.vision_path else None

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layers_path)

    def text_config(self, config: PretrainedConfig) -> PretrainedConfig:
        return getattr(config, self.text_config_attr) if self.text_config_attr else config

    def image_token_ids(self, config: PretrainedConfig) -> list[int]:
        return [getattr(config, attr) for attr in self.image_token_attrs]


def _get(module: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        module = getattr(module, name)
    return module


_VISION_TOKENS = ("image_token_id", "video_token_id")

ARCHS: dict[str, Arch] = {
    arch.name: arch
    for arch in (
        Arch("qwen2_vl", Qwen2VLForConditionalGeneration, AutoModelForImageTextToText,
             "model.language_model.layers", "text_config", _VISION_TOKENS, "model.visual"),
        Arch("qwen2_5_vl", Qwen2_5_VLForConditionalGeneration, AutoModelForImageTextToText,
             "model.language_model.layers", "text_config", _VISION_TOKENS, "model.visual"),
        Arch("qwen2", Qwen2ForCausalLM, AutoModelForCausalLM, "model.layers", None),
        Arch("llama", LlamaForCausalLM, AutoModelForCausalLM, "model.layers", None),
    )
}


def arch_of(model: nn.Module) -> Arch:
    """The table entry for a model, by its class; a clear error for anything else."""
    for arch in ARCHS.values():
        if isinstance(model, arch.model_class):
            return arch
    supported = ", ".join(a.model_class.__name__ for a in ARCHS.values())
    raise ValueError(f"unsupported architecture {type(model).__name__}; mose converts: {supported}")
