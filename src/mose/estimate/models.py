"""The model a recipe's stages see, built on the meta device: exact parameter counts, no memory.

A recipe's `model` is `tiny:KIND`, a Hub id of a published shape (`mose.models.shapes`,
written offline), or a local directory (its config.json; converted mose models too).
Stages are walked in order: `convert` converts the meta model as `mose train` would,
so every later stage counts the parameters it will really hold and train.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mose.arch import arch_of
from mose.layers import ExpertBlock, MoSEBlock, expert_blocks
from mose.models.loading import TINY_PREFIX
from mose.models.shapes import SHAPES, shape_model
from mose.models.tiny import tiny_image_processor, tiny_model

META = torch.device("meta")
QWEN_MAX_PIXELS = 12845056  # Qwen2-VL's image processor default: 16,384 image tokens per image


def meta_model(spec: str) -> tuple[nn.Module, int]:
    """(the model on the meta device, the image processor's max_pixels) for a recipe's `model`."""
    if spec.startswith(TINY_PREFIX):
        with META:
            model, _ = tiny_model(spec.removeprefix(TINY_PREFIX))
        return model, tiny_image_processor().size["longest_edge"]
    if spec in SHAPES:
        model, processor = shape_model(spec, device=META)
        return model, QWEN_MAX_PIXELS
    path = Path(spec)
    if (path / "config.json").is_file():
        return _from_directory(path), _saved_max_pixels(path)
    known = ", ".join(sorted(SHAPES))
    raise ValueError(f"model {spec!r}: no shape known offline; give a local model directory "
                     f"or one of {known}")


def _from_directory(path: Path) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    import mose.modeling  # noqa: F401  (registers the converted mose_ model types)

    config = AutoConfig.from_pretrained(path)
    auto = AutoModelForCausalLM if not hasattr(config, "vision_config") else AutoModelForImageTextToText
    with META:
        return auto.from_config(config).eval()


def _saved_max_pixels(path: Path) -> int:
    for name in ("preprocessor_config.json", "image_processor_config.json"):
        file = path / name
        if file.is_file():
            data = json.loads(file.read_text())
            size = data.get("size") or {}
            return int(data.get("max_pixels") or size.get("longest_edge") or QWEN_MAX_PIXELS)
    return QWEN_MAX_PIXELS


@dataclass(frozen=True)
class ModelFacts:
    """The numbers activation memory depends on, read from a (meta) model."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    merge: int  # spatial merge: image tokens = patches / merge²
    patch: int
    blocks: dict[int, tuple[int, bool]]  # MoSE / token-MoE layer → (routed experts per token, shared?)


def model_facts(model: nn.Module) -> ModelFacts:
    arch = arch_of(model)
    text = arch.text_config(model.config)
    vision = getattr(model.config, "vision_config", None)
    layers = arch.layers(model)
    blocks = {i: _block_facts(layer.mlp) for i, layer in enumerate(layers)
              if isinstance(layer.mlp, ExpertBlock)}
    return ModelFacts(layers=len(layers), hidden=text.hidden_size, intermediate=text.intermediate_size,
                      heads=text.num_attention_heads, kv_heads=text.num_key_value_heads,
                      vocab=text.vocab_size, merge=getattr(vision, "spatial_merge_size", 1),
                      patch=getattr(vision, "patch_size", 1), blocks=blocks)


def _block_facts(block: ExpertBlock) -> tuple[int, bool]:
    """(FFN-wide computations a token's routed experts make, whether a shared one runs beside)."""
    if block.base is not None:  # LoRA experts: one FFN, its deltas folded in at low rank
        return 1, False
    # A MoSE block with modality groups sends each token to one expert of its group per chosen skill.
    return block.top_k, block.shared_expert is not None


def count(modules: list[nn.Module]) -> int:
    """Parameters of the modules, each tensor once (tied embeddings count once)."""
    seen = {id(p): p.numel() for m in modules for p in m.parameters()}
    return sum(seen.values())


def active_params(model: nn.Module) -> int:
    """What one token uses: everything but the routed experts it is not sent to."""
    total = count([model])
    for block in expert_blocks(model):
        per_expert = count([block.experts]) // block.experts.num_experts
        total -= (block.experts.num_experts - block.top_k) * per_expert
    return total


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def mose_blocks(model: nn.Module) -> list[MoSEBlock]:
    return [b for b in expert_blocks(model) if isinstance(b, MoSEBlock)]
