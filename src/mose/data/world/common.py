"""What both procedural domains share: seeded per-sample randomness, weighted picks,
multiple-choice assembly, drawing helpers."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence

from PIL import ImageDraw

IMAGE_SIZE = 112  # 112 × 112 → 16 image tokens after Qwen2-VL's 2 × 2 merge


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    """Independent randomness per sample: the split salts the seed, so train and
    test with the same --seed still draw disjoint streams."""
    digest = hashlib.sha256(f"{split}:{seed}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def weighted(rng: random.Random, options: Sequence[str], weights: Mapping[str, float]) -> str:
    return rng.choices(list(options), weights=[weights.get(o, 1.0) for o in options])[0]


def multiple_choice(rng: random.Random, correct: str, distractors: Sequence[str],
                    size: int) -> tuple[list[str], int]:
    """Shuffled choices holding the correct one; returns (choices, 0-based index)."""
    pool = [d for d in dict.fromkeys(distractors) if d != correct]
    rng.shuffle(pool)
    choices = [correct] + pool[: size - 1]
    rng.shuffle(choices)
    return choices, choices.index(correct)


def arrow(draw: ImageDraw.ImageDraw, x: float, y: float, dx: float, dy: float,
          color: str = "white", length: float = 12) -> None:
    """A heading arrow from (x, y) along (dx, dy)."""
    ex, ey = x + dx * length, y + dy * length
    draw.line([(x, y), (ex, ey)], fill=color, width=2)
    # Arrow head: two short strokes back from the tip.
    for side in (1, -1):
        hx = ex - dx * 4 + side * dy * 3
        hy = ey - dy * 4 - side * dx * 3
        draw.line([(ex, ey), (hx, hy)], fill=color, width=2)
