"""A study's data: the procedural world's three disjoint splits, and skill labels for a subset.

Each file is written atomically, so one that exists is complete and a rerun reuses it.
"""

from __future__ import annotations

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


def world_files(out: Path) -> StudyData:
    """Where `make_world` writes its splits."""
    return StudyData(pretrain=out / "pretrain" / "pretrain.jsonl", train=out / "qa" / "train.jsonl",
                     test=out / "qa" / "test.jsonl")


def make_world(out: Path, domain: str, pretrain_n: int, train_n: int, test_n: int, seed: int) -> StudyData:
    """Generate what is missing: general questions (pretraining), benchmark questions (train, test)."""
    data = world_files(out)
    for path, n, split, weights in ((data.pretrain, pretrain_n, "pretrain", general_weights(domain)),
                                    (data.train, train_n, "train", {}), (data.test, test_n, "test", {})):
        if not path.is_file():
            generate(domain, n, seed, path.parent, split, weights, progress=True)
    return data


def annotate_with_rules(train: Path, out: Path) -> Annotation:
    """Label every training record with the shipped rules that match it, as `mose annotate` would.

    Skills the records carry (the world's ground truth) are dropped first, so the labels
    the routers learn from are the rules' alone; they are compared afterwards. Each router
    stage then takes its own seeded subset (`labelled`), so a run's labels never depend on
    which other runs a study holds.
    """
    samples = list(read_jsonl(train))
    rules = shipped_rules_for(samples)
    if rules is None:
        raise ValueError(f"{train}: no shipped rule set matches these records; label them with "
                         "`mose annotate` and give the file as data.labelled")
    if out.is_file():  # labelled by an earlier run of the study: report on those labels
        labelled = list(read_jsonl(out))
    else:
        labelled, _ = RuleAnnotator.load(rules).annotate([replace(s, skills=None) for s in samples])
        write_jsonl(out, labelled)
    return Annotation(rules, len(labelled), _agreement(labelled, samples))


def _agreement(labelled: list[Sample], truth: list[Sample]) -> float | None:
    pairs = [(a.skills[level], t.skills.get(level)) for a, t in zip(labelled, truth, strict=True)
             if t.skills for level in a.skills]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None
