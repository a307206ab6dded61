"""Scoring the procedural world: per level, per skill, multiple choice, routing; by hand."""

import json

import pytest
from rich.console import Console

from mose.data import Sample, read_jsonl, write_jsonl
from mose.data.collate import target_text
from mose.data.world import generate
from mose.eval.score import score, table
from mose.eval.score.world import level_of

G = "general"


def chain(*skills, levels=("perception", "prediction", "planning")):
    return {lv: {"skill": s, "prob": 0.9} for lv, s in zip(levels, skills, strict=False)}


# (task, skills, answer, prediction, skill chain)
DRIVING = [
    ("region_perception", ("vehicle", G, G), "car", "Car.", chain("vehicle", G, G)),                # right
    ("perception", ("vru", G, G), "pedestrian", "cyclist", chain("vehicle", G, G)),                 # wrong
    ("prediction", ("vru", "crossing", G), "crossing", "crossing", chain("vru", "crossing", G)),    # right
    ("prediction", ("vehicle", "stationary", G), "no", "No", None),                                 # right
    ("planning", ("vru", "crossing", "yield"), "slow down and yield", " slow down  and YIELD!",
     chain("vru", "crossing", "stop")),                                                             # right
    ("planning", ("vehicle", "stationary", "steer_around"), "change lane", "stop",
     chain("vehicle", "stationary")),                                                               # wrong
]


def write_case(tmp_path, rows, levels=("perception", "prediction", "planning")):
    refs, preds = [], []
    for i, (task, skills, answer, prediction, skill_chain, *choice) in enumerate(rows):
        choices, correct = choice if choice else (None, None)
        refs.append(Sample(id=f"s{i}", images=[], question="q?", answer=answer, task=task, choices=choices,
                           correct=correct, skills=dict(zip(levels, skills, strict=True))))
        preds.append({"id": f"s{i}", "answer": prediction, "skill_chain": skill_chain})
    write_jsonl(tmp_path / "refs.jsonl", refs)
    (tmp_path / "pred.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    return tmp_path / "pred.jsonl", tmp_path / "refs.jsonl"


def test_driving_levels_skills_and_routing_by_hand(tmp_path):
    result = score("world", *write_case(tmp_path, DRIVING))
    assert result["overall"] == pytest.approx(100 * 4 / 6, abs=1e-3) and result["n"] == 6
    assert result["by_level"] == {"perception": {"accuracy": 50.0, "n": 2},  # the region question too
                                  "prediction": {"accuracy": 100.0, "n": 2},
                                  "planning": {"accuracy": 50.0, "n": 2}}
    assert result["by_skill"] == {
        "perception": {"vehicle": {"accuracy": 100.0, "n": 1}, "vru": {"accuracy": 0.0, "n": 1}},
        "prediction": {"crossing": {"accuracy": 100.0, "n": 1}, "stationary": {"accuracy": 100.0, "n": 1}},
        "planning": {"steer_around": {"accuracy": 0.0, "n": 1}, "yield": {"accuracy": 100.0, "n": 1}},
    }
    assert "multiple_choice" not in result
    # Five samples have a chain. perception: all but s1 agree; prediction: all; planning: s4 said
    # stop, s5 has no planning level; whole chain: s0 and s2.
    assert result["routing"] == {"n": 5, "by_level": {"perception": 80.0, "prediction": 100.0,
                                                      "planning": 60.0}, "chain": 40.0}
    console = Console(record=True, width=100)
    console.print(table("world", result))
    assert "routing: chain = label" in console.export_text()


ROBOT_LEVELS = ("perception", "interpretation", "planning")
YES_NO = ["Yes", "No", "Cannot be determined", "Not applicable"]
COLORS = ["red", "green", "blue", "yellow", "None of the above"]
ROBOT = [
    ("interpretation", ("gripper", "physics", G), "Yes", "A", None, YES_NO, 0),                    # right
    ("planning", ("spatial", "affordance", "grasp"), "blue", "Both A and C", None, COLORS, 2),      # unparsed
    ("perception", ("gripper", G, G), "No", "No", None, YES_NO, 1),                          # right, by text
    ("perception", ("object", G, G), "yellow", "The answer is D", None, COLORS, 3),                 # right
]


def test_robot_multiple_choice_by_hand(tmp_path):
    result = score("world", *write_case(tmp_path, ROBOT, ROBOT_LEVELS))
    assert result["overall"] == 75.0
    assert result["multiple_choice"] == {"accuracy": 75.0, "n": 4, "unparsed": 1}
    assert result["by_level"] == {"perception": {"accuracy": 100.0, "n": 2},
                                  "interpretation": {"accuracy": 100.0, "n": 1},
                                  "planning": {"accuracy": 0.0, "n": 1}}
    assert "routing" not in result  # no prediction carries a chain


def test_a_generated_world_answered_perfectly_scores_100(tmp_path):
    for domain in ("driving", "robot"):
        refs = generate(domain, n=24, seed=3, out=tmp_path / domain, split="test")
        samples = list(read_jsonl(refs))
        preds = tmp_path / f"{domain}.pred.jsonl"
        preds.write_text("".join(json.dumps({"id": s.id, "answer": target_text(s)}) + "\n" for s in samples))
        result = score("world", preds, refs)
        assert result["overall"] == 100.0 and result["n"] == 24
        for s in samples:  # the level is the task, and a region question is a perception one
            assert level_of_sample(s) == s.task.replace("region_perception", "perception")
    # The robot world is multiple choice, so the Robo2VLM scorer reads it too.
    result = score("robo2vlm", tmp_path / "robot.pred.jsonl", tmp_path / "robot" / "test.jsonl")
    assert (result["accuracy"], result["unparsed"]) == (100.0, 0) and "other" in result["by_group"]


def level_of_sample(sample):
    from mose.eval.predictions import Prediction
    from mose.eval.score.common import Pair

    return level_of(Pair(sample, Prediction(sample.id, "")))
