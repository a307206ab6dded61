"""A study's data: the procedural world's three disjoint splits, and skill labels for a subset.

Each file is written atomically, so one that exists is complete and a rerun reuses it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from mose.data import Sample, read_jsonl, write_jsonl
from mose.data.world import general_weights, generate
from mose.skills.rules import RuleAnnotator
from mose.skills.shipped import shipped_rules_for


@dataclass(frozen=True)
class StudyData:
    train: Path  # question-answer records every method fine-tunes on
    test: Path
    pretrain: Path | None = None  # general questions about the same world (tiny models only)
    labelled: Path | None = None  # skill-labelled records for the routers


@dataclass(frozen=True)
class Annotation:
    rules: str  # the shipped rule set used
    samples: int
    agreement: float | None  # fraction of levels where the rules agree with the records' own skills


def make_world(out: Path, domain: str, pretrain_n: int, train_n: int, test_n: int, seed: int) -> StudyData:
    """Generate what is missing: general questions (pretraining), benchmark questions (train, test)."""
    data = StudyData(pretrain=out / "pretrain" / "pretrain.jsonl", train=out / "qa" / "train.jsonl",
                     test=out / "qa" / "test.jsonl")
    for path, n, split, weights in ((data.pretrain, pretrain_n, "pretrain", general_weights(domain)),
                                    (data.train, train_n, "train", {}), (data.test, test_n, "test", {})):
        if not path.is_file():
            generate(domain, n, seed, path.parent, split, weights, progress=True)
    return data


def annotate_subset(train: Path, out: Path, size: int | None, seed: int) -> Annotation:
    """Rule-annotate `size` training records (all when None) as a user would (`mose annotate --limit`).

    Skills the records carry (the world's ground truth) are dropped first, so the
    labels the routers learn from are the rules' alone; they are compared afterwards.
    """
    samples = list(read_jsonl(train))
    size = len(samples) if size is None else min(size, len(samples))
    keep = sorted(random.Random(seed).sample(range(len(samples)), size))
    chosen = [samples[i] for i in keep]
    rules = shipped_rules_for(chosen)
    if rules is None:
        raise ValueError(f"{train}: no shipped rule set matches these records; label them with "
                         "`mose annotate` and give the file as data.labelled")
    labelled, _ = RuleAnnotator.load(rules).annotate([replace(s, skills=None) for s in chosen])
    if not out.is_file():
        write_jsonl(out, labelled)
    return Annotation(rules, len(labelled), _agreement(labelled, chosen))


def _agreement(labelled: list[Sample], truth: list[Sample]) -> float | None:
    pairs = [(a.skills[level], t.skills.get(level)) for a, t in zip(labelled, truth, strict=True)
             if t.skills for level in a.skills]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None
