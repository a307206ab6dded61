"""Offline tiny models: random-weight Qwen2-VL / Qwen2.5-VL / Qwen2 and a small tokenizer.

Nothing here touches the network. The tokenizer is a byte-level BPE trained with
`tokenizers` on a small built-in corpus (so any text still encodes), carries the
Qwen special tokens and a Qwen-style chat template; images go through the PIL
image processor because torchvision cannot be installed beside the CPU torch.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from mose.models.processor import ImageOnlyProcessor

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
VOCAB_SIZE = 640  # small on purpose: the LM head dominates a step at Qwen's 150k

# Content is a string or a list of {"type": "image"} / {"type": "text", "text": ...}
# parts, as Qwen2-VL's processor expects; a generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = {
    "objects": "car truck bus bicycle cyclist pedestrian child dog cone barrier sign light "
    "cup bowl block cube ball bottle drawer gripper table target box red green blue yellow",
    "verbs": "is moves crosses turns stops waits yields brakes slows accelerates keeps changes "
    "picks places pushes opens closes grasps releases reaches lifts",
    "places": "left right ahead behind front lane ego road sidewalk crosswalk intersection "
    "top bottom near far center inside outside on under",
    "question": "system user assistant what where which will should the a an of in to and "
    "or describe explain why how does do object scene vehicle robot arm next action answer option choose",
}


def _corpus() -> list[str]:
    """A deterministic corpus covering the vocabulary of embodied questions."""
    groups = [words.split() for words in _WORDS.values()]
    lines = [" ".join(words) for words in groups]
    for a, b, c in itertools.product(*(g[:8] for g in groups[:3])):
        lines.append(f"the {a} {b} {c}.")
    lines += [f"Answer: {i}. Option {chr(65 + i % 5)}" for i in range(100)]
    return lines


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen's special tokens and chat template, trained offline."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def tiny_image_processor() -> Qwen2VLImageProcessorPil:
    # 56x56 → 4 image tokens, 112x112 → 16; cap at 16x16 patches so tests stay small.
    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=224 * 224)


def tiny_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> ImageOnlyProcessor:
    tokenizer = tokenizer or tiny_tokenizer()
    return ImageOnlyProcessor(
        image_processor=tiny_image_processor(),
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=CHAT_TEMPLATE,
    )


def _text_config(tokenizer: PreTrainedTokenizerFast, **overrides: Any) -> dict[str, Any]:
    head_dim = 32
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=6,  # even layers 0, 2, 4: one MoSE layer per level
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        # mrope sections must sum to head_dim / 2; the default [16, 24, 24] is for 128. Qwen2-VL gives
        # an image's width the lowest rotary frequencies: at theta 1e4 one column of a tiny image turns
        # them by under 0.004 rad, so left and right look alike; at theta 10, by 0.12-0.24 rad.
        rope_parameters={"rope_type": "default", "rope_theta": 10.0,
                         "mrope_section": [4, 6, 6]},
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.update(overrides)
    if config["hidden_size"] // config["num_attention_heads"] != head_dim:
        raise ValueError("tiny models keep head_dim 32 (their mrope sections): "
                         "scale num_attention_heads with hidden_size")
    return config


def _vision_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _qwen2_vl(tokenizer, **text):
    text = _text_config(tokenizer, **text)
    # The vision tower's output width is the language model's width. At width 32 the procedural
    # world's objects were hard to tell apart after pretraining; 64 reads them (docs/calibration.md, driving).
    vision = dict(depth=2, embed_dim=64, hidden_size=text["hidden_size"], num_heads=2, mlp_ratio=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision,
                           **_vision_ids(tokenizer))
    return Qwen2VLForConditionalGeneration(config)


def _qwen2_5_vl(tokenizer, **text):
    text = _text_config(tokenizer, **text)
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2,
                  out_hidden_size=text["hidden_size"], fullatt_block_indexes=[1], window_size=56)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision,
                              **_vision_ids(tokenizer))
    return Qwen2_5_VLForConditionalGeneration(config)


def _qwen2(tokenizer, **text):
    config = _text_config(tokenizer, **text)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}  # text only: no image grid
    return Qwen2ForCausalLM(Qwen2Config(**config))


_BUILDERS = {"qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "qwen2": _qwen2}
TINY_KINDS = tuple(_BUILDERS)


def tiny_model(kind: str = "qwen2_vl", seed: int = 0, **text_config: Any):
    """Build a random-weight tiny model and its processor, offline and deterministic.

    Args:
        kind: "qwen2_vl", "qwen2_5_vl" or "qwen2" (text only; the processor is then
            the tokenizer).
        seed: the weights are a function of the seed alone.
        **text_config: overrides of the language model's config (hidden_size, ...).

    Returns:
        (model, processor), the model in eval mode and fp32.
    """
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(TINY_KINDS)}")
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _BUILDERS[kind](tokenizer, **text_config)
    model.eval()
    processor = tokenizer if kind == "qwen2" else tiny_processor(tokenizer)
    return model, processor
