"""The `driving-question` taxonomy and the `world-driving-question` rules: skills the question fixes."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import pytest

import mose
from mose.data import Sample, read_jsonl
from mose.data.loaders.coda_lm import QUESTIONS
from mose.data.world import general_weights, generate
from mose.eval.predictions import Prediction
from mose.eval.score.common import Pair
from mose.eval.score.world import level_of
from mose.skills.rules import RuleAnnotator

LEVELS = ("perception", "prediction", "planning")
# world question kind → (perception, prediction, planning)
BENCHMARK = {
    "region": ("region", "general", "general"),
    "identify": ("lane", "general", "general"),
    "motion": ("named_object", "motion", "general"),
    "enter_lane": ("named_object", "lane_entry", "general"),
    "plan": ("full_image", "relevance", "ego_action"),
}
GENERAL_KINDS = {
    "describe": ("full_image", "general", "general"), "count": ("full_image", "general", "general"),
    "locate": ("named_object", "general", "general"), "exists": ("named_object", "general", "general"),
    "locate_box": ("region", "general", "general"), "color_box": ("region", "general", "general"),
    "color_lane": ("lane", "general", "general"), "repeat": ("general", "general", "general"),
}


@pytest.fixture(scope="module")
def rules():
    return RuleAnnotator.load("world-driving-question")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return list(read_jsonl(generate("driving", n=200, seed=0, out=tmp_path_factory.mktemp("driving"))))


def chain(skills):
    return tuple(skills[level] for level in LEVELS)


def test_the_taxonomy_loads_with_the_paper_levels_and_general_everywhere():
    taxonomy = mose.load_taxonomy("driving-question")
    assert taxonomy.name == "driving-question" and taxonomy.level_names == LEVELS
    assert all(level.skills[0] == "general" for level in taxonomy.levels)
    assert {level.name: level.skills for level in taxonomy.levels} == {
        "perception": ("general", "full_image", "region", "lane", "named_object"),
        "prediction": ("general", "motion", "lane_entry", "relevance"),
        "planning": ("general", "ego_action")}
    assert all(all(level.descriptions) for level in taxonomy.levels)
    assert mose.MoSEConfig(taxonomy="driving-question").taxonomy == taxonomy


def test_the_rules_read_only_the_question_and_its_task(rules):
    assert rules.taxonomy.name == "driving-question"
    assert all(rule.map_field is None for rule in rules.rules)
    assert {c.path for rule in rules.rules for c in rule.conditions} == {"question", "task"}


def test_every_world_record_gets_its_question_kinds_chain(rules, world):
    labelled, coverage = rules.annotate(world)
    assert coverage.total == len(world) and not coverage.undecided
    kinds = {s.meta["question_kind"] for s in world}
    assert kinds == set(BENCHMARK)  # the sample holds every benchmark kind
    for record in labelled:
        assert chain(record.skills) == BENCHMARK[record.meta["question_kind"]], record.question
        rules.taxonomy.encode(record.skills)
    # The kinds' chains all differ: a router that picks them tells the questions apart.
    assert len(set(BENCHMARK.values())) == len(BENCHMARK)


def test_a_label_never_depends_on_the_scene(rules, world):
    by_question = defaultdict(set)
    for record in world:
        by_question[record.question].add(chain(rules.label(record)[0]))
    assert all(len(chains) == 1 for chains in by_question.values())
    assert len(by_question) > len(BENCHMARK)  # many scenes share a question text
    # Another scene, answer and key object behind the same question: the same label.
    for record in world[:40]:
        other = replace(record, answer="stop", images=["elsewhere.png"], skills=None,
                        meta={"domain": "driving", "category": "debris", "motion": "crossing"})
        assert rules.label(other)[0] == rules.label(record)[0]


def test_the_general_kinds_are_labelled_too(rules, tmp_path):
    samples = list(read_jsonl(generate("driving", n=120, seed=1, out=tmp_path,
                                       weights=general_weights("driving"))))
    labelled, coverage = rules.annotate(samples)
    assert not coverage.undecided  # "repeat after me" is decided: general, by its own rule
    for record in labelled:
        assert chain(record.skills) == GENERAL_KINDS[record.meta["question_kind"]], record.question


def test_a_question_belongs_to_the_same_level_under_both_taxonomies(rules, world):
    """The world scorer groups questions by the deepest non-general level of their label, so
    mose_question (scored against question labels) and the other methods share `by_level`."""
    answer = Prediction("x", "a")
    for record, question in zip(world, rules.annotate(world)[0], strict=True):
        assert level_of(Pair(record, answer)) == level_of(Pair(question, answer))


@pytest.mark.parametrize("task, expected", [
    ("general_perception", ("full_image", "general", "general")),
    ("region_perception", ("region", "general", "general")),
    ("driving_suggestion", ("full_image", "relevance", "ego_action")),
])
def test_coda_lm_tasks(rules, task, expected):
    record = Sample(id=f"coda/x/{task}", images=[], question=QUESTIONS[task], task=task,
                    meta={"source": "coda-lm"})
    assert chain(rules.label(record)[0]) == expected


@pytest.mark.parametrize("question, expected", [
    ("Is there a pedestrian crossing ahead?", "named_object"),
    ("What is in the region <c1,CAM_FRONT,714.2,523.3>?", "region"),
    ("How many objects are there besides the ego vehicle?", "full_image"),  # the ego car is no target
    ("What object is in the right sidewalk near the ego car?", "lane"),
])
def test_perception_wordings(rules, question, expected):
    record = Sample(id="q", images=[], question=question, task="general_vqa")
    assert rules.label(record)[0]["perception"] == expected
