"""The demo's data: three disjoint splits of the driving world and a rule-annotated subset."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from mose.data import Sample, read_jsonl, write_jsonl
from mose.data.world import generate
from mose.data.world.driving import QUESTION_KINDS
from mose.skills.rules import RuleAnnotator
from mose.skills.shipped import shipped_rules_for

# Pretraining sees only descriptions; fine-tuning and testing only the benchmark's questions.
DESCRIBE_ONLY = {kind: 0.0 for kind in QUESTION_KINDS} | {"describe": 1.0}
QUESTIONS_ONLY = {"describe": 0.0}


@dataclass(frozen=True)
class DemoData:
    pretrain: Path  # "Describe the scene." records (split "pretrain")
    train: Path  # question-answer records (split "train")
    labelled: Path  # a subset of train, skills from the shipped rules
    test: Path  # split "test": scenes neither training set has


@dataclass(frozen=True)
class Annotation:
    rules: str  # the shipped rule set used
    samples: int
    agreement: float  # fraction of levels where the rules agree with the world's ground truth


def make_data(out: Path, pretrain_n: int, train_n: int, test_n: int, seed: int) -> DemoData:
    """Generate what is missing (a JSONL that exists is complete: it is written atomically)."""
    data = DemoData(out / "pretrain" / "pretrain.jsonl", out / "qa" / "train.jsonl",
                    out / "qa" / "labelled.jsonl", out / "qa" / "test.jsonl")
    for path, n, split, weights in ((data.pretrain, pretrain_n, "pretrain", DESCRIBE_ONLY),
                                    (data.train, train_n, "train", QUESTIONS_ONLY),
                                    (data.test, test_n, "test", QUESTIONS_ONLY)):
        if not path.is_file():
            generate("driving", n, seed, path.parent, split, weights, progress=True)
    return data


def annotate_subset(train: Path, out: Path, size: int, seed: int) -> Annotation:
    """Rule-annotate `size` training records as a user would (`mose annotate --limit`).

    The world's own ground-truth skills are dropped first, so the labels the
    router learns from are the rules' alone; they are compared afterwards.
    """
    samples = list(read_jsonl(train))
    keep = sorted(random.Random(seed).sample(range(len(samples)), min(size, len(samples))))
    truth = [samples[i] for i in keep]
    rules = shipped_rules_for(truth)
    if rules is None:
        raise ValueError(f"{train}: no shipped rule set matches these records")
    labelled, _ = RuleAnnotator.load(rules).annotate([replace(s, skills=None) for s in truth])
    if not out.is_file():
        write_jsonl(out, labelled)
    return Annotation(rules, len(labelled), _agreement(labelled, truth))


def _agreement(labelled: list[Sample], truth: list[Sample]) -> float:
    pairs = [(a.skills[level], t.skills.get(level)) for a, t in zip(labelled, truth, strict=True)
             for level in a.skills]
    return sum(a == b for a, b in pairs) / max(1, len(pairs))
