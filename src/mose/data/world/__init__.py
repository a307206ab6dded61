"""The procedural embodied world: seeded image + question + answer samples, rendered
with PIL, in two domains (`driving`, `robot`), each sample carrying its
ground-truth skill per level.

    mose world generate --domain driving --n 2000 --seed 0 --out runs/world

writes `runs/world/train.jsonl` and its images under `runs/world/images/`.

Each domain asks its benchmark's question kinds (`QUESTION_KINDS`, on by
default) and general kinds (`GENERAL_KINDS`: describing, locating, counting;
off by default), the generic visual question answering a general VLM is
pretrained on before it meets the benchmark (`general_weights`, `--general`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from rich.progress import track

from mose.data.schema import Sample, write_jsonl
from mose.data.world import driving, robot
from mose.data.world.common import sample_rng

DOMAINS = {"driving": driving, "robot": robot}


def _domain(domain: str):
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    return DOMAINS[domain]


def weight_keys(domain: str) -> list[str]:
    """What `weights` may name: question kinds (benchmark and general), and in driving object categories."""
    module = _domain(domain)
    return [*module.QUESTION_KINDS, *module.GENERAL_KINDS, *getattr(module, "CATEGORIES", {})]


def general_weights(domain: str) -> dict[str, float]:
    """Weights that draw the general kinds only: data to pretrain a general model on."""
    module = _domain(domain)
    return dict.fromkeys(module.QUESTION_KINDS, 0.0) | dict.fromkeys(module.GENERAL_KINDS, 1.0)


def generate(domain: str, n: int, seed: int, out: str | Path, split: str = "train",
             weights: Mapping[str, float] | None = None, progress: bool = False) -> Path:
    """Write `n` samples of a domain to OUT/SPLIT.jsonl and OUT/images/.

    Args:
        weights: relative frequencies of question kinds (and, in driving, object
            categories); unnamed benchmark kinds and categories weigh 1, general kinds 0.
            A small weight makes a skill rare.
        split: salts the per-sample seeds, so train and test never share a scene.
    Returns:
        the JSONL path.
    """
    module = _domain(domain)
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    weights = dict(weights or {})
    unknown = set(weights) - set(weight_keys(domain))
    if unknown:
        raise ValueError(f"unknown weight key(s) {sorted(unknown)} for {domain}; "
                         f"known: {', '.join(weight_keys(domain))}")
    if any(w < 0 for w in weights.values()):
        raise ValueError("weights must be >= 0")
    kinds = {**module.DEFAULT_WEIGHTS, **weights}
    if not any(kinds.get(kind, 1.0) for kind in (*module.QUESTION_KINDS, *module.GENERAL_KINDS)):
        raise ValueError("every question kind has weight 0: nothing to ask")
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)

    def samples():
        indices = range(n)
        for i in track(indices, description=f"{domain} {split}", disable=not progress):
            name = f"{split}_{i:06d}.png"
            sample, image = module.make_sample(sample_rng(seed, split, i), f"world/{domain}/{split}/{i}",
                                               f"images/{name}", kinds)
            image.save(images / name)
            yield sample

    path = out / f"{split}.jsonl"
    write_jsonl(path, samples())
    return path


def summary(samples: list[Sample]) -> dict[str, Counter]:
    """Counts of tasks and of skills per level: what a generated set holds."""
    counts: dict[str, Counter] = {"task": Counter(s.task for s in samples)}
    for sample in samples:
        for level, skill in (sample.skills or {}).items():
            counts.setdefault(level, Counter())[skill] += 1
    return counts
