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
    # mose_question's: the training and test splits labelled by the question rules (a record
    # holds one label, so each taxonomy has its own files)
    labelled_question: Path | None = None
    test_question: Path | None = None
    curriculum: tuple[Path, ...] = ()  # the pretraining records of each curriculum stage's kinds

    def test_for(self, question_skills: bool) -> Path:
        """The test split a method answers and is scored on: labelled with its own taxonomy."""
        return self.test_question if question_skills and self.test_question else self.test


@dataclass(frozen=True)
class Annotation:
    rules: str  # the rule set used
    samples: int
    agreement: float | None  # fraction of levels where the rules agree with the records' own skills
    taxonomy: str | None = None  # the rules' taxonomy, where it is not the records' own
    test_samples: int | None = None  # test records labelled too (mose_question's test routing)


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


def curriculum_files(pretrain: Path, stages: int) -> tuple[Path, ...]:
    """Where `write_curriculum` puts each stage's records: beside the pretraining file, whose
    images they share."""
    return tuple(pretrain.with_name(f"curriculum-{i}.jsonl") for i in range(1, stages + 1))


def write_curriculum(pretrain: Path, paths: tuple[Path, ...], kinds: list[list[str]]) -> None:
    """Each stage's records: the pretraining file's of its kinds (a file already there is kept)."""
    samples = list(read_jsonl(pretrain))
    for path, wanted in zip(paths, kinds, strict=True):
        if not path.is_file():
            write_jsonl(path, [s for s in samples if s.meta.get("question_kind") in wanted])


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
    labelled = _labelled(samples, out, RuleAnnotator.load(rules))
    return Annotation(rules, len(labelled), _agreement(labelled, samples))


def annotate_questions(data: StudyData, rules: str, taxonomy: str) -> Annotation:
    """Label the training and test splits with question rules (`mose_question`'s labels).

    Their skills belong to another taxonomy than the records' own, so they are not compared.
    """
    annotator = RuleAnnotator.load(rules, taxonomy=taxonomy)
    train = _labelled(list(read_jsonl(data.train)), data.labelled_question, annotator)
    test = _labelled(list(read_jsonl(data.test)), data.test_question, annotator)
    return Annotation(rules, len(train), None, taxonomy=taxonomy, test_samples=len(test))


def _labelled(samples: list[Sample], out: Path, annotator: RuleAnnotator) -> list[Sample]:
    """The samples labelled by the rules alone (their own skills dropped first), written to `out`;
    `out`'s records if an earlier run of the study wrote it."""
    if out.is_file():
        return list(read_jsonl(out))
    labelled, _ = annotator.annotate([replace(s, skills=None) for s in samples])
    write_jsonl(out, labelled)
    return labelled


def _agreement(labelled: list[Sample], truth: list[Sample]) -> float | None:
    pairs = [(a.skills[level], t.skills.get(level)) for a, t in zip(labelled, truth, strict=True)
             if t.skills for level in a.skills]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else None
