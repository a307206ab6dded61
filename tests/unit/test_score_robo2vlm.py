"""Robo2VLM scoring, the prediction file and id matching; expected scores computed by hand."""

import json

import pytest
from rich.console import Console

from mose.data import DataError, Sample, write_jsonl
from mose.eval.predictions import read_predictions
from mose.eval.score import ScoreError, score, table, write_scores
from mose.eval.score.robo2vlm import template_of

YES_NO = ["Yes", "No", "Cannot be determined", "Not applicable"]
FIVE = ["move left", "move right", "move forward", "move backward", "None of the above"]
# (question, choices, correct, predicted answer, right?)
ITEMS = [
    ("Is the robot's gripper open?", YES_NO, 1, "The answer is B", True),               # spatial
    ("Which object is CLOSEST to the robot's end effector?", FIVE, 0, "B.", False),    # spatial
    ("Has the robot successfully completed the task?", YES_NO, 1, "(b)", True),         # goal-conditioned
    ("Is the grasp of the cup stable?", YES_NO, 0, "Both A and C", False),     # interaction, unparsed
    ("The arrow shows the direction the robot will move next.", FIVE, 4, "E) None of the above", True),
    ("Which way should it move?", FIVE, 2, "A cup is on the left", False),               # other, unparsed
    ("Which way should it move now?", FIVE, 2, "move forward", True),                    # other, by text
]


def write_case(tmp_path, items=ITEMS, predictions=None):
    refs = [Sample(id=f"r{i}", images=[], question=q, answer=c[k], task="robo2vlm", choices=c, correct=k)
            for i, (q, c, k, _, _) in enumerate(items)]
    write_jsonl(tmp_path / "refs.jsonl", refs)
    predictions = predictions or [{"id": f"r{i}", "answer": a} for i, (*_, a, _) in enumerate(items)]
    write_lines(tmp_path / "pred.jsonl", predictions)
    return tmp_path / "pred.jsonl", tmp_path / "refs.jsonl"


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_accuracy_unparsed_and_groups_by_hand(tmp_path):
    result = score("robo2vlm", *write_case(tmp_path))
    # right: 0, 2, 4, 6 → 4 of 7; unparsed: "Both A and C", "A cup is on the left"
    assert result["accuracy"] == pytest.approx(100 * 4 / 7, abs=1e-3)
    assert (result["n"], result["unparsed"]) == (7, 2)
    assert result["by_group"] == {
        "spatial": {"accuracy": 50.0, "n": 2},
        "goal-conditioned": {"accuracy": 100.0, "n": 1},
        "interaction": {"accuracy": 50.0, "n": 2},
        "other": {"accuracy": 50.0, "n": 2},
    }
    assert result["by_template"]["gripper_state"] == {"accuracy": 100.0, "n": 1}
    text = _render(table("robo2vlm", result))
    assert "57.14" in text and "unparsed" in text


@pytest.mark.parametrize("question, template, group", [
    ("Is the robot's gripper open?", "gripper_state", "spatial"),
    ("Is there an obstacle blocking the robot from reaching the cup?", "reachability", "spatial"),
    ("Where is the mug relative to the robot's end effector?", "relative_position", "spatial"),
    ("Which object is FARTHEST from the camera?", "depth", "spatial"),
    ("A red dot is marked in the left image; which point in the right image matches it?", "multi_view",
     "spatial"),
    ("Has the robot successfully completed the task?", "task_success", "goal-conditioned"),
    ("Which configuration shows the goal state?", "goal_configuration", "goal-conditioned"),
    ("What is the NEXT action phase?", "next_phase", "goal-conditioned"),
    ("Which language instruction best describes the robot's trajectory?", "trajectory_description",
     "goal-conditioned"),
    ("Is the grasp of the bottle stable?", "grasp_stability", "interaction"),
    ("Which phase of the grasp action is shown?", "grasp_phase", "interaction"),
    ("What is the correct sequence of action phases?", "phase_sequence", "interaction"),
    ("The colored arrow shows the direction the robot will move next.", "motion_direction", "interaction"),
    ("What color is the cube?", "other", "other"),
])
def test_templates(question, template, group):
    assert template_of(question) == (template, group)


def test_scores_write_atomically(tmp_path):
    result = score("robo2vlm", *write_case(tmp_path))
    path = write_scores(tmp_path / "out" / "scores.json", result)
    assert json.loads(path.read_text()) == result
    assert [p.name for p in path.parent.iterdir()] == ["scores.json"]  # no temporary left


def test_ids_must_match_exactly(tmp_path):
    preds = [{"id": f"r{i}", "answer": "A"} for i in range(7)]
    with pytest.raises(ScoreError, match=r"1 prediction id\(s\) are not in .*'stray'"):
        score("robo2vlm", *write_case(tmp_path, predictions=[*preds, {"id": "stray", "answer": "A"}]))
    with pytest.raises(ScoreError, match=r"4 of 7 reference sample\(s\) .* no prediction, e.g. 'r3', 'r4', "
                                         r"'r5', \.\.\."):
        score("robo2vlm", *write_case(tmp_path, predictions=preds[:3]))


@pytest.mark.parametrize("line, where", [
    ('{"id": "a", "answer": "A"', "at line 2: malformed JSON"),
    ('{"id": "a", "answer": null}', "at line 2 \\(id 'a'\\), field 'answer'"),
    ('{"answer": "A"}', "at line 2, field 'id'"),
    ('{"id": "a", "answer": "A", "skill_chain": {"perception": {"skill": "vru", "prob": "high"}}}',
     "at line 2 \\(id 'a'\\), field 'skill_chain.perception.prob': expected a number"),
    ('{"id": "a", "answer": "A", "skill_chain": {"perception": "vru"}}',
     "at line 2 \\(id 'a'\\), field 'skill_chain.perception'"),
    ('{"id": "r0", "answer": "B"}', "at line 2, field 'id': duplicate id 'r0' \\(first at line 1\\)"),
    ('["r0", "B"]', "at line 2: expected a JSON object"),
])
def test_bad_prediction_lines_name_file_line_and_field(tmp_path, line, where):
    path = tmp_path / "pred.jsonl"
    path.write_text('{"id": "r0", "answer": "A", "skill_chain": null}\n' + line + "\n")
    with pytest.raises(DataError, match=f"pred.jsonl, record {where}"):
        read_predictions(path)


def test_predictions_keep_their_chain_and_ignore_extras(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        {"id": "a", "answer": "B", "latency_s": 0.1,
         "skill_chain": {"perception": {"skill": "gripper", "prob": 0.9}}},
        "", {"id": "b", "answer": ""}])
    preds = read_predictions(path)
    assert preds["a"].skills() == {"perception": "gripper"} and preds["b"].skill_chain is None


def test_records_without_choices_cannot_be_scored_as_multiple_choice(tmp_path):
    write_jsonl(tmp_path / "r.jsonl", [Sample(id="x", images=[], question="q", answer="stop")])
    write_lines(tmp_path / "p.jsonl", [{"id": "x", "answer": "A"}])
    with pytest.raises(ScoreError, match="reference 'x', field 'choices'/'correct'"):
        score("robo2vlm", tmp_path / "p.jsonl", tmp_path / "r.jsonl")
    with pytest.raises(ScoreError, match="unknown benchmark 'mmlu'"):
        score("mmlu", tmp_path / "p.jsonl", tmp_path / "r.jsonl")
    twice = Sample(id="x", images=[], question="q", choices=["a", "b"], correct=0)
    write_jsonl(tmp_path / "r.jsonl", [twice, twice])
    with pytest.raises(DataError, match="r.jsonl, record x, field 'id': duplicate id in the references"):
        score("robo2vlm", tmp_path / "p.jsonl", tmp_path / "r.jsonl")


def _render(renderable):
    console = Console(record=True, width=120)
    console.print(renderable)
    return console.export_text()
