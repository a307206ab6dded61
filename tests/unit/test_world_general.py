"""The worlds' general kinds (pretraining data): off by default, canonical, never a benchmark question."""

import random
import re

import pytest

from mose.data import read_jsonl
from mose.data.world import DOMAINS, general_weights, generate
from mose.data.world.driving import (
    COLOR_NAMES,
    GENERAL_KINDS,
    PHRASES,
    QUESTION_KINDS,
    Thing,
    describe,
    place,
)
from mose.data.world.robot import NONE, Scene, _general
from mose.data.world.robot import PHRASES as ROBOT_PHRASES
from mose.data.world.robot import Thing as RobotThing
from mose.skills.rules import RuleAnnotator


@pytest.mark.parametrize("domain", ["driving", "robot"])
def test_general_kinds_are_off_by_default_and_alone_with_general_weights(tmp_path, domain):
    module = DOMAINS[domain]
    default = list(read_jsonl(generate(domain, 300, seed=3, out=tmp_path / "d")))
    assert {s.meta["question_kind"] for s in default} <= set(module.QUESTION_KINDS)
    general = list(read_jsonl(generate(domain, 300, seed=3, out=tmp_path / "g",
                                       weights=general_weights(domain))))
    kinds = {s.meta["question_kind"] for s in general}
    assert kinds == set(module.GENERAL_KINDS)
    assert {s.task for s in general} <= {"description", "general_vqa"}
    # No general question is one of the benchmark's: not one question text in common.
    assert not {s.question for s in general} & {s.question for s in default}
    # The shipped rules label general questions as the world does.
    labelled, _ = RuleAnnotator.load(f"world-{domain}").annotate(general)
    assert [s.skills for s in labelled] == [s.skills for s in general]


def test_switching_general_kinds_off_explicitly_draws_the_default_set(tmp_path):
    off = dict.fromkeys(GENERAL_KINDS, 0)
    texts = [generate("driving", 50, seed=5, out=out, weights=w).read_text()
             for out, w in ((tmp_path / "a", {}), (tmp_path / "b", off))]
    assert texts[0] == texts[1]
    with pytest.raises(ValueError, match="nothing to ask"):
        generate("driving", 5, seed=5, out=tmp_path / "c", weights=dict.fromkeys(QUESTION_KINDS, 0))


def test_driving_general_answers_are_canonical(tmp_path):
    weights = general_weights("driving")
    samples = list(read_jsonl(generate("driving", 400, seed=7, out=tmp_path, weights=weights)))
    for s in samples:
        kind = s.meta["question_kind"]
        if kind == "describe":
            assert s.meta["category"] in s.answer and s.meta["motion"] in s.answer
        elif kind in ("locate", "locate_box"):
            assert s.answer.split(", ")[1] in ("near", "far") and s.answer.startswith(("in the", "on the"))
        elif kind == "exists":
            assert s.answer in ("yes", "no")
        elif kind == "count":
            assert s.answer in ("1", "2", "3")
        elif kind == "repeat":
            assert s.answer in PHRASES and s.question == f"Repeat after me: {s.answer}"
        else:
            assert s.answer in COLOR_NAMES.values()
        assert ("box" in s.meta) == (kind in ("locate_box", "color_box"))


def test_robot_general_questions_are_multiple_choice_but_describe(tmp_path):
    samples = list(read_jsonl(generate("robot", 300, seed=2, out=tmp_path, weights=general_weights("robot"))))
    for s in samples:
        kind = s.meta["question_kind"]
        if kind == "describe":
            assert s.choices is None and "the target is at the" in s.answer
            continue
        assert s.choices[s.correct] == s.answer and len(set(s.choices)) == len(s.choices)
        if kind == "choose":
            assert s.question == f"Pick the option: {s.answer}" and s.answer in ROBOT_PHRASES
        if kind == "which":  # the one object in that quadrant, or none there
            where = s.question.removeprefix("Which object is at the ").removesuffix(" of the table?")
            there = [name for name, quadrant in s.meta["where"].items() if quadrant == where]
            assert s.answer == (there[0] if there else NONE)
        if kind == "gripper_state":
            assert s.answer == ("open" if s.meta["gripper_open"] else "closed")
        if kind in ("gripper_where", "target_where"):
            assert s.answer == s.meta[kind]
        if kind == "arrow_way":
            assert s.answer in ("left", "right", "up", "down")
        if kind == "under_gripper":
            assert s.answer == (s.meta["under_gripper"] or "nothing")
        sizes = {"which": 5, "choose": 5, "under_gripper": 5, "gripper_state": 2, "relative": 2}
        assert len(s.choices) == sizes.get(kind, 4)
    # Every letter is an answer some of the time: a general model has said each before the benchmark.
    assert {s.correct for s in samples if s.choices} == set(range(5))


def test_robot_relations_read_the_positions_and_skip_shared_spots():
    # Cube top left, ball top right under the gripper, target bottom left.
    scene = Scene([RobotThing("cube", "red", 14, 14), RobotThing("ball", "blue", 98, 14)], gripper=(98, 14),
                  gripper_open=True, target=(14, 98))
    truth = {("the red cube", "the blue ball"): ("left", None),
             ("the red cube", "the gripper"): ("left", None),
             ("the red cube", "the green target"): (None, "above"),
             ("the blue ball", "the green target"): ("right", "above"),
             ("the gripper", "the green target"): ("right", "above")}
    truth |= {(b, a): ({"left": "right", "right": "left"}.get(x), {"above": "below"}.get(y))
              for (a, b), (x, y) in truth.items()}
    asked = set()
    for seed in range(200):
        question, answer, options = _general(random.Random(seed), scene, "relative")
        a, b = re.fullmatch(r"Is (.+?) (?:to the left or to the right of|above or below) (.+)\?",
                            question).groups()
        horizontal, vertical = truth[a, b]  # the ball and the gripper share a spot: never paired
        assert answer == (horizontal if "left or" in question else vertical) and answer in options
        asked.add((a, b, "left or" in question))
    assert len(asked) == 14  # both orders of every pair, both axes where both differ


def test_a_question_that_names_the_key_objects_lane_means_only_it(tmp_path):
    samples = list(read_jsonl(generate("driving", 400, seed=9, out=tmp_path)))
    for s in (s for s in samples if s.meta["question_kind"] in ("identify", "motion", "enter_lane")):
        assert s.meta["lane"] in s.question
    # The background traffic never shares the key object's lane: the description lists one object there.
    described = list(read_jsonl(generate("driving", 200, seed=9, out=tmp_path / "g",
                                         weights={"describe": 1.0, **dict.fromkeys(QUESTION_KINDS, 0)})))
    for s in described:
        lane = s.meta["lane"]
        assert s.answer.count(f" {lane},") == 1, s.answer


def test_descriptions_list_objects_nearest_first():
    far = Thing("car", "left lane", 20.0, "oncoming")
    near = Thing("cyclist", "right sidewalk", 80.0, "crossing")
    light = Thing("traffic light", "left sidewalk", 30.0, "stationary", light="red")
    assert describe([far, near]) == ("a cyclist on the right sidewalk, near, crossing; "
                                     "a car in the left lane, far, oncoming.")
    assert describe([light]) == "a red traffic light on the left sidewalk, far, stationary."
    assert place(near) == "on the right sidewalk, near"
