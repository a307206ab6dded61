"""The published shapes of Qwen2-VL-2B-Instruct and Qwen2.5-VL-3B-Instruct, built offline.

The values are those of the checkpoints' `config.json` on the Hugging Face Hub,
written here so that nothing is downloaded: a model of the real shape with random
weights is what the real-shape checks (`tests/integration/test_real_shape.py`,
`bench/real_shape.py`) and the memory estimator (`mose.estimate`) need. Inputs come
from the tiny tokenizer and the PIL image processor (`mose.models.tiny`): only the
embedding's vocabulary size is the published one, and the special-token ids are the
tiny tokenizer's, so the processor's image placeholders are the model's image tokens.

`layers` and `vision_depth` cut the decoder and the vision tower (same widths,
fewer blocks) where the full depth does not fit a test.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers import (
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from mose.models.tiny import _vision_ids, tiny_processor, tiny_tokenizer


@dataclass(frozen=True)
class VisionShape:
    depth: int
    width: int  # embed_dim (Qwen2-VL) / hidden_size (Qwen2.5-VL) of the ViT blocks
    heads: int
    mlp: int  # the blocks' MLP width (Qwen2-VL: mlp_ratio × width)
    patch: int = 14
    merge: int = 2  # spatial_merge_size: merge × merge patches become one language token
    temporal_patch: int = 2
    window_size: int | None = None  # Qwen2.5-VL: windowed attention except in fullatt blocks
    fullatt_blocks: tuple[int, ...] = ()
    tokens_per_second: int | None = None
    hidden_act: str = "quick_gelu"


@dataclass(frozen=True)
class Shape:
    """A checkpoint's architecture: the numbers of its config.json, nothing else."""

    hub_id: str
    kind: str  # the model_type: qwen2_vl or qwen2_5_vl
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool
    rope_theta: float
    rms_eps: float
    mrope_section: tuple[int, int, int]  # sums to head_dim / 2
    max_positions: int
    max_window_layers: int
    vision: VisionShape

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def trimmed(self, layers: int | None = None, vision_depth: int | None = None) -> Shape:
        """The same widths with fewer decoder layers and / or vision blocks."""
        for name, value, full in (("layers", layers, self.layers),
                                  ("vision_depth", vision_depth, self.vision.depth)):
            if value is not None and not 1 <= value <= full:
                raise ValueError(f"{self.hub_id}: {name} must be between 1 and {full}, got {value}")
        vision = self.vision
        if vision_depth is not None:
            vision = replace(vision, depth=vision_depth,
                             fullatt_blocks=tuple(i for i in vision.fullatt_blocks if i < vision_depth))
        return replace(self, layers=layers or self.layers, vision=vision)


QWEN2_VL_2B = Shape(
    hub_id="Qwen/Qwen2-VL-2B-Instruct", kind="qwen2_vl", layers=28, hidden=1536, intermediate=8960,
    heads=12, kv_heads=2, vocab=151936, tie_embeddings=True, rope_theta=1_000_000.0, rms_eps=1e-6,
    mrope_section=(16, 24, 24), max_positions=32768, max_window_layers=28,
    vision=VisionShape(depth=32, width=1280, heads=16, mlp=4 * 1280),
)
QWEN2_5_VL_3B = Shape(
    hub_id="Qwen/Qwen2.5-VL-3B-Instruct", kind="qwen2_5_vl", layers=36, hidden=2048, intermediate=11008,
    heads=16, kv_heads=2, vocab=151936, tie_embeddings=True, rope_theta=1_000_000.0, rms_eps=1e-6,
    mrope_section=(16, 24, 24), max_positions=128000, max_window_layers=70,
    vision=VisionShape(depth=32, width=1280, heads=16, mlp=3420, window_size=112,
                       fullatt_blocks=(7, 15, 23, 31), tokens_per_second=2, hidden_act="silu"),
)
# The base (non-instruct) checkpoints share their instruct twins' shapes.
SHAPES: dict[str, Shape] = {}
for _shape in (QWEN2_VL_2B, QWEN2_5_VL_3B):
    SHAPES[_shape.hub_id] = _shape
    SHAPES[_shape.hub_id.removesuffix("-Instruct")] = _shape
SHAPE_NAMES = {"2b": QWEN2_VL_2B.hub_id, "qwen2_vl_2b": QWEN2_VL_2B.hub_id,
               "3b": QWEN2_5_VL_3B.hub_id, "qwen2_5_vl_3b": QWEN2_5_VL_3B.hub_id}


def get_shape(name: str) -> Shape:
    """A shape by Hub id (`Qwen/Qwen2-VL-2B-Instruct`) or short name (`2b`, `3b`)."""
    key = SHAPE_NAMES.get(name, name)
    if key not in SHAPES:
        known = ", ".join(sorted(set(SHAPE_NAMES) | set(SHAPES)))
        raise ValueError(f"unknown model shape {name!r}; known: {known}")
    return SHAPES[key]


def shape_config(shape: Shape, tokenizer: PreTrainedTokenizerFast | None = None) -> PretrainedConfig:
    """The transformers config of `shape`; special-token ids from `tokenizer` (the tiny one)."""
    tokenizer = tokenizer or tiny_tokenizer()
    ids = _vision_ids(tokenizer)
    text: dict[str, Any] = dict(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, rms_norm_eps=shape.rms_eps, hidden_act="silu",
        max_position_embeddings=shape.max_positions, max_window_layers=shape.max_window_layers,
        rope_parameters={"rope_type": "default", "rope_theta": shape.rope_theta,
                         "mrope_section": list(shape.mrope_section)},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=shape.tie_embeddings,
    )
    v = shape.vision
    common = dict(depth=v.depth, num_heads=v.heads, patch_size=v.patch, spatial_merge_size=v.merge,
                  temporal_patch_size=v.temporal_patch, hidden_act=v.hidden_act)
    if shape.kind == "qwen2_vl":
        vision = dict(common, embed_dim=v.width, hidden_size=shape.hidden, mlp_ratio=v.mlp // v.width)
        return Qwen2VLConfig(text_config=text, vision_config=vision,
                             tie_word_embeddings=shape.tie_embeddings, **ids)
    vision = dict(common, hidden_size=v.width, intermediate_size=v.mlp, out_hidden_size=shape.hidden,
                  window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_blocks),
                  tokens_per_second=v.tokens_per_second)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                            tie_word_embeddings=shape.tie_embeddings, **ids)


_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}


def shape_model(name: str | Shape = "2b", layers: int | None = None, vision_depth: int | None = None,
                dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", seed: int = 0):
    """A random-weight model of a published shape and the tiny processor, offline.

    Args:
        name: a Shape, its Hub id, or `2b` / `3b`.
        layers, vision_depth: fewer decoder layers / vision blocks (same widths).
        dtype: the weights are created in it (bf16 by default: no fp32 copy of 2B weights).
        device: `meta` builds the module tree with no storage (parameter counts, estimates).
        seed: the weights are a function of the seed alone.

    Returns:
        (model, processor), the model in eval mode.
    """
    shape = name if isinstance(name, Shape) else get_shape(name)
    shape = shape.trimmed(layers, vision_depth)
    tokenizer = tiny_tokenizer()
    config = shape_config(shape, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = _CLASSES[shape.kind]._from_config(config, dtype=dtype)
    return model.eval(), tiny_processor(tokenizer)
